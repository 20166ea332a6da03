"""The ``raftfast-node`` command: run one node of a raftfast cluster.

::

    raftfast-node --id n1 --listen 127.0.0.1:7001 \\
        --peers n1=127.0.0.1:7001,n2=127.0.0.1:7002,n3=127.0.0.1:7003 --data-dir ./data/n1

Settings come from, highest precedence first: command-line flags, ``RAFTFAST_*`` environment
variables (the flag's name in capitals: ``--max-key-bytes`` is ``RAFTFAST_MAX_KEY_BYTES``; also
``RAFTFAST_NO_FSYNC=1`` or ``RAFTFAST_FSYNC=0``, and ``RAFTFAST_CONFIG``), a TOML file
(``--config``; the flag's name with underscores as the key: ``max_key_bytes``; ``peers`` as a
table id -> address or the comma string), the identity stored in the data directory, and the
defaults of ``raftfast.server.settings.NodeSettings``. ``--listen`` defaults to this node's
address in ``--peers``.

Ports: ``--listen`` serves clients and, unless ``--peer-listen`` gives peers a port of their
own, peers too. ``--peers`` names the addresses peers dial (so, with ``--peer-listen``, every
node's peer address). TLS (etcd's flags: ``--cert-file --key-file [--trusted-ca-file
--client-cert-auth]`` for clients, ``--peer-cert-file --peer-key-file --peer-trusted-ca-file``
for peers) needs the two ports apart. ``--auth-roles FILE`` gives client certificates roles
(docs/security.md).

Observing it (docs/operations.md, "Monitoring"): ``--metrics-listen HOST:PORT`` serves
Prometheus metrics at ``/metrics`` (off by default); ``--log-format json`` writes one JSON
object per log line (time, level, node, term, message, fields) instead of text. The client
port always serves gRPC health checking and reflection.

Joining a running cluster: ``--join HOST:PORT`` (any member's peer address) with ``--id``,
``--listen`` (and ``--peer-listen``) and an empty ``--data-dir``, and no ``--peers``: the node
asks the cluster to add it as a learner, catches up, and is promoted to voter. The
configuration then lives in the replicated log.

Identity: the first start writes ``<data-dir>/node.json`` (id, listen, peer listen, peers,
cluster id) atomically; a restart needs only ``--data-dir``. Settings that name another id or
cluster id than the stored ones are refused (that data belongs to another node); a changed
listen address or peer list replaces the stored one.

Exit codes: 2 for bad flags or configuration (one line on stderr, no traceback), 1 when the
node fails (storage, address in use...), 130 on Ctrl-C; 0 after a clean shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import ipaddress
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, NoReturn

import raftfast._grpc_quiet  # noqa: F401 - first: before anything imports gRPC
from raftfast._version import __version__, version_text
from raftfast.address import ADDRESS_FORM, is_address, is_host_port, members_at_one_place
from raftfast.errors import CorruptionError, FormatVersionError, RaftfastError, StorageError
from raftfast.heap import keep_big_blocks_mapped
from raftfast.security.roles import read_toml
from raftfast.server import descriptors
from raftfast.server.settings import LOG_FORMATS, PEER_STREAMS, READ_MODES, NodeSettings
from raftfast.statemachine import StateMachine, missing_methods
from raftfast.storage.fsutil import (
    DIR_MODE,
    lock_directory,
    read_small_file,
    write_file_atomically,
)

__all__ = [
    "IDENTITY_FILE",
    "ConfigError",
    "build_parser",
    "identity_path",
    "load_identity",
    "main",
    "parse_settings",
    "write_identity",
]

PROG = "raftfast-node"
IDENTITY_FILE = "node.json"
_MAX_IDENTITY_BYTES = 1 << 20  # (a few hundred bytes; a link to /dev/zero is not read forever)
IDENTITY_FORMAT = 1  # node.json's "format"; a newer one is refused at start
_IDENTITY_KEYS = ("id", "listen", "peer_listen", "peers", "cluster_id", "join", "state_machine")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

UNSAFE_WARNING = (
    f"{PROG}: WARNING: fsync is disabled (--no-fsync): this is UNSAFE - acknowledged writes "
    "can be lost or the log corrupted on power failure or OS crash; use it only for tests "
    "and benchmarks"
)


class ConfigError(ValueError):
    """Bad flags, environment or configuration file; the message is one line."""


# ---------------------------------------------------------------------------------- converters


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {type(value).__name__}")
    value = value.strip()
    if not value:
        raise ConfigError(f"{where} must not be empty")
    if "\x00" in value:  # (only a config file can hold one: a path with it was "corrupt data")
        raise ConfigError(f"{where} must not contain a NUL byte")
    return value


def _address(value: Any, where: str, stored: bool = False) -> str:
    """A HOST:PORT setting; ``stored``: read from node.json, which an older raftfast may have
    written (the rule then: ``is_host_port``; a node must start again after an upgrade: an
    IPv6 host written without brackets gets them)."""
    addr = _str(value, where)
    if not (is_host_port if stored else is_address)(addr):
        raise ConfigError(f"{where}: bad address {addr!r} (want {ADDRESS_FORM})")
    if stored and not is_address(addr):
        host, _, port = addr.rpartition(":")
        with contextlib.suppress(ValueError):
            ipaddress.IPv6Address(host)
            addr = f"[{host}]:{port}"  # (as written: not rewritten in IPv6's short form)
    return addr


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{where} must be an integer, got {value!r}")


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ConfigError(f"{where} must be a boolean (1/0, true/false, yes/no, on/off), got {value!r}")


def _peers(value: Any, where: str, stored: bool = False) -> dict[str, str]:
    peers: dict[str, str] = {}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, str):
        items = []
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            nid, sep, addr = part.partition("=")
            if not sep:
                raise ConfigError(f"{where}: bad entry {part!r} (want ID=HOST:PORT,...)")
            items.append((nid.strip(), addr.strip()))
    else:
        raise ConfigError(f"{where} must be a table or 'ID=HOST:PORT,...', not {value!r}")
    for nid, addr in items:
        if not isinstance(nid, str) or not nid:
            raise ConfigError(f"{where}: empty node id (want ID=HOST:PORT,...)")
        if nid in peers:
            raise ConfigError(f"{where}: node id {nid!r} appears twice")
        peers[nid] = _address(addr, f"{where} {nid}", stored)
    if not peers:
        raise ConfigError(f"{where} must name at least one node (want ID=HOST:PORT,...)")
    return peers


_MIN_SEGMENT_BYTES = 4096


def _segment_bytes(value: Any, where: str) -> int:
    n = _int(value, where)
    if n < _MIN_SEGMENT_BYTES:
        raise ConfigError(f"{where} must be at least {_MIN_SEGMENT_BYTES}, got {n}")
    return n


def _one_of(choices: Sequence[str]) -> Callable[[Any, str], str]:
    """A converter of a case-insensitive choice among ``choices``."""

    def convert(value: Any, where: str) -> str:
        kind = _str(value, where).lower()
        if kind not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        return kind

    return convert


_read_mode = _one_of(READ_MODES)
_log_format = _one_of(LOG_FORMATS)


def _log_level(value: Any, where: str) -> str:
    level = _str(value, where).upper()
    level = "WARNING" if level == "WARN" else level
    if level not in _LOG_LEVELS:
        raise ConfigError(f"{where} must be one of {', '.join(_LOG_LEVELS)}, got {value!r}")
    return level


def _factory(value: Any, where: str) -> str:
    spec = _str(value, where)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name.isidentifier():
        raise ConfigError(f"{where} must be package.module:Class, got {spec!r}")
    return spec


def load_state_machine(spec: str) -> StateMachine | None:
    """An instance of the ``package.module:Class`` state machine (None for ""). ConfigError
    with one line if it cannot be made."""
    if not spec:
        return None
    module_name, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), name)
        machine = factory()
    except Exception as exc:  # noqa: BLE001 - the user's code: one line, whatever it raised
        raise ConfigError(
            f"--state-machine {spec}: cannot make it ({type(exc).__name__}: {exc})"
        ) from None
    missing = missing_methods(machine)
    if missing:
        raise ConfigError(f"--state-machine {spec}: it has no {', '.join(missing)}")
    return machine


def _retention(value: Any, where: str) -> str:
    """etcd's --auto-compaction-retention: text ("1h", "1000"), or in TOML a count too."""
    if type(value) is int and value >= 0:  # (retention = 1000 in a config file)
        return str(value)
    return _str(value, where)


def _stream_kind(value: Any, where: str) -> str:
    kind = _str(value, where).lower()
    if kind not in PEER_STREAMS:
        raise ConfigError(f"{where} must be one of {', '.join(PEER_STREAMS)}, got {kind!r}")
    return kind


_CONVERT: dict[str, Callable[[Any, str], Any]] = {
    "id": _str,
    "listen": _address,
    "peers": _peers,
    "data_dir": _str,
    "cluster_id": _str,
    "fsync": _bool,
    "read_mode": _read_mode,
    "tick_ms": _int,
    "election_ticks": _int,
    "heartbeat_ticks": _int,
    "max_key_bytes": _int,
    "max_value_bytes": _int,
    "max_request_bytes": _int,
    "max_client_connections": _int,
    "log_level": _log_level,
    "log_format": _log_format,
    "metrics_listen": _address,
    "wal_segment_bytes": _segment_bytes,
    "snapshot_entries": _int,
    "snapshot_keep": _int,
    "snapshot_log_bytes": _int,
    "join": _address,
    "peer_stream": _stream_kind,
    "peer_stream_port": _int,
    "client_stream": _stream_kind,
    "client_stream_port": _int,
    "peer_listen": _address,
    "cert_file": _str,
    "key_file": _str,
    "trusted_ca_file": _str,
    "client_cert_auth": _bool,
    "peer_cert_file": _str,
    "peer_key_file": _str,
    "peer_trusted_ca_file": _str,
    "auth_roles": _str,
    "quota_backend_bytes": _int,
    "auto_compaction_mode": _str,
    "auto_compaction_retention": _retention,
    "state_machine": _factory,
}
_SETTINGS_FIELDS = {f.name for f in fields(NodeSettings)}
assert set(_CONVERT) <= _SETTINGS_FIELDS

_ENV = {f"RAFTFAST_{key.upper()}": key for key in _CONVERT}  # RAFTFAST_FSYNC=0 too

# A TOML file has integers and booleans of its own: there, "25" and 1 are slips (the
# environment and flags are text, and their converters parse it).
_TOML_INTEGERS = {key for key, convert in _CONVERT.items() if convert in (_int, _segment_bytes)}
_TOML_BOOLEANS = {key for key, convert in _CONVERT.items() if convert is _bool}


def _check_toml_type(key: str, value: Any, where: str) -> None:
    if key in _TOML_INTEGERS and type(value) is not int:
        raise ConfigError(f'{where} must be an integer (a TOML one: 25, not "25"), got {value!r}')
    if key in _TOML_BOOLEANS and type(value) is not bool:
        raise ConfigError(f"{where} must be a boolean (TOML true or false), got {value!r}")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


# ---------------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Run one node of a raftfast cluster.",
        epilog="Precedence: flags > RAFTFAST_* environment > --config TOML > node.json > "
        "defaults. Exit codes: 2 bad configuration, 1 failure, 0 clean shutdown.",
    )
    p.add_argument("--version", action="version", version=version_text(PROG))
    p.add_argument("--id", help="this node's id (must be a key of --peers)")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to serve on (default: --peers)")
    p.add_argument(
        "--peers", metavar="ID=HOST:PORT,...", help="every founding node, this one included"
    )
    p.add_argument(
        "--join",
        metavar="HOST:PORT",
        help="join the running cluster this member belongs to (instead of --peers)",
    )
    p.add_argument(
        "--learner",
        action="store_true",
        help="with --join: join as a learner and stay one (no vote: a backup, say); without "
        "it a joining node is promoted to voter once caught up",
    )
    p.add_argument("--data-dir", metavar="DIR", help="where the log and node.json live")
    p.add_argument(
        "--force-new-cluster",
        action="store_true",
        help="quorum lost for good: start from this node's data as the only voter of a new "
        "cluster (the others join it again with empty data dirs; docs/operations.md)",
    )
    p.add_argument(
        "--drop-tls",
        action="store_true",
        help="start without the TLS, client certificates or roles this node was started with "
        "before (node.json records them: a restart that left them out is refused otherwise)",
    )
    p.add_argument(
        "--restore",
        metavar="FILE",
        help="start a new cluster from a backup (raftfast snapshot save) in an empty --data-dir;"
        " every founding node restores the same file",
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--cluster-id", metavar="X", help="refuse peers and clients of other clusters")
    p.add_argument(
        "--fsync",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fdatasync the log before acknowledging (default); --no-fsync is UNSAFE",
    )
    p.add_argument("--read-mode", metavar="|".join(READ_MODES), help="default read mode")
    p.add_argument("--tick-ms", metavar="N", help="Raft tick in milliseconds")
    p.add_argument("--election-ticks", metavar="N", help="election timeout in ticks")
    p.add_argument("--heartbeat-ticks", metavar="N", help="heartbeat interval in ticks")
    p.add_argument("--max-key-bytes", metavar="N", help="largest key accepted")
    p.add_argument("--max-value-bytes", metavar="N", help="largest value accepted")
    p.add_argument(
        "--max-request-bytes",
        metavar="N",
        help="largest client request: a put, a Session frame, a put_many (1572864)",
    )
    p.add_argument(
        "--max-client-connections",
        metavar="N",
        help="gRPC connections at once on the client port and on the peer port; more are "
        "closed at once (4096)",
    )
    p.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument(
        "--log-format",
        metavar="|".join(LOG_FORMATS),
        help="text (default) or json: one object per line (time, level, node, term, message, "
        "fields)",
    )
    p.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off)",
    )
    p.add_argument(
        "--snapshot-entries", metavar="N", help="snapshot every N applied entries (100000)"
    )
    p.add_argument(
        "--snapshot-keep", metavar="N", help="log entries kept behind a snapshot (10000)"
    )
    p.add_argument(
        "--peer-stream",
        metavar="|".join(PEER_STREAMS),
        help="replication stream: plain TCP where peers offer it (default) or gRPC only",
    )
    p.add_argument(
        "--peer-stream-port",
        metavar="N",
        help="TCP port for replication on the --listen host (default 0: any free port; "
        "peers learn it over gRPC)",
    )
    p.add_argument(
        "--client-stream",
        metavar="|".join(PEER_STREAMS),
        help="clients' Session stream: also over plain TCP (default) or the gRPC call only",
    )
    p.add_argument(
        "--client-stream-port",
        metavar="N",
        help="TCP port of the clients' Session stream on the --listen host (default 0: any "
        "free port; clients learn it from Status)",
    )
    p.add_argument(
        "--state-machine",
        metavar="MODULE:CLASS",
        help="replicate this StateMachine (raftfast.StateMachine) instead of the KV store; "
        "clients use Propose and Query",
    )
    p.add_argument(
        "--quota-backend-bytes",
        metavar="N",
        help="refuse writes (NOSPACE alarm) past N bytes of keys and values (2 GiB)",
    )
    p.add_argument(
        "--auto-compaction-mode",
        metavar="revision|periodic",
        help="how the etcd API's history is compacted (default revision)",
    )
    p.add_argument(
        "--auto-compaction-retention",
        metavar="N|DURATION",
        help="revisions of etcd history kept (revision mode; default 100000), or how long "
        "(periodic mode: 1h, 30m, or hours); 0 keeps it all",
    )
    sec = p.add_argument_group("ports and security (docs/security.md)")
    sec.add_argument(
        "--peer-listen",
        metavar="HOST:PORT",
        help="serve peers on a port of their own (default: --listen; required with TLS)",
    )
    sec.add_argument("--cert-file", metavar="FILE", help="TLS certificate for clients (PEM)")
    sec.add_argument("--key-file", metavar="FILE", help="its private key")
    sec.add_argument("--trusted-ca-file", metavar="FILE", help="CA that signs client certificates")
    sec.add_argument(
        "--client-cert-auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clients must present a certificate signed by --trusted-ca-file",
    )
    sec.add_argument("--peer-cert-file", metavar="FILE", help="TLS certificate for peers")
    sec.add_argument("--peer-key-file", metavar="FILE", help="its private key")
    sec.add_argument(
        "--peer-trusted-ca-file", metavar="FILE", help="CA that signs every peer certificate"
    )
    sec.add_argument(
        "--auth-roles",
        metavar="FILE",
        help="TOML [roles]: client certificate name = read | write | admin",
    )
    adv = p.add_argument_group("advanced")
    adv.add_argument(
        "--snapshot-log-bytes",
        metavar="N",
        help="snapshot also when the log held in memory passes N bytes (default 32 MiB)",
    )
    adv.add_argument(
        "--wal-segment-bytes",
        metavar="N",
        help="WAL segment size before rotation (default 64 MiB; small values are for tests)",
    )
    return p


# ---------------------------------------------------------------------------------- sources


_FLAGS_ONLY = ("force_new_cluster", "restore", "learner")


def _from_toml(path: str) -> dict[str, tuple[Any, str]]:
    try:
        data = read_toml(path, "config file")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out: dict[str, tuple[Any, str]] = {}
    name = os.path.basename(path)
    for key, value in data.items():
        if key in _FLAGS_ONLY:
            raise ConfigError(
                f"{key!r} in {path}: --{key.replace('_', '-')} is a flag only (one start's: a "
                "file would repeat it at every start)"
            )
        if key not in _CONVERT:
            raise ConfigError(
                f"unknown key {key!r} in {path} (known: {', '.join(sorted(_CONVERT))})"
            )
        where = f"{name}: {key}"
        _check_toml_type(key, value, where)
        out[key] = (_CONVERT[key](value, where), where)
    return out


def _from_env(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for var, key in _ENV.items():
        value = environ.get(var, "")
        if value.strip():
            out[key] = (_CONVERT[key](value, var), var)
    no_fsync = environ.get("RAFTFAST_NO_FSYNC", "")
    if no_fsync.strip():
        fsync = not _bool(no_fsync, "RAFTFAST_NO_FSYNC")
        if "fsync" in out and out["fsync"][0] != fsync:
            raise ConfigError("RAFTFAST_FSYNC and RAFTFAST_NO_FSYNC contradict each other")
        out["fsync"] = (fsync, "RAFTFAST_NO_FSYNC")
    return out


def _from_flags(args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for key, convert in _CONVERT.items():
        value = getattr(args, key)
        if value is not None:
            flag = "--no-fsync" if key == "fsync" and value is False else _flag(key)
            out[key] = (convert(value, flag), flag)
    return out


# ---------------------------------------------------------------------------------- identity


def identity_path(data_dir: str) -> str:
    return os.path.join(data_dir, IDENTITY_FILE)


def load_identity(data_dir: str) -> dict[str, Any] | None:
    """The identity stored in ``data_dir``, or None when there is none yet."""
    path = identity_path(data_dir)
    try:
        raw = read_small_file(path, _MAX_IDENTITY_BYTES)
    except FileNotFoundError:
        return None
    except NotADirectoryError:  # (--data-dir names a file: a bad flag)
        raise ConfigError(f"--data-dir {data_dir} is not a directory") from None
    except OSError as exc:  # (a data directory that cannot be read: exit 1, as a damaged one)
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CorruptionError(f"corrupt identity file {path} ({exc}); restore it", path) from None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        fmt = data.get("format", IDENTITY_FORMAT)
        if type(fmt) is not int or fmt < 1:
            raise ValueError(f"bad format {fmt!r}")
        if fmt > IDENTITY_FORMAT:
            raise FormatVersionError(
                f"{path} has format {fmt}, but this raftfast ({__version__}) reads format "
                f"{IDENTITY_FORMAT} only: it was written by a newer raftfast; upgrade raftfast",
                path,
            )
        ident = {
            "id": _str(data["id"], "id"),
            "listen": _address(data["listen"], "listen", stored=True),
            "peers": _peers(data["peers"], "peers", stored=True),
            "cluster_id": _str(data["cluster_id"], "cluster_id"),
            "join": _address(data["join"], "join", stored=True) if data.get("join") else "",
            "peer_listen": (
                _address(data["peer_listen"], "peer_listen", stored=True)
                if data.get("peer_listen")
                else ""
            ),
            "state_machine": (
                _factory(data["state_machine"], "state_machine")
                if data.get("state_machine")
                else ""
            ),
            "secured": _secured(data.get("secured", [])),
            "join_as_learner": data.get("join_as_learner", False) is True,
        }
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        msg = " ".join(str(exc).split())
        raise CorruptionError(
            f"corrupt identity file {path} ({msg}); restore or remove it", path
        ) from None
    return ident


def _identity_of(settings: NodeSettings) -> dict[str, Any]:
    return {
        "format": IDENTITY_FORMAT,
        "id": settings.id,
        "listen": settings.listen,
        "peers": dict(settings.peers),
        "cluster_id": settings.cluster_id,
        "join": settings.join,
        "peer_listen": settings.peer_listen,
        "state_machine": settings.state_machine,
        "secured": _secured_by(settings),
        "join_as_learner": settings.join_as_learner,
    }


# What a node was started with that a restart must not drop unnoticed (node.json "secured"):
# a restart with --data-dir alone came back plain, and with two such nodes a plain majority
# served anyone (a hostile hunt). The flags that give each back, for the refusal.
_SECURED = {
    "peer_tls": "--peer-cert-file, --peer-key-file and --peer-trusted-ca-file",
    "client_tls": "--cert-file and --key-file",
    "client_cert_auth": "--client-cert-auth and --trusted-ca-file",
    "auth_roles": "--auth-roles",  # (without it every certificate is admin)
}


def _secured_by(settings: NodeSettings) -> list[str]:
    on = {
        "peer_tls": bool(settings.peer_cert_file),
        "client_tls": bool(settings.cert_file),
        "client_cert_auth": settings.client_cert_auth,
        "auth_roles": bool(settings.auth_roles),
    }
    return [name for name in _SECURED if on[name]]


def _secured(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(v in _SECURED for v in value):
        raise ValueError(f"secured: {value!r} is not a list of {', '.join(_SECURED)}")
    return list(value)


def _check_still_secured(settings: NodeSettings, stored: dict[str, Any], data_dir: str) -> None:
    """ConfigError if ``settings`` drop a protection the node was started with before."""
    dropped = [name for name in stored["secured"] if name not in _secured_by(settings)]
    if dropped:
        flags = "; ".join(_SECURED[name] for name in dropped)
        raise ConfigError(
            f"this node was started with {', '.join(dropped)} (recorded in "
            f"{identity_path(data_dir)}), which these settings leave out: the node would let "
            f"in more than it did. Start it with its --config file, or with {flags}; to turn "
            "them off for good, add --drop-tls"
        )


def write_identity(settings: NodeSettings) -> bool:
    """Store the node's identity in ``<data_dir>/node.json`` atomically; False if unchanged.

    After a crash the file is either the old one or the new one, complete.
    """
    os.makedirs(settings.data_dir, mode=DIR_MODE, exist_ok=True)
    ident = _identity_of(settings)
    current = load_identity(settings.data_dir)
    if current is not None and all(current[k] == ident[k] for k in (*_IDENTITY_KEYS, "secured")):
        return False
    data = (json.dumps(ident, indent=2, sort_keys=True) + "\n").encode()
    write_file_atomically(identity_path(settings.data_dir), data)
    return True


# ---------------------------------------------------------------------------------- settings


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> NodeSettings:
    """Flags, environment, TOML and the stored identity -> validated NodeSettings.

    Reads ``node.json`` but writes nothing (``write_identity`` does). Raises ConfigError.
    """
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    config_path = args.config or env.get("RAFTFAST_CONFIG", "").strip() or None
    merged: dict[str, tuple[Any, str]] = {}
    if config_path:
        merged.update(_from_toml(config_path))
    merged.update(_from_env(env))
    merged.update(_from_flags(args))

    if "data_dir" not in merged:
        raise ConfigError(
            "--data-dir is required (or RAFTFAST_DATA_DIR, or data_dir in the config file)"
        )
    data_dir = merged["data_dir"][0]
    values: dict[str, Any] = {key: value for key, (value, _) in merged.items()}

    stored = load_identity(data_dir)
    if stored is not None:
        for key in ("id", "cluster_id", "state_machine"):
            if key in merged and merged[key][0] != stored[key]:
                value, where = merged[key]
                raise ConfigError(
                    f"{where} {value!r} contradicts the identity stored in "
                    f"{identity_path(data_dir)} ({key} {stored[key]!r}); that data belongs to "
                    "another node: use the stored value or a fresh --data-dir"
                )
        for key in _IDENTITY_KEYS:
            values.setdefault(key, stored[key])
    else:
        if "id" not in values:
            raise ConfigError(
                f"--id is required on the first start (no {IDENTITY_FILE} in {data_dir})"
            )
        if values.get("join"):
            if "peers" in values:
                raise ConfigError(
                    "--join and --peers exclude each other (a joining node learns "
                    "the members from the cluster)"
                )
            if "listen" not in values:
                raise ConfigError("--join needs --listen (the address the cluster will use)")
            values["peers"] = {values["id"]: values.get("peer_listen") or values["listen"]}
        elif "peers" not in values:
            raise ConfigError(
                f"--peers (or --join) is required on the first start (no {IDENTITY_FILE} in "
                f"{data_dir})"
            )
    if values["id"] not in values["peers"]:
        raise ConfigError(
            f"--peers must include this node's id {values['id']!r} "
            f"(peers: {', '.join(values['peers'])})"
        )
    if values.get("peer_listen") and "listen" not in values:
        raise ConfigError("--peer-listen needs --listen (where clients connect)")
    values.setdefault("listen", values["peers"][values["id"]])
    # (flags only: a config file must not repeat them at every start)
    values["force_new_cluster"] = args.force_new_cluster
    if args.learner and not values.get("join"):
        raise ConfigError("--learner goes with --join (a node joining as a learner)")
    if stored is not None and args.learner and not stored["join_as_learner"]:
        raise ConfigError(
            "--learner is for a node's first start, with --join; to make a member a learner: "
            "raftfast member demote"
        )
    # (stored: a restart before the join was done asks again, as a learner still)
    values["join_as_learner"] = args.learner or bool(stored and stored["join_as_learner"])
    if args.restore is not None and not args.restore.strip():
        # (an unset $BACKUP: starting a new, empty cluster instead would be a surprise)
        raise ConfigError("--restore needs a backup file, got an empty name")
    values["restore"] = args.restore or ""
    settings = NodeSettings(**values)
    try:
        settings.validate()
    except (ValueError, TypeError) as exc:
        raise ConfigError(" ".join(str(exc).split())) from None
    if stored is not None and not args.drop_tls:
        _check_still_secured(settings, stored, data_dir)
    return settings


# ---------------------------------------------------------------------------------- main


def _configure_logging(level: str, log_format: str = "text", node_id: str | None = None) -> None:
    if log_format == "json":
        from raftfast.server.logs import JsonFormatter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter(node_id))
        logging.basicConfig(level=getattr(logging, level, logging.INFO), handlers=[handler])
        logging.captureWarnings(True)  # (Python's warnings as JSON lines too)
        return
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run_serve(settings: NodeSettings, state_machine: StateMachine | None = None) -> None:
    """Run ``raftfast.server.driver.serve`` on uvloop when available (the loop exists first)."""
    from raftfast.server.driver import serve

    loop_factory = None
    if os.environ.get("RAFTFAST_NO_UVLOOP", "").strip().lower() not in _TRUE:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(settings, state_machine))


def _fail(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


def _fail_running(settings: NodeSettings, message: str) -> None:
    """``_fail`` once the node's logging is set up: with --log-format json, a CRITICAL line of
    its own (every line of a JSON node's output is JSON once it runs)."""
    if settings.log_format == "json":
        logging.getLogger("raftfast.node").critical(
            "%s: error: %s", PROG, " ".join(message.split())
        )
    else:
        _fail(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a node; returns the exit code. Bad configuration raises SystemExit(2)."""
    try:
        settings = parse_settings(argv, os.environ)
    except (CorruptionError, StorageError) as exc:  # (or newer than this raftfast reads)
        _fail(str(exc))
        return 1
    except ConfigError as exc:
        _fail(str(exc))
        raise SystemExit(2) from None
    if not settings.fsync and settings.log_format == "text":
        print(UNSAFE_WARNING, file=sys.stderr)  # (with json: a log line, once logging is set)
    try:
        state_machine = load_state_machine(settings.state_machine)
    except ConfigError as exc:
        _fail(str(exc))
        raise SystemExit(2) from None
    # (the strings are checked in parse_settings; this looks the names up, at a first start:
    # n2=localhost:P beside n1=127.0.0.1:P started a node that stayed a pre-candidate, saying
    # little; a restart does not wait on names, nor exits 2 for a resolver's answer of the day)
    first_start = not os.path.exists(os.path.join(settings.data_dir, "node.json"))
    aliased = None
    if first_start and settings.peers:
        aliased = asyncio.run(members_at_one_place(settings.peers))
    if aliased is not None:
        first, second = aliased
        _fail(
            f"--peers: {first} ({settings.peers[first]}) and {second} "
            f"({settings.peers[second]}) reach the same address; each member needs its own"
        )
        raise SystemExit(2)
    try:
        # Before anything is written: a second node on this directory must change nothing.
        lock = lock_directory(settings.data_dir)
    except RaftfastError as exc:
        _fail(str(exc))
        return 1
    try:
        if settings.restore:
            code = _restore(settings, settings.restore)
            if code:
                return code
        return _run_locked(settings, state_machine)
    finally:
        os.close(lock)


def _restore(settings: NodeSettings, path: str) -> int:
    """``--restore``: the backup into the (empty) data directory, its state read by the state
    machine the node will run (a backup of another kind of cluster is refused before anything
    is kept); an exit code if it failed."""
    from raftfast.server.restore import check_state, data_dir_contents, restore_backup

    if settings.join:
        _fail("--restore starts a new cluster: give --peers (the others --join it later)")
        return 2
    held = data_dir_contents(settings.data_dir)
    if held:
        _fail(
            f"--restore needs an empty --data-dir, and {settings.data_dir} holds "
            f"{', '.join(held)}: a node's state is never overwritten"
        )
        return 2
    try:
        info = restore_backup(
            path, settings.data_dir, settings.peers, settings.fsync, settings.state_machine
        )
        check_state(settings.data_dir, load_state_machine(settings.state_machine))  # (a new one)
    except (RaftfastError, OSError, ValueError) as exc:
        _fail(f"cannot restore {path}: {exc}")
        for name in ("wal", "snap"):  # leave the directory empty for the next try
            shutil.rmtree(os.path.join(settings.data_dir, name), ignore_errors=True)
        return 1
    print(
        f"{PROG}: restored {path} (index {info.index}, term {info.term}, {info.size} bytes, "
        f"crc32c {info.crc:08x}) into {settings.data_dir}",
        file=sys.stderr,
    )
    return 0


def _connection_caps(settings: NodeSettings) -> list[int]:
    """What each of the node's listeners may hold at once (raftfast/server/descriptors.py)."""
    from raftfast.server import session_stream
    from raftfast.transport import tcp

    caps = [settings.max_client_connections, tcp.MAX_CONNECTIONS]  # client port, replication
    if settings.client_stream == "tcp":
        caps.append(session_stream.MAX_CONNECTIONS)
    if settings.peer_listen and settings.peer_listen != settings.listen:
        caps.append(settings.max_client_connections)  # the peer port's gRPC server
    return caps


def _run_locked(settings: NodeSettings, state_machine: StateMachine | None) -> int:
    """Store the identity and run the node (the data directory is ours)."""
    try:
        write_identity(settings)
    except ConfigError as exc:
        _fail(str(exc))
        raise SystemExit(2) from None
    except OSError as exc:
        _fail(f"cannot write the identity to {settings.data_dir}: {exc.strerror or exc}")
        return 1
    _configure_logging(settings.log_level, settings.log_format, settings.id)
    keep_big_blocks_mapped()
    short = descriptors.raise_limit(descriptors.needed(_connection_caps(settings)))
    if short is not None:
        logging.getLogger("raftfast.node").warning("%s", short)
    shared_ca = settings.shared_ca_warning()
    if shared_ca is not None:
        logging.getLogger("raftfast.node").warning("%s", shared_ca)
    if not settings.fsync and settings.log_format == "json":
        logging.getLogger("raftfast.node").warning("%s", UNSAFE_WARNING)
    try:
        _run_serve(settings, state_machine)
    except KeyboardInterrupt:
        return 130
    except (RaftfastError, OSError) as exc:
        logging.getLogger("raftfast.node").debug("node failed", exc_info=True)
        _fail_running(settings, f"node {settings.id} failed: {exc}")
        return 1
    except Exception:
        logging.getLogger("raftfast.node").critical("node failed unexpectedly", exc_info=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
