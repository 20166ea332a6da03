"""The generated protobuf code in raftfast/proto/ must match proto/ (run `make proto`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["raftfast_pb2.py", "raftfast_pb2.pyi", "raftfast_pb2_grpc.py"]
ETCD_GENERATED = [f"{m}_pb2{ext}" for m in ("kv", "rpc") for ext in (".py", ".pyi", "_grpc.py")]


def test_generated_code_is_up_to_date(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iraftfast/proto=proto/raftfast/v1",
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        "proto/raftfast/v1/raftfast.proto",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    for name in GENERATED:
        fresh = (tmp_path / "raftfast" / "proto" / name).read_text()
        committed = (ROOT / "raftfast" / "proto" / name).read_text()
        assert fresh == committed, f"raftfast/proto/{name} is stale: run `make proto`"


def test_generated_etcd_code_is_up_to_date(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-Iraftfast/proto/etcd=proto/etcd",
        f"--python_out={tmp_path}",
        f"--grpc_python_out={tmp_path}",
        f"--pyi_out={tmp_path}",
        "proto/etcd/kv.proto",
        "proto/etcd/rpc.proto",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    for name in ETCD_GENERATED:
        fresh = (tmp_path / "raftfast" / "proto" / "etcd" / name).read_text()
        committed = (ROOT / "raftfast" / "proto" / "etcd" / name).read_text()
        assert fresh == committed, f"raftfast/proto/etcd/{name} is stale: run `make proto`"
