"""etcd's v3 API on a raftfast node: the MVCC keyspace (``mvcc``), the requests (``api``), the
gRPC services (``services``, ``watch``) and the leader's lease clock and compactor
(``lessor``). docs/etcd-api.md tells what is served and how it differs from etcd."""
