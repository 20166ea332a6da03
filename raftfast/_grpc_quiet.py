"""Imported by the two commands (``raftfast``, ``raftfast-node``) before anything imports gRPC:
gRPC's C core reads ``GRPC_VERBOSITY`` once, when it is imported, and unset (grpcio 1.85) it
writes an INFO line to stderr for every failed TLS handshake, and an ERROR line for every
compressed request a node refuses: noise after a command's own error line, plain text among a
node's ``--log-format json`` lines, and a line any stranger adds per connection or call. None,
unless the environment chose (``GRPC_VERBOSITY=ERROR`` or ``INFO`` shows them; empty counts as
unset, as gRPC reads it): what fails is reported by raftfast itself (a port it cannot bind, a
certificate it cannot load, a call's status)."""

import os

if not os.environ.get("GRPC_VERBOSITY"):
    os.environ["GRPC_VERBOSITY"] = "NONE"
