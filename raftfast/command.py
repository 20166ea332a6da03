"""The ``raftfast`` command's entry point (``raftfast.client.cli`` does the work), gRPC's
INFO lines off first (raftfast._grpc_quiet): the command's own error line says what failed."""

from __future__ import annotations


def main() -> int:
    import raftfast._grpc_quiet  # noqa: F401 - before gRPC is imported
    from raftfast.client.cli import main as cli_main

    return cli_main()
