"""Generated code of proto/etcd/ (etcd v3 API, packages etcdserverpb and mvccpb): `make proto`."""
