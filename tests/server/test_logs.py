"""``--log-format json``: one JSON object per line; and the flags' bad values."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import sys
from pathlib import Path

import pytest

from raftfast.client import SyncClient
from raftfast.server import handlers, node_cli
from raftfast.server.handlers import quiet_answers_not_sent
from raftfast.server.log_counts import CountedWarning
from raftfast.server.logs import JsonFormatter
from raftfast.server.node_cli import ConfigError, parse_settings
from raftfast.tools.localcluster import ProcCluster, make_certs, wait_for
from tests.polling import until

KEYS = {"time", "level", "node", "term", "message", "fields"}
PEERS = "n1=127.0.0.1:7001,n2=127.0.0.1:7002,n3=127.0.0.1:7003"


def test_every_line_of_a_json_node_is_an_object_with_its_id_and_term(tmp_path):
    with ProcCluster(tmp_path, extra=["--log-format", "json"]) as cluster:
        leader = cluster.wait_leader()
        with SyncClient(cluster.endpoints, timeout=30) as c:
            c.put("a", "1")
        wait_for(
            "every node to know the leader",
            lambda: all(cluster.status(n).leader == leader for n in cluster.ids),
        )
    for nid in cluster.ids:
        lines = cluster.logs[nid].read_text().splitlines()
        assert lines, nid
        terms = []
        for line in lines:
            obj = json.loads(line)  # every line
            assert set(obj) == KEYS, line
            assert obj["node"] == nid
            assert obj["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
            assert obj["time"].endswith("Z") and "T" in obj["time"]
            assert isinstance(obj["message"], str)
            assert obj["fields"]["logger"].startswith("raftfast")
            assert obj["term"] is None or isinstance(obj["term"], int)
            terms.append(obj["term"])
        assert any(t is not None and t >= 1 for t in terms), "\n".join(lines)  # (stopping)
        assert any("stopping" in json.loads(line)["message"] for line in lines)
    became = [
        json.loads(line)
        for line in cluster.logs[leader].read_text().splitlines()
        if "became leader" in line
    ]
    assert became and all(f"in term {b['term']}" in b["message"] for b in became)


def test_failed_tls_handshakes_add_no_line_that_is_not_json(tmp_path):
    """gRPC's C core writes an INFO line per failed TLS handshake unless told otherwise at
    its import (raftfast._grpc_quiet): plain text among the JSON, one per stranger's try."""
    tls = tmp_path / "tls"
    make_certs(tls, ["n1"])
    env = {"GRPC_VERBOSITY": ""}  # (as if unset: this process may have set it)
    with ProcCluster(tmp_path, 1, tls=tls, env=env, extra=["--log-format", "json"]) as cluster:
        cluster.wait_leader()
        for address in (cluster.addrs["n1"], cluster.peer_addrs["n1"]):
            host, port = address.rsplit(":", 1)
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                try:
                    with context.wrap_socket(sock) as conn:  # (no client certificate)
                        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                        answer = conn.recv(1)
                except (ssl.SSLError, OSError):
                    answer = b""
                assert answer == b"", f"{address} served a client without a certificate"
        with SyncClient(list(cluster.addrs.values()), timeout=30, tls=cluster.client_tls) as c:
            c.put("a", "1")  # (after the refusals: their lines, if any, came before its end)
    lines = cluster.logs["n1"].read_text().splitlines()
    assert lines and [line for line in lines if not line.startswith("{")] == []
    for line in lines:
        assert set(json.loads(line)) == KEYS, line


def test_the_formatter_puts_extras_and_exceptions_in_fields():
    formatter = JsonFormatter("n7")
    try:
        raise ValueError("boom\nline two")
    except ValueError:
        record = logging.getLogger("raftfast.test").makeRecord(
            "raftfast.test",
            logging.ERROR,
            __file__,
            1,
            "failed: %s",
            ("x",),
            sys.exc_info(),
            extra={"peer": "n2", "count": 3},
        )
    line = formatter.format(record)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["node"] == "n7" and obj["term"] is None and obj["level"] == "ERROR"
    assert obj["message"] == "failed: x"
    assert obj["fields"]["logger"] == "raftfast.test"
    assert obj["fields"]["peer"] == "n2" and obj["fields"]["count"] == 3
    assert "ValueError: boom" in obj["fields"]["exc_info"]


def _base(data_dir: Path, *extra: str) -> list[str]:
    return ["--id", "n1", "--peers", PEERS, "--data-dir", str(data_dir), *extra]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--metrics-listen", "nonsense"], "--metrics-listen: bad address 'nonsense'"),
        (["--metrics-listen", "127.0.0.1:99999"], "--metrics-listen: bad address"),
        (["--log-format", "xml"], "--log-format must be one of text, json, got 'xml'"),
    ],
)
def test_bad_values_exit_2_with_one_line(flags, expected, tmp_path, capsys, monkeypatch):
    for var in ("RAFTFAST_METRICS_LISTEN", "RAFTFAST_LOG_FORMAT", "RAFTFAST_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as info:
        node_cli.main(_base(tmp_path / "d", *flags))
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("raftfast-node: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert not (tmp_path / "d").exists()  # (nothing written)


def test_flag_toml_and_environment(tmp_path):
    s = parse_settings(_base(tmp_path, "--metrics-listen", "127.0.0.1:9100"), {})
    assert s.metrics_listen == "127.0.0.1:9100" and s.log_format == "text"
    toml = tmp_path / "n.toml"
    toml.write_text('metrics_listen = "0.0.0.0:9101"\nlog_format = "JSON"\n')
    s = parse_settings(_base(tmp_path, "--config", str(toml)), {})
    assert s.metrics_listen == "0.0.0.0:9101" and s.log_format == "json"
    env = {"RAFTFAST_METRICS_LISTEN": "[::1]:9102", "RAFTFAST_LOG_FORMAT": "text"}
    s = parse_settings(_base(tmp_path, "--config", str(toml)), env)
    assert s.metrics_listen == "[::1]:9102" and s.log_format == "text"
    with pytest.raises(ConfigError, match="RAFTFAST_LOG_FORMAT must be one of"):
        parse_settings(_base(tmp_path), {"RAFTFAST_LOG_FORMAT": "yaml"})
    toml.write_text('metrics_listen = "9100"\n')
    with pytest.raises(ConfigError, match="n.toml: metrics_listen: bad address '9100'"):
        parse_settings(_base(tmp_path, "--config", str(toml)), {})
    assert parse_settings(_base(tmp_path), {}).metrics_listen == ""  # off by default


def test_a_json_node_that_fails_to_start_says_so_in_json_and_exits_1(tmp_path):
    """Its metrics port is taken: one CRITICAL line (JSON like the rest), exit code 1."""
    import os
    import socket
    import subprocess

    from raftfast.tools.localcluster import free_ports

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTFAST_")}
    env["PYTHONPATH"] = str(root)
    (port,) = free_ports(1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = f"127.0.0.1:{taken.getsockname()[1]}"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "raftfast.server.node_cli",
                "--id",
                "n1",
                "--peers",
                f"n1=127.0.0.1:{port}",
                "--data-dir",
                str(tmp_path / "n1"),
                "--log-format",
                "json",
                "--metrics-listen",
                metrics,
                "--no-fsync",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=root,
            env=env,
        )
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # every line
    assert all(set(x) == KEYS and x["node"] == "n1" for x in lines), proc.stderr
    assert any(x["level"] == "WARNING" and "UNSAFE" in x["message"] for x in lines)
    last = lines[-1]
    assert last["level"] == "CRITICAL", proc.stderr
    assert last["message"].startswith(
        f"raftfast-node: error: node n1 failed: cannot serve metrics on {metrics}"
    )
    assert "Traceback" not in proc.stderr


def test_an_answer_whose_client_left_logs_no_traceback(caplog, monkeypatch) -> None:
    # grpc.aio logged an ERROR and a traceback per answer it could not send (a client that
    # left, or refused it as too big: etcd's Node.js client wrote four with one Range).
    from grpc._cython.cygrpc import ExecuteBatchError

    quiet_answers_not_sent()
    quiet_answers_not_sent()  # (once a process, however many servers)
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    ours = [f for f in grpc_log.filters if isinstance(f, handlers._AnswerNotSent)]
    assert len(ours) == 1
    monkeypatch.setattr(ours[0], "counted", CountedWarning(handlers._log, "%d: %s", 60))

    def not_sent(method: str) -> None:
        try:
            raise ExecuteBatchError('Failed "execute_batch"')
        except ExecuteBatchError:
            grpc_log.exception(f"ExecuteBatchError raised in core by servicer method [{method}]")

    with caplog.at_level(logging.DEBUG):
        not_sent("/a/B")
        try:
            raise ValueError("a real failure")
        except ValueError:
            grpc_log.exception("Unexpected error in servicer method [/a/C]")
        for _ in range(100):  # (a flood: counted, said at most once a minute)
            not_sent("/a/D")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["Unexpected error in servicer method [/a/C]"]
    assert any("[/a/B]" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("1: ") and "[/a/B]" in warnings[0]


def test_a_counted_warning_says_what_a_flood_left_unsaid_once_it_stops(caplog) -> None:
    counted = CountedWarning(logging.getLogger("test.counted"), "%d dropped, %s", 0.05)

    async def flood() -> None:
        for i in range(5):
            counted.note(f"last {i}")
        await until("the rest said", lambda: len(caplog.records) == 2, timeout=10)

    with caplog.at_level(logging.WARNING, logger="test.counted"):
        asyncio.run(flood())
    assert [r.getMessage() for r in caplog.records] == ["1 dropped, last 0", "4 dropped, last 4"]


def test_a_node_without_its_compiled_modules_says_so(caplog, monkeypatch) -> None:
    """pip builds a wheel without them, silently, where no C compiler is: the node warns at
    each start unless the pure twins were asked for (RAFTFAST_PUREPYTHON)."""
    from raftfast.server import driver

    settings = parse_settings(["--id", "n1", "--peers", "n1=127.0.0.1:7001", "--data-dir", "d"])
    caplog.set_level(logging.WARNING, logger="raftfast.node")
    monkeypatch.delenv("RAFTFAST_PUREPYTHON", raising=False)
    monkeypatch.setattr(driver, "COMPILED", True)
    driver._warn_if_pure(settings)
    assert not caplog.records
    monkeypatch.setattr(driver, "COMPILED", False)
    driver._warn_if_pure(settings)
    assert [r.getMessage() for r in caplog.records] == [
        "node n1 runs raftfast's pure-Python modules: its compiled ones were not built (no C "
        "compiler at install?), and it is several times slower; reinstall where gcc is "
        "(docs/operations.md, Installing)"
    ]
    monkeypatch.setenv("RAFTFAST_PUREPYTHON", "1")
    driver._warn_if_pure(settings)
    assert len(caplog.records) == 1
