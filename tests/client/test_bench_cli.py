"""``raftfast bench``: the table, --json, --out, --noop and bad options (short runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SHORT = ["--duration", "1.5", "--warmup", "0.3", "--inflight", "8"]


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raftfast.client.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin"},  # no RAFTFAST_ENDPOINTS: bench starts its own cluster
    )


def test_json_has_the_promised_fields_and_real_numbers():
    out = bench("--nodes", "3", "--json", *SHORT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for key in ("ops_per_s", "p50_ms", "p99_ms", "nodes", "fsync", "cpu_percent"):
        assert key in result, key
    assert result["nodes"] == 3 and result["fsync"] is True and result["tls"] is False
    assert result["ops_per_s"] > 100 and result["ops"] > 0 and result["errors"] == 0
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["p999_ms"]
    assert set(result["cpu_percent"]) == {"n1", "n2", "n3", "client-1"}


def test_table_and_out_dir_with_charts(tmp_path):
    out = bench("--nodes", "3", "--out", str(tmp_path), "--batch", "50", *SHORT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split()[:5] == ["TARGET", "NODES", "FSYNC", "TLS", "OPS/S"], out.stdout
    assert lines[2].split()[:4] == ["local", "3", "on", "off"], out.stdout
    assert "CPU" in out.stdout
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved[0]["batch"] == 50 and saved[0]["latency_cdf"][-1][1] == pytest.approx(1.0)
    for name in ("throughput.png", "latency_cdf.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.parametrize(
    "mode, target",
    [
        ([], "noop"),  # our client, over TCP
        (["session", "--session-transport", "grpc"], "noop"),
        (["unary"], "noop-unary"),
    ],
)
def test_noop_server_baseline(mode, target):
    out = bench("--noop", *mode, "--json", *SHORT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["target"] == target and result["nodes"] == 0 and result["ops_per_s"] > 100
    assert result["errors"] == 0


def test_sync_client_one_request_at_a_time():
    out = bench(
        "--noop", "--client", "sync", "--clients", "2", "--json", *SHORT[:4], "--inflight", "1"
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["client"] == "sync" and result["inflight"] == 1 and result["ops_per_s"] > 100
    assert result["errors"] == 0 and set(result["cpu_percent"]) == {"noop", "client-1", "client-2"}


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--client", "sync"], "--client sync waits for each answer"),
        (["--noop", "unary", "--client", "sync", "--inflight", "1"], "not the unary no-op"),
        (["--nodes", "x"], "--nodes must be numbers"),
        (["--noop", "unary", "--batch", "10"], "one call per operation"),
        (["--nodes", "0"], "between 1 and 9"),
        (["--clients", "0"], "--clients must be at least 1"),
        (["--read-ratio", "2"], "--read-ratio"),
        (["--duration", "0"], "--duration"),
        (["--endpoints", "127.0.0.1:1", "--noop"], "--endpoints measures that cluster"),
        (["--endpoints", "127.0.0.1:1", "--tls"], "--endpoints measures that cluster"),
        (["--noop", "--tls"], "not with --noop"),
    ],
)
def test_bad_options_exit_2_with_one_line(args, expected):
    out = bench(*args, timeout=30)
    assert out.returncode == 2, out
    assert expected in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_tls_starts_a_tls_cluster_and_loads_it_with_a_client_certificate():
    out = bench("--nodes", "3", "--tls", "--json", *SHORT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tls"] is True and result["errors"] == 0 and result["ops_per_s"] > 100


def test_endpoints_measures_a_running_cluster(tmp_path):
    from raftfast.tools.localcluster import ProcCluster

    with ProcCluster(tmp_path, 3) as cluster:
        cluster.wait_leader()
        out = bench("--endpoints", ",".join(cluster.endpoints), "--json", *SHORT)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["target"] == "endpoints" and result["nodes"] == 3
        assert result["ops_per_s"] > 100 and result["errors"] == 0
        # its writes landed in that cluster
        assert max(cluster.status(n).commit_index for n in cluster.ids) > result["ops"] / 2


def test_a_bad_out_dir_or_ca_file_is_refused_before_the_run(tmp_path):
    # (--out was made after the whole run, its results lost; a bad CA failed in every client
    # process: both exit 1, "not found")
    out = bench("--out", "/dev/null/x", "--endpoints", "127.0.0.1:1", timeout=30)
    assert out.returncode == 2 and "--out /dev/null/x" in out.stderr, out
    fake = tmp_path / "ca.crt"
    fake.write_text("-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n")
    out = subprocess.run(
        [sys.executable, "-m", "raftfast.client.cli", "--cacert", str(fake), "bench"]
        + ["--endpoints", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2 and "holds no certificate" in out.stderr, out
    assert out.stderr.count("\n") == 1, out.stderr
