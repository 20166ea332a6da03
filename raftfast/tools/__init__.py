"""Tools around a cluster, which a node never imports: the load generator and ``raftfast
bench``, the local cluster of real processes (``make run``, the tests), the demo, and the no-op
gRPC server (the benchmarks' baseline)."""
