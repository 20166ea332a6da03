"""python-etcd3's own test suite (PyPI etcd3 0.12.0, a client no one here wrote) against a real
3-node raftfast cluster: ``make etcd3-suite``.

It downloads the sdist (its tests are in it), installs it with its test dependencies in a venv
of its own (``.etcd3-suite/``: etcd3 0.12.0's generated protobuf code needs
``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python`` and older tenacity), starts three
``raftfast-node`` processes (the first on 127.0.0.1:2379: part of the suite dials etcd's default
address), runs the suite against them and stops them by PID. Exit status: the suite's.

The suite's tests that cannot pass against any server but the one it was written for, or that
need what raftfast does not implement, are deselected with the reason (``EXPECTED``); every
other test must pass. Two adjustments to the suite itself, both for today's libraries and not
the server: hypothesis' function-scoped-fixture health check is suppressed, tenacity is 6.3.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
WORK = ROOT / ".etcd3-suite"
VERSION = "0.12.0"
DEPENDENCIES = ["pytest", "hypothesis", "mock", "six", "tenacity==6.3.1"]

EXPECTED = {
    "TestEtcd3::test_get_key_serializable": "stops etcd processes it finds by name (pifpaf)",
    "TestEtcd3::test_get_prefix_serializable": "stops etcd processes it finds by name (pifpaf)",
    "TestEtcd3::test_member_list": "expects members named pifpaf*",
    "TestEtcd3::test_snapshot": "Maintenance.Snapshot (etcd's bbolt file) is not implemented",
    "TestClient::test_user_pwd_auth": "etcd's user/password Auth is not implemented",
    "TestAlarms::test_create_alarm_all_members": "one cluster-wide alarm, not one per member",
    "TestAlarms::test_list_alarms": "one cluster-wide alarm, not one per member",
    # (it passes when the first member listed happens to lead: the alarm is reported as the
    # leader's)
    "TestAlarms::test_create_alarm_specific_member": "one cluster-wide alarm, not one per member",
}
PROFILE = 'settings.register_profile("default", deadline=None)'


def _suite() -> tuple[Path, Path]:
    """The venv's python and the suite's source tree (made once)."""
    python, source = WORK / "venv" / "bin" / "python", WORK / f"etcd3-{VERSION}"
    if python.exists() and (source / "pytest.ini").exists():
        return python, source
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(WORK / "venv")], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(
        [str(python), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         "-d", str(WORK), f"etcd3=={VERSION}"],
        check=True,
    )  # fmt: skip
    with tarfile.open(WORK / f"etcd3-{VERSION}.tar.gz") as tar:
        tar.extractall(WORK, filter="data")
    subprocess.run([*pip, str(source), *DEPENDENCIES], check=True)
    tests = source / "tests" / "test_etcd3.py"
    text = tests.read_text()
    if PROFILE not in text:
        raise SystemExit(f"{tests}: its hypothesis profile line is not where it was")
    tests.write_text(
        text.replace(
            PROFILE,
            "from hypothesis import HealthCheck\n"
            'settings.register_profile("default", deadline=None, '
            "suppress_health_check=list(HealthCheck))",
        )
    )
    # (its own rootdir: inside this checkout, pytest would take raftfast's configuration)
    (source / "pytest.ini").write_text("[pytest]\n")
    return python, source


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (TIME_WAIT is no use)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _leader(addr: str, env: dict[str, str]) -> int:
    """The leader's member id as ``addr`` sees it (0: none yet)."""
    out = subprocess.run(
        ["etcdctl", f"--endpoints={addr}", "endpoint", "status", "-w", "json"],
        capture_output=True,
        env=env,
        timeout=10,
    )
    rows = json.loads(out.stdout or b"[]")
    return rows[0]["Status"].get("leader", 0) if rows else 0


def main() -> int:
    from raftfast.tools.localcluster import wait_for
    from raftfast.tools.ports import free_ports

    if shutil.which("etcdctl") is None:
        raise SystemExit("etcdctl is needed (the suite runs it): apt-get install etcd-client")
    if not _port_free(2379):
        raise SystemExit("127.0.0.1:2379 is in use: the suite dials it (stop what holds it)")
    python, source = _suite()
    addrs = ["127.0.0.1:2379", *(f"127.0.0.1:{p}" for p in free_ports(2))]
    peers = ",".join(f"n{i + 1}={a}" for i, a in enumerate(addrs))
    procs: list[subprocess.Popen] = []
    env = {**os.environ, "ETCDCTL_API": "3"}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, addr in enumerate(addrs):
                nid = f"n{i + 1}"
                log = open(Path(tmp) / f"{nid}.log", "wb")  # noqa: SIM115 - the node holds it
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "raftfast.server.node_cli", "--id", nid,
                         "--listen", addr, "--peers", peers, "--data-dir", f"{tmp}/{nid}"],
                        stdout=log,
                        stderr=log,
                    )
                )  # fmt: skip
            wait_for("a leader", lambda: _leader(addrs[0], env), timeout=60)
            for test, why in EXPECTED.items():
                print(f"deselected: {test}: {why}")
            deselect = [f"--deselect=tests/test_etcd3.py::{t}" for t in EXPECTED]
            env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
            env["PYTHON_ETCD_HTTP_URL"] = f"http://{addrs[0]}"
            return subprocess.run(
                [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "tests/test_etcd3.py", *deselect],
                cwd=source, env=env, timeout=900,
            ).returncode  # fmt: skip
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    sys.exit(main())
