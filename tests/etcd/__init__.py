"""Tests of raftfast.etcd: the etcd v3 API's data model and services."""
