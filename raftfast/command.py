"""The ``raftfast`` command's entry point (``raftfast.client.cli`` does the work).

gRPC's C core logs each failed TLS handshake at INFO, one line per retry, unless
``GRPC_VERBOSITY`` says otherwise when gRPC is imported: the command's own error line says
what failed, so it asks for errors only (unless the environment chose), before importing gRPC.
"""

from __future__ import annotations

import os


def main() -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from raftfast.client.cli import main as cli_main

    return cli_main()
