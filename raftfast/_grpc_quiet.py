"""Imported by the two commands (``raftfast``, ``raftfast-node``) before anything imports gRPC:
gRPC's C core reads ``GRPC_VERBOSITY`` once, when it is imported, and unset (grpcio 1.85) it
writes an INFO line to stderr for every failed TLS handshake: noise after a command's own error
line, plain text among a node's ``--log-format json`` lines, and a line any stranger adds per
connection. Errors only, unless the environment chose (``GRPC_VERBOSITY=INFO`` shows them;
empty counts as unset, as gRPC reads it)."""

import os

if not os.environ.get("GRPC_VERBOSITY"):
    os.environ["GRPC_VERBOSITY"] = "ERROR"
