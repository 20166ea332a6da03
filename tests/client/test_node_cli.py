"""``raftfast-node`` argument handling: precedence, the stored identity, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from raftfast.errors import CorruptionError
from raftfast.server import node_cli
from raftfast.server.node_cli import ConfigError, load_identity, parse_settings, write_identity
from raftfast.server.settings import NodeSettings

ROOT = Path(__file__).resolve().parents[2]
PEERS = "n1=127.0.0.1:7001,n2=127.0.0.1:7002,n3=127.0.0.1:7003"


def base(data_dir: Path, *extra: str) -> list[str]:
    return ["--id", "n1", "--peers", PEERS, "--data-dir", str(data_dir), *extra]


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> list[NodeSettings]:
    """Replace raftfast.server.driver with a module whose serve() records its settings."""
    calls: list[NodeSettings] = []

    async def serve(settings: NodeSettings, state_machine=None) -> None:
        calls.append(settings)

    module = types.ModuleType("raftfast.server.driver")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "raftfast.server.driver", module)
    for var in list(os.environ):
        if var.startswith("RAFTFAST_") and var != "RAFTFAST_PUREPYTHON":
            monkeypatch.delenv(var)
    return calls


def test_flags_only(tmp_path: Path) -> None:
    s = parse_settings(base(tmp_path / "d"), {})
    assert s.id == "n1"
    assert s.listen == "127.0.0.1:7001"  # defaults to this node's peer address
    assert s.peers == {"n1": "127.0.0.1:7001", "n2": "127.0.0.1:7002", "n3": "127.0.0.1:7003"}
    assert s.data_dir == str(tmp_path / "d")
    assert (s.cluster_id, s.fsync, s.read_mode, s.tick_ms, s.log_level) == (
        "raftfast",
        True,
        "linearizable",
        25,
        "INFO",
    )
    assert not (tmp_path / "d").exists()  # parsing writes nothing


def test_precedence_flag_over_env_over_toml(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        'id = "n1"\n'
        'data_dir = "' + str(tmp_path / "d") + '"\n'
        'cluster_id = "from-toml"\n'
        'read_mode = "stale"\n'
        "tick_ms = 10\n"
        'log_level = "debug"\n'
        "fsync = false\n"
        "election_ticks = 20\n"
        "[peers]\n"
        'n1 = "127.0.0.1:7101"\n'
        'n2 = "127.0.0.1:7102"\n'
    )
    env = {
        "RAFTFAST_READ_MODE": "lease",
        "RAFTFAST_TICK_MS": "20",
        "RAFTFAST_CLUSTER_ID": "from-env",
        "RAFTFAST_NO_FSYNC": "0",
        "RAFTFAST_ENDPOINTS": "ignored:1",  # other RAFTFAST_* variables are not ours
    }
    s = parse_settings(["--config", str(toml), "--tick-ms", "30"], env)
    assert s.tick_ms == 30  # flag
    assert s.read_mode == "lease"  # env over toml
    assert s.cluster_id == "from-env"
    assert s.fsync is True  # RAFTFAST_NO_FSYNC=0 over fsync = false
    assert s.log_level == "DEBUG"  # toml only
    assert s.election_ticks == 20
    assert s.peers == {"n1": "127.0.0.1:7101", "n2": "127.0.0.1:7102"}
    assert s.listen == "127.0.0.1:7101"

    s = parse_settings(["--config", str(toml), "--no-fsync", "--read-mode", "linearizable"], env)
    assert s.fsync is False and s.read_mode == "linearizable"

    # the config file may come from the environment, and peers may be a string there
    toml.write_text(f'peers = "{PEERS}"\nid = "n2"\n')
    s = parse_settings(["--data-dir", str(tmp_path / "e")], {"RAFTFAST_CONFIG": str(toml)})
    assert s.id == "n2" and s.listen == "127.0.0.1:7002"

    # everything from the environment
    env = {
        "RAFTFAST_ID": "n3",
        "RAFTFAST_PEERS": PEERS,
        "RAFTFAST_DATA_DIR": str(tmp_path / "f"),
        "RAFTFAST_LISTEN": "0.0.0.0:7003",
        "RAFTFAST_NO_FSYNC": "1",
        "RAFTFAST_LOG_LEVEL": "warn",
    }
    s = parse_settings([], env)
    assert (s.id, s.listen, s.fsync, s.log_level) == ("n3", "0.0.0.0:7003", False, "WARNING")


def test_identity_written_and_reloaded(tmp_path: Path, fake_serve, capsys) -> None:
    d = tmp_path / "data" / "n1"
    assert node_cli.main(base(d, "--cluster-id", "prod", "--listen", "127.0.0.1:7001")) == 0
    assert len(fake_serve) == 1
    stored = json.loads((d / "node.json").read_text())
    assert stored["id"] == "n1" and stored["cluster_id"] == "prod"
    assert stored["peers"]["n3"] == "127.0.0.1:7003"
    assert not (d / "node.json.tmp").exists()
    assert "UNSAFE" not in capsys.readouterr().err

    # restart with only --data-dir
    assert node_cli.main(["--data-dir", str(d)]) == 0
    s = fake_serve[-1]
    assert (s.id, s.cluster_id, s.listen) == ("n1", "prod", "127.0.0.1:7001")
    assert s.peers == stored["peers"]

    # same values again are fine; a new listen address replaces the stored one
    s = parse_settings(["--data-dir", str(d), "--id", "n1", "--listen", "127.0.0.1:7009"], {})
    assert write_identity(s) is True
    assert load_identity(str(d))["listen"] == "127.0.0.1:7009"
    assert write_identity(s) is False  # unchanged: not rewritten


def test_an_address_an_older_release_wrote_down_still_loads(tmp_path: Path) -> None:
    """Flags want an IPv6 host in brackets now, but node.json keeps the rule it was written
    under: "::1:7003" (never reachable by gRPC) must not stop a node from starting (it loaded,
    and the start then failed on it: the upgrade hunt); it gets its brackets."""
    d = tmp_path / "n1"
    write_identity(parse_settings(base(d, "--cluster-id", "prod"), {}))
    stored = json.loads((d / "node.json").read_text())
    stored["peers"]["n3"] = "::1:7003"
    (d / "node.json").write_text(json.dumps(stored))
    assert load_identity(str(d))["peers"]["n3"] == "[::1]:7003"
    restarted = parse_settings(["--data-dir", str(d)], {})
    restarted.validate()
    assert restarted.peers["n3"] == "[::1]:7003"
    with pytest.raises(ConfigError, match=r"in brackets: \[::1\]:7001"):
        parse_settings(base(tmp_path / "n2", "--peers", "n1=::1:7001"), {})


def test_contradicting_identity_is_refused(tmp_path: Path, fake_serve, capsys) -> None:
    d = tmp_path / "n1"
    write_identity(parse_settings(base(d, "--cluster-id", "prod"), {}))
    for argv, env, word in (
        (["--data-dir", str(d), "--id", "n2"], {}, "--id 'n2'"),
        (["--data-dir", str(d), "--cluster-id", "test"], {}, "--cluster-id 'test'"),
        (["--data-dir", str(d)], {"RAFTFAST_ID": "n3"}, "RAFTFAST_ID 'n3'"),
    ):
        with pytest.raises(ConfigError, match="contradicts the identity stored") as info:
            parse_settings(argv, env)
        assert word in str(info.value)
    with pytest.raises(SystemExit) as exit_info:
        node_cli.main(["--data-dir", str(d), "--id", "n2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("raftfast-node: error: --id 'n2' contradicts") and err.count("\n") == 1
    assert not fake_serve

    # A damaged identity is a damaged data directory: exit 1, one line.
    for content in ("{not json", "", "[" * 200_000):
        (d / "node.json").write_text(content)
        with pytest.raises(CorruptionError, match="corrupt identity file"):
            parse_settings(["--data-dir", str(d)], {})
        assert node_cli.main(["--data-dir", str(d)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("raftfast-node: error: corrupt identity") and err.count("\n") == 1
    (d / "node.json").unlink()
    os.mkfifo(d / "node.json")  # (opening it to read would wait for a writer for ever)
    assert node_cli.main(["--data-dir", str(d)]) == 1
    assert "not a regular file" in capsys.readouterr().err
    (d / "node.json").unlink()
    (d / "node.json").symlink_to("/dev/zero")
    assert node_cli.main(["--data-dir", str(d)]) == 1
    assert "not a regular file" in capsys.readouterr().err
    assert not fake_serve


def test_no_fsync_warns(tmp_path: Path, fake_serve, capsys) -> None:
    assert node_cli.main(base(tmp_path / "d", "--no-fsync")) == 0
    assert fake_serve[-1].fsync is False
    err = capsys.readouterr().err
    assert "UNSAFE" in err and "fsync" in err


def test_serve_failure_is_one_line(tmp_path: Path, fake_serve, monkeypatch, capsys) -> None:
    from raftfast.errors import StorageError

    async def serve(settings: NodeSettings, state_machine=None) -> None:
        raise StorageError("fdatasync failed: EIO")

    monkeypatch.setattr(sys.modules["raftfast.server.driver"], "serve", serve)
    assert node_cli.main(base(tmp_path / "d")) == 1
    err = capsys.readouterr().err
    assert "raftfast-node: error: node n1 failed: fdatasync failed: EIO" in err
    assert "Traceback" not in err


def _toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return str(path)


BAD_CASES = [
    ("unknown flag", lambda t: ["--bogus"], "unrecognized arguments"),
    ("no data dir", lambda t: ["--id", "n1", "--peers", PEERS], "--data-dir is required"),
    ("no id", lambda t: ["--peers", PEERS, "--data-dir", str(t / "x")], "--id is required"),
    (
        "no peers",
        lambda t: ["--id", "n1", "--data-dir", str(t / "x")],
        "--peers (or --join) is required",
    ),
    ("id not in peers", lambda t: base(t / "x", "--id", "n9"), "must include this node's id"),
    ("bad peer address", lambda t: base(t / "x", "--peers", "n1=localhost"), "bad address"),
    ("bad peer port", lambda t: base(t / "x", "--peers", "n1=h:99999"), "bad address"),
    ("bad peer entry", lambda t: base(t / "x", "--peers", "n1"), "bad entry"),
    ("duplicate peer", lambda t: base(t / "x", "--peers", "n1=h:1,n1=h:2"), "appears twice"),
    ("bad listen", lambda t: base(t / "x", "--listen", "7001"), "bad address"),
    ("bad read mode", lambda t: base(t / "x", "--read-mode", "fast"), "--read-mode must be"),
    ("bad tick", lambda t: base(t / "x", "--tick-ms", "ten"), "--tick-ms must be an integer"),
    ("zero tick", lambda t: base(t / "x", "--tick-ms", "0"), "tick_ms >= 1"),
    ("bad log level", lambda t: base(t / "x", "--log-level", "loud"), "--log-level must be"),
    ("missing toml", lambda t: base(t / "x", "--config", str(t / "nope.toml")), "cannot read"),
    (
        "unreadable toml",
        lambda t: base(t / "x", "--config", _toml(t, "id = [unclosed\n")),
        "bad TOML",
    ),
    (
        "unknown toml key",
        lambda t: base(t / "x", "--config", _toml(t, "colour = 'blue'\n")),
        "unknown key 'colour'",
    ),
    (
        "toml wrong type",
        lambda t: base(t / "x", "--config", _toml(t, "tick_ms = true\n")),
        "must be an integer",
    ),
    (
        "toml bad fsync",
        lambda t: base(t / "x", "--config", _toml(t, "fsync = 'maybe'\n")),
        "must be a boolean",
    ),
    (
        "toml bad peers",
        lambda t: base(t / "x", "--config", _toml(t, "peers = 3\n")),
        "must be a table",
    ),
    # (a RecursionError traceback, exit 1: systemd restarted the node for ever)
    (
        "toml nested too deeply",
        lambda t: base(t / "x", "--config", _toml(t, "x = " + "[\n" * 3000 + "]" * 3000)),
        "nested too deeply",
    ),
    # (tomllib's time grows with the square of a dotted key's depth: 29 s of CPU for 100 KB)
    (
        "toml too big",
        lambda t: base(t / "x", "--config", _toml(t, "a." * 50_000 + "b = 1\n")),
        "is larger than 65536 bytes",
    ),
    (
        "toml line too long",
        lambda t: base(t / "x", "--config", _toml(t, "id = 'n1'\n" + "a." * 2100 + "b = 1\n")),
        "line 2 is longer than 4096 bytes",
    ),
    # TOML has integers and booleans: "25" and 1 are slips there (both were taken, or refused
    # with a message that said 1 was fine)
    (
        "toml integer as a string",
        lambda t: base(t / "x", "--config", _toml(t, 'tick_ms = "25"\n')),
        """tick_ms must be an integer (a TOML one: 25, not "25"), got '25'""",
    ),
    (
        "toml boolean as a number",
        lambda t: base(t / "x", "--config", _toml(t, "fsync = 1\n")),
        "fsync must be a boolean (TOML true or false), got 1",
    ),
    (
        "toml boolean as a string",
        lambda t: base(t / "x", "--config", _toml(t, 'client_cert_auth = "yes"\n')),
        "client_cert_auth must be a boolean (TOML true or false), got 'yes'",
    ),
    *(
        (
            f"a {mode} retention of {value[:12]}",
            lambda t, mode=mode, value=value: base(
                t / "x", "--auto-compaction-mode", mode, "--auto-compaction-retention", value
            ),
            expected,
        )
        for mode, value, expected in [
            ("revision", "1" * 400, "want revisions (N)"),
            ("revision", str(2**63), "at most 9223372036854775807 revisions"),
            ("periodic", "1" * 400, "--auto-compaction-retention: at most"),
            ("periodic", "1" * 400 + "s", "--auto-compaction-retention: at most"),
        ]
    ),
    (
        "a NUL byte in a path of the config file",
        lambda t: base(t / "x", "--config", _toml(t, 'data_dir = "a\\u0000b"\n')),
        "must not contain a NUL byte",
    ),
    (
        "two members at one address",
        lambda t: base(t / "x", "--peers", "n1=127.0.0.1:7001,n2=127.0.0.1:7001"),
        "--peers: n1 and n2 have the same address 127.0.0.1:7001",
    ),
    (
        "two members at one address spelled apart",  # (a node that never elected: exit 2)
        # (localhost is 127.0.0.1 or ::1, or both: either way it reaches n1's or n3's place)
        lambda t: base(t / "x", "--peers", "n1=127.0.0.1:7001,n2=localhost:7001,n3=[::1]:7001"),
        "n2 (localhost:7001) reach the same address",
    ),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_exits_2_with_one_line(case, tmp_path: Path, fake_serve, capsys) -> None:
    _, make_argv, expected = case
    with pytest.raises(SystemExit) as info:
        node_cli.main(make_argv(tmp_path))
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("raftfast-node: error: "), err
    assert err.count("\n") == 1, err
    assert expected in err
    assert not fake_serve


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RAFTFAST_NO_FSYNC": "perhaps"}, "RAFTFAST_NO_FSYNC must be a boolean"),
        ({"RAFTFAST_FSYNC": "1", "RAFTFAST_NO_FSYNC": "1"}, "contradict"),
        ({"RAFTFAST_TICK_MS": "x"}, "RAFTFAST_TICK_MS must be an integer"),
        ({"RAFTFAST_PEERS": "n1=nope"}, "RAFTFAST_PEERS n1: bad address"),
    ],
)
def test_bad_environment(env, expected, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_settings(["--id", "n1", "--peers", PEERS, "--data-dir", str(tmp_path)], env)


def test_the_environment_is_text_and_a_config_file_typed(tmp_path: Path) -> None:
    """The environment holds strings (RAFTFAST_FSYNC=off, RAFTFAST_TICK_MS=20, as documented);
    a config file holds TOML's integers and booleans, and only those."""
    toml = tmp_path / "node.toml"
    toml.write_text(
        "tick_ms = 20\nfsync = false\nclient_stream_port = 0\nauto_compaction_retention = 1000\n"
    )
    argv = ["--id", "n1", "--peers", PEERS, "--data-dir", str(tmp_path / "d")]
    s = parse_settings([*argv, "--config", str(toml)], {})
    assert (s.tick_ms, s.fsync, s.auto_compaction_retention) == (20, False, "1000")
    s = parse_settings(argv, {"RAFTFAST_FSYNC": "off", "RAFTFAST_TICK_MS": " 20 "})
    assert (s.tick_ms, s.fsync) == (20, False)
    for text in ('tick_ms = "20"\n', "fsync = 0\n", 'fsync = "false"\n', "tick_ms = 20.0\n"):
        toml.write_text(text)
        with pytest.raises(ConfigError, match="a TOML one|TOML true or false"):
            parse_settings([*argv, "--config", str(toml)], {})


def test_bad_flag_subprocess_has_no_traceback() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTFAST_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "raftfast.server.node_cli", "--bad"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr == "raftfast-node: error: unrecognized arguments: --bad\n"


def test_learner_goes_with_join(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--learner goes with --join"):
        parse_settings(["--id", "n1", "--peers", PEERS, "--data-dir", str(tmp_path), "--learner"])
    joining = parse_settings(
        ["--id", "n4", "--listen", "127.0.0.1:7004", "--join", "127.0.0.1:7001"]
        + ["--data-dir", str(tmp_path), "--learner"]
    )
    assert joining.join_as_learner and joining.join == "127.0.0.1:7001"
    # Stored: a restart before the join was done (a kill during a long snapshot, say) asks
    # again as a learner, with --data-dir alone (it asked as a voter: the review).
    write_identity(joining)
    restarted = parse_settings(["--data-dir", str(tmp_path)])
    assert restarted.join_as_learner and restarted.join == "127.0.0.1:7001"
    # ... and a node that joined as a voter is not made a learner by the flag later.
    voter = tmp_path / "voter"
    write_identity(
        parse_settings(
            ["--id", "n5", "--listen", "127.0.0.1:7005", "--join", "127.0.0.1:7001"]
            + ["--data-dir", str(voter)]
        )
    )
    with pytest.raises(ConfigError, match="first start.*member demote"):
        parse_settings(["--data-dir", str(voter), "--learner"])


@pytest.mark.parametrize("key", ["force_new_cluster", "restore", "learner"])
def test_a_one_start_flag_in_a_config_file_is_refused_as_a_flag_only(key, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f"{key} = true\n")
    with pytest.raises(ConfigError, match=f"--{key.replace('_', '-')} is a flag only"):
        parse_settings(
            ["--id", "n1", "--peers", PEERS, "--data-dir", str(tmp_path / "d")]
            + ["--config", str(config)]
        )
