"""The ``raftfast`` command against fake servers (in-process) and an unreachable address."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raftfast.client import cli
from raftfast.client.tables import _width, format_table
from raftfast.proto import raftfast_pb2 as pb
from raftfast.tools.localcluster import make_certs
from tests.client.test_client import FakeKV, ThreadedServer, closed_port
from tests.raw_server import raw_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster() -> object:
    """A fake leader n1 and a fake follower n2 that points at it; yields their addresses."""
    leader, follower = FakeKV("n1"), FakeKV("n2")
    with ThreadedServer(leader, follower) as servers:
        laddr, faddr = servers.addresses
        follower.redirect_to = laddr
        members = [
            pb.Member(id="n1", address=laddr, role="voter", match_index=5),
            pb.Member(id="n2", address=faddr, role="voter", match_index=4),
            pb.Member(id="n3", address=closed_port(), role="voter", match_index=0),
        ]
        leader.members = members
        follower.members = members
        yield leader, laddr, faddr


def run_cli(capsysbinary: pytest.CaptureFixture[bytes], *argv: str) -> tuple[int, bytes, str]:
    code = cli.main(list(argv))
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def test_put_get_delete_scan(cluster, capsysbinary) -> None:
    leader, laddr, faddr = cluster
    eps = f"{faddr},{laddr}"
    assert run_cli(capsysbinary, "--endpoints", eps, "put", "k1", "héllo") == (0, b"OK\n", "")
    assert leader.store[b"k1"] == "héllo".encode()
    assert run_cli(capsysbinary, "--endpoints", eps, "get", "k1") == (0, "héllo\n".encode(), "")
    # options may follow the command too
    code, out, err = run_cli(capsysbinary, "get", "nope", "--endpoints", eps, "--timeout", "2")
    assert (code, out, err) == (1, b"", "key not found\n")
    leader.store[b"k2"] = b"\xff\x00raw"
    code, out, _ = run_cli(capsysbinary, "--endpoints", eps, "scan", "k")
    assert code == 0
    assert out == "k1\théllo\n".encode() + b"k2\t\xff\x00raw\n"
    code, out, _ = run_cli(capsysbinary, "--endpoints", eps, "scan", "k", "--limit", "1")
    assert out.count(b"\n") == 1
    for i in range(1500):  # (all of them, as etcdctl's get --prefix: it stopped at 1,000)
        leader.store[b"m%04d" % i] = b"v"
    code, out, _ = run_cli(capsysbinary, "--endpoints", eps, "scan", "m")
    assert code == 0 and out.count(b"\n") == 1500
    assert run_cli(capsysbinary, "--endpoints", eps, "delete", "k1") == (0, b"deleted\n", "")
    assert run_cli(capsysbinary, "--endpoints", eps, "delete", "k1") == (1, b"not found\n", "")
    assert run_cli(capsysbinary, "--endpoints", eps, "cas", "c", "1", "--absent")[:2] == (
        0,
        b"swapped\n",
    )
    assert run_cli(capsysbinary, "--endpoints", eps, "cas", "c", "2", "--expect", "0")[:2] == (
        1,
        b"not swapped\n",
    )


def test_endpoints_from_environment(cluster, capsysbinary, monkeypatch) -> None:
    leader, laddr, _ = cluster
    monkeypatch.setenv("RAFTFAST_ENDPOINTS", laddr)
    assert run_cli(capsysbinary, "put", "e", "1") == (0, b"OK\n", "")
    assert leader.store[b"e"] == b"1"


def test_invalid_argument_message(cluster, capsysbinary) -> None:
    _, laddr, _ = cluster
    code, out, err = run_cli(capsysbinary, "--endpoints", laddr, "put", "k" * 40, "v")
    assert code == 2 and out == b""  # the cluster refuses it as invalid: a usage error
    assert err == "error: invalid argument: key exceeds 16 bytes\n"


@pytest.mark.parametrize(
    ("prefix", "code", "words"),
    [
        ("denied", cli.ExitCode.PERMISSION, "needs the write role"),
        ("full", cli.ExitCode.FAILED, "NOSPACE"),
        ("boom", cli.ExitCode.FAILED, "internal error: boom"),
        ("bad", cli.ExitCode.USAGE, "invalid argument: prefix 'bad'"),
    ],
)
def test_exit_codes_tell_what_happened(cluster, capsysbinary, prefix, code, words) -> None:
    _, laddr, _ = cluster
    got, out, err = run_cli(capsysbinary, "--endpoints", laddr, "scan", prefix)
    assert (got, out) == (code, b"")
    assert err.count("\n") == 1 and words in err, err


def test_a_server_that_is_not_raftfast_exits_5_at_once(capsysbinary) -> None:
    with ThreadedServer() as servers:  # a gRPC server that serves nothing
        server = servers.bare()
        code, out, err = run_cli(capsysbinary, "--endpoints", server, "--timeout", "30", "get", "k")
    assert (code, out) == (cli.ExitCode.FAILED, b"")
    assert err == f"error: not a raftfast server at {server} (it does not implement Session)\n"


def test_an_address_that_does_not_speak_grpc_exits_5(capsysbinary) -> None:
    # A node's replication or Session port (or a web server) answered "no node reachable",
    # exit 3, as if the cluster were down: retrying cannot help there.
    def answer_junk(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"RFSS not HTTP/2 at all\r\n" * 8)

    with raw_server(answer_junk) as address:
        code, out, err = run_cli(capsysbinary, "--endpoints", address, "--timeout", "3", "status")
    assert (code, out) == (cli.ExitCode.FAILED, b"")
    assert err.startswith(f"error: not a raftfast server at {address}: it does not speak gRPC")


def test_status_table_and_json(cluster, capsysbinary) -> None:
    _, laddr, faddr = cluster
    code, out, err = run_cli(capsysbinary, "--endpoints", faddr, "status")
    assert code == 0, err
    text = out.decode()
    lines = text.splitlines()
    assert lines[0].split() == "ID ADDRESS ROLE TERM LEADER COMMIT APPLIED LAST VERSION".split()
    assert lines[1].split() == ["n1", laddr, "leader", "3", "n1", "0", "0", "0", "1.2.3"]
    assert lines[2].split() == ["n2", faddr, "follower", "3", "n1", "0", "0", "0", "1.2.3"]
    assert lines[3].split()[:3] == ["n3", nodes_n3 := lines[3].split()[1], "unreachable"]
    assert nodes_n3.startswith("127.0.0.1:")
    assert "3 member(s), as seen by n2" in text and "MATCH" in text
    # (the address asked, not the client's endpoints)
    assert f"unreachable: n3 ({nodes_n3}): no node reachable at {nodes_n3} " in text, text

    code, out, _ = run_cli(capsysbinary, "--endpoints", laddr, "status", "--json")
    assert code == 0
    nodes = json.loads(out)
    assert [n["id"] for n in nodes] == ["n1", "n2", "n3"]
    assert nodes[0]["role"] == "leader" and nodes[0]["version"] == "1.2.3"
    assert [m["id"] for m in nodes[0]["members"]] == ["n1", "n2", "n3"]
    by_id = {n["id"]: n for n in nodes}
    assert by_id["n2"]["role"] == "follower"
    assert "error" in by_id["n3"]


def test_tables_align_ids_that_are_not_ascii() -> None:
    # Node ids may be any printable text: a wide or combining character is not one column.
    rows = [["nœud-1", "leader"], ["節点2", "follower"], ["e\u0301", "learner"]]
    lines = format_table(["ID", "ROLE"], rows)
    starts = {_width(line[: line.rfind(" ") + 1]) for line in lines}  # (where ROLE begins)
    assert len(starts) == 1, lines


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["get"],
        ["frobnicate"],
        ["put", "k"],
        ["--endpoints", "nohostport", "get", "k"],
        ["--endpoints", "", "get", "k"],
        ["--timeout", "0", "get", "k"],
        ["--timeout", "abc", "get", "k"],
        ["scan", "--limit", "-1"],
        ["cas", "k", "v"],
        ["cas", "k", "v", "--absent", "--expect", "x"],
        ["get", "k", "--read-mode", "fast"],
        ["--cacert", "/dev/zero", "get", "k"],  # (read until memory ran out)
        # (an unset $FILE: "cannot write : No such file", exit 5)
        ["--timeout", "1", "snapshot", "save", ""],
        ["--timeout", "1", "snapshot", "save", " "],
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "error:" in err


def cli_process(*argv: str, cwd: Path = ROOT, redirect: str = "") -> subprocess.CompletedProcess:
    """``python -m raftfast.client.cli ARGV`` in a process of its own, its stdout redirected
    by the shell if ``redirect`` says how (">&-": closed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAFTFAST_ENDPOINTS", None)
    env.pop("RAFTFAST_TIMEOUT", None)
    shell = ["sh", "-c", f'exec "$@" {redirect}', "sh"] if redirect else []
    command = [*shell, sys.executable, "-m", "raftfast.client.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


def test_unreachable_cluster_subprocess() -> None:
    addr = closed_port()
    proc = cli_process("--endpoints", addr, "--timeout", "0.5", "get", "k")
    assert proc.returncode == 3  # ExitCode.UNAVAILABLE
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: no leader reachable at {addr} within 0.5s")


@pytest.mark.parametrize("redirect", [">&-", ">/dev/full"])
def test_an_answer_stdout_cannot_take_exits_6_with_one_line(cluster, redirect) -> None:
    """stdout closed, or on a full disk: the request is carried out, the answer is lost, and
    the command says so (it printed "unexpected AttributeError/OSError" and exited 5)."""
    leader, laddr, _ = cluster
    for args in (["put", "k", "v"], ["get", "k"], ["status"]):
        proc = cli_process("--endpoints", laddr, *args, redirect=redirect)
        assert proc.returncode == 6, (args, proc.stderr)  # ExitCode.OUTPUT
        assert proc.stderr.count("\n") == 1 and "cannot write the answer" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert leader.store[b"k"] == b"v"  # (the put was made)


def test_a_reader_that_goes_away_exits_6_quietly(cluster) -> None:
    """``raftfast get k | head -0``: the answer cannot be written, as with stdout closed (it
    exited 1, which says "key not found"); nothing on stderr, the reader wanted no more."""
    leader, laddr, _ = cluster
    leader.store[b"k"] = b"v"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args in (["get", "k"], ["scan", "k"], ["status"]):
        command = [sys.executable, "-m", "raftfast.client.cli", "--endpoints", laddr, *args]
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env
        )
        proc.stdout.close()  # (before the answer: its write finds no reader, EPIPE)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 6, (args, err)  # ExitCode.OUTPUT
        assert err == b"", err


@pytest.mark.parametrize(
    "command", [["snapshot", "save", "backup.snap"], ["member", "add", "n9", "127.0.0.1:9"]]
)
def test_a_long_command_keeps_the_timeout_it_is_given(command, tmp_path) -> None:
    """snapshot save and member add wait longer than one request by default (600 s, 120 s),
    but not past a --timeout the user gave: against no cluster at all, they retried for the
    whole default."""
    proc = cli_process("--endpoints", closed_port(), "--timeout", "1", *command, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr  # ExitCode.UNAVAILABLE
    assert "within 1s" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize(
    "command", [["snapshot", "save", "backup.snap"], ["member", "add", "n9", "127.0.0.1:9"]]
)
def test_a_long_command_against_no_cluster_fails_within_the_usual_timeout(
    command, tmp_path
) -> None:
    """Without --timeout, snapshot save and member add get 600 s and 120 s for their work,
    but a cluster that does not answer at all (a wrong endpoint, TLS against a plain port)
    fails them within the ordinary timeout: they waited the 600 s (a hostile hunt)."""
    started = time.monotonic()
    proc = cli_process("--endpoints", closed_port(), *command, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr  # ExitCode.UNAVAILABLE
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert time.monotonic() - started < 60  # (the ordinary 5 s, and Python's start-up)


def test_a_tls_client_at_a_plain_port_says_so_in_one_line(cluster, tmp_path) -> None:
    """The installed command (raftfast.command) keeps gRPC's C core to errors: it logged each
    failed handshake, a line per retry, before the command's own line."""
    _, laddr, _ = cluster
    tls = make_certs(tmp_path / "tls", ["n1"])
    command = Path(sys.executable).parent / "raftfast"
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    proc = subprocess.run(
        [command, "--endpoints", laddr, "--timeout", "1.5", "--cacert", tls.ca_file,
         "--cert", tls.cert_file, "--key", tls.key_file, "get", "k"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 3  # ExitCode.UNAVAILABLE
    assert proc.stderr.count("\n") == 1 and "handshake" in proc.stderr.lower(), proc.stderr
