"""The ``raftfast`` command: talk to a raftfast cluster from the shell.

::

    raftfast [--endpoints HOST:PORT,...] [--timeout S] put KEY VALUE
    raftfast get KEY [--read-mode linearizable|lease|stale]
    raftfast delete KEY
    raftfast cas KEY NEW (--expect OLD | --absent)
    raftfast scan PREFIX [--limit N]
    raftfast status [--json]
    raftfast member list [--json] | add ID HOST:PORT [--learner] | promote ID | demote ID
                         | remove ID
    raftfast transfer-leader ID
    raftfast alarm list | disarm
    raftfast snapshot save FILE
    raftfast certs --nodes n1,n2,n3 [--clients NAME=ROLE,...] [--hosts H,...] [--dir tls]
    raftfast bench [--nodes 3,5] [--clients N] [--inflight N] [--batch N] [--duration S]
                   [--value-size B] [--read-ratio F] [--no-fsync] [--noop] [--json] [--out DIR]

Endpoints come from ``--endpoints``, else ``RAFTFAST_ENDPOINTS``, else 127.0.0.1:7001; the
timeout from ``--timeout``, else ``RAFTFAST_TIMEOUT``, else 5 s. TLS: ``--cacert`` (the CA of
the nodes' certificates), ``--cert`` and ``--key`` (a client certificate, when the cluster asks
for one), else ``RAFTFAST_CACERT``, ``RAFTFAST_CERT``, ``RAFTFAST_KEY``. These options may also
follow the command. Keys and values on the command line are taken as the bytes the OS gave (UTF-8
with surrogate escapes); values are printed raw.

Exit codes (``ExitCode``): 0 success; 1 a negative answer (``get``: key not found, ``delete``:
not found, ``cas``: not swapped); 2 a usage error (also an argument the cluster refuses as
invalid); 3 the cluster is unavailable or the deadline passed; 4 permission denied (TLS
certificate or role); 5 the cluster refused the request otherwise (no space, a failed request,
not a raftfast server), or a file could not be written; 6 the answer could not be written
(stdout closed, its reader gone, or its disk full: the request itself was carried out). Errors
are one line on stderr, never a traceback (a reader that went away gets none).

Adding a command: write ``async def _cmd_x(client, args) -> int`` and an ``_add_x(sub, common)``
that registers its subparser with ``set_defaults(handler=_cmd_x)``, and list it in
``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn

from raftfast._version import version_text
from raftfast.client import (
    DEFAULT_ENDPOINT,
    DEFAULT_TIMEOUT,
    READ_MODES,
    Client,
    TLSFiles,
    parse_endpoints,
)
from raftfast.client.tables import format_table
from raftfast.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    PermissionDeniedError,
    RaftfastError,
)

__all__ = ["ExitCode", "build_parser", "main"]


class ExitCode(enum.IntEnum):
    """What the command's exit status means (documented in ``raftfast --help``)."""

    OK = 0
    NEGATIVE = 1  # not found, not swapped
    USAGE = 2  # bad flags or arguments, or an argument the cluster refuses as invalid
    UNAVAILABLE = 3  # no leader reachable, or the deadline passed
    PERMISSION = 4  # the certificate (or its role) may not do this
    FAILED = 5  # refused otherwise: no space, a failed request, not a raftfast server
    OUTPUT = 6  # the answer could not be written to stdout (the request was carried out)


def exit_code_of(exc: BaseException) -> ExitCode:
    """The exit status for an error a command ended with."""
    if isinstance(exc, DeadlineExceededError):  # ClusterUnavailableError too
        return ExitCode.UNAVAILABLE
    if isinstance(exc, PermissionDeniedError):
        return ExitCode.PERMISSION
    if isinstance(exc, InvalidArgumentError | TypeError | ValueError):
        return ExitCode.USAGE
    return ExitCode.FAILED


Handler = Callable[[Client, argparse.Namespace], Awaitable[int]]

# Other nodes of the cluster are asked for their status with at most this deadline, so one
# dead node does not hold the whole command for the full --timeout.
_PEER_STATUS_TIMEOUT = 1.0


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (all) or positive, got {value}")
    return value


def _arg_bytes(text: str) -> bytes:
    return os.fsencode(text)


def _file_name(text: str) -> str:
    if not text.strip():  # (an unset $BACKUP: "cannot write : No such file" said it ill)
        raise argparse.ArgumentTypeError("needs a file name, got an empty one")
    return text


class OutputError(Exception):
    """The answer could not be written to stdout (closed, or its disk full)."""


def _drop_stdout() -> None:
    """What stdout could not take goes nowhere: the interpreter's last flush at exit would
    fail again (a second message, exit status 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # (no stdout at all: nothing to flush)
        pass


def _print(text: str) -> None:
    """A line of the answer on stdout."""
    _write_line(text.encode("utf-8", "surrogateescape"))


def _write_line(data: bytes) -> None:
    """A line of the answer on stdout: raw bytes to the real one (or the buffer of a replaced
    sys.stdout), decoded for a text-only one."""
    stdout = sys.stdout
    if stdout is None:  # (started with stdout closed: `raftfast get k >&-`)
        raise OutputError("stdout is closed")
    try:
        stdout.flush()
        out = getattr(stdout, "buffer", None)
        if out is None:
            stdout.write(data.decode("utf-8", "replace") + "\n")
            stdout.flush()
        else:
            out.write(data + b"\n")
            out.flush()
    except BrokenPipeError:
        raise  # (the reader went away, e.g. `| head`: a quiet exit, see main)
    except (OSError, ValueError) as exc:  # (ValueError: a closed file)
        raise OutputError(getattr(exc, "strerror", None) or str(exc)) from None


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


# ---------------------------------------------------------------------------------- commands


async def _cmd_put(client: Client, args: argparse.Namespace) -> int:
    await client.put(args.key, args.value)
    _print("OK")
    return 0


async def _cmd_get(client: Client, args: argparse.Namespace) -> int:
    value = await client.get(args.key, read_mode=args.read_mode)
    if value is None:
        print("key not found", file=sys.stderr)
        return 1
    _write_line(value)
    return 0


async def _cmd_delete(client: Client, args: argparse.Namespace) -> int:
    if await client.delete(args.key):
        _print("deleted")
        return 0
    _print("not found")
    return 1


async def _cmd_cas(client: Client, args: argparse.Namespace) -> int:
    expected = None if args.absent else args.expect
    if await client.cas(args.key, expected, args.new):
        _print("swapped")
        return 0
    _print("not swapped")
    return 1


async def _cmd_scan(client: Client, args: argparse.Namespace) -> int:
    # (printed a page at a time: a whole keyspace, the default, need not be held at once)
    async for page in client.scan_pages(args.prefix, args.limit, read_mode=args.read_mode):
        for key, value in page:
            _write_line(key + b"\t" + value)
    return 0


async def _cmd_transfer_leader(client: Client, args: argparse.Namespace) -> int:
    leader = await client.transfer_leader(args.target)
    _print(f"leader is now {leader}")
    return 0


# Adding a voter waits for it to catch up before promoting it: longer than one request.
_MEMBER_ADD_MIN_TIMEOUT = 120.0


async def _long_timeout(client: Client, args: argparse.Namespace, floor: float) -> float:
    """The deadline of a long command: at least ``floor`` unless the user chose one
    (--timeout or $RAFTFAST_TIMEOUT: then that, as for any command). A cluster that does not
    answer within the ordinary timeout (down, a wrong endpoint, TLS against plain) fails the
    command then, not ``floor`` later: the members are asked first."""
    if args.timeout is not None:
        return client.timeout
    await client.members(timeout=client.timeout)
    return max(client.timeout, floor)


async def _cmd_member(client: Client, args: argparse.Namespace) -> int:
    action = args.member_action
    if action == "list":
        listing = await client.members()
    elif action == "add":
        timeout = await _long_timeout(client, args, _MEMBER_ADD_MIN_TIMEOUT)
        listing = await client.add_member(
            args.id, args.address, learner=args.learner, timeout=timeout
        )
    else:
        call = {
            "promote": client.promote_member,
            "demote": client.demote_member,
            "remove": client.remove_member,
        }[action]
        listing = await call(args.id)
    if getattr(args, "json", False):
        _print(json.dumps(listing, indent=2, sort_keys=True))
        return 0
    rows = [
        [
            m["id"],
            m["address"],
            m["role"],
            "leader" if m["id"] == listing["leader"] else "",
            m["match_index"],
        ]
        for m in listing["members"]
    ]
    if listing.get("note"):
        _print(listing["note"])
    state = "committed" if listing["committed"] else "not committed yet"
    _print("\n".join(format_table(["ID", "ADDRESS", "ROLE", "", "MATCH"], rows)))
    _print(
        f"cluster {listing['cluster_id']}: configuration at index {listing['config_index']} "
        f"({state}), leader commit {listing['commit_index']}"
    )
    return 0


async def _cmd_alarm(client: Client, args: argparse.Namespace) -> int:
    if args.alarm_action == "disarm":
        answer = await client.disarm_alarms()
    else:
        answer = await client.alarms()
    alarms = answer["alarms"]
    _print(", ".join(alarms) if alarms else "no alarm")
    _print(
        f"state: {answer['state_bytes']} bytes of keys and values; quota {answer['quota_bytes']}"
    )
    return 0


# A backup streams the whole state: give it longer than one request.
_SNAPSHOT_MIN_TIMEOUT = 600.0


async def _cmd_snapshot(client: Client, args: argparse.Namespace) -> int:
    timeout = await _long_timeout(client, args, _SNAPSHOT_MIN_TIMEOUT)
    try:
        info = await client.save_snapshot(args.file, timeout=timeout)
    except RaftfastError:
        raise  # (a deadline is a TimeoutError, so an OSError: not the file's fault)
    except OSError as exc:
        _error(f"cannot write {args.file}: {exc.strerror or exc}")
        return ExitCode.FAILED
    _print(
        f"saved {args.file}: index {info['index']}, term {info['term']}, {info['size']} bytes, "
        f"crc32c {info['crc32c']:08x}"
    )
    return 0


async def _cmd_status(client: Client, args: argparse.Namespace) -> int:
    first = await client.status()
    nodes: list[dict[str, Any]] = [first]
    others = [
        m for m in first.get("members", ()) if m.get("id") != first.get("id") and _client_address(m)
    ]
    timeout = min(client.timeout, _PEER_STATUS_TIMEOUT)

    async def ask(member: dict[str, Any]) -> dict[str, Any]:
        try:
            return await client.status(_client_address(member), timeout=timeout)
        except (RaftfastError, ValueError) as exc:
            return {
                "id": member["id"],
                "endpoint": _client_address(member),
                "error": " ".join(str(exc).split()),
            }

    nodes.extend(await asyncio.gather(*(ask(m) for m in others)))
    # rows in member order (the answering node's view), unknown ids last
    order = {m.get("id"): i for i, m in enumerate(first.get("members", ()))}
    nodes.sort(key=lambda n: order.get(n.get("id"), len(order)))
    if args.json:
        _print(json.dumps(nodes, indent=2, sort_keys=True))
        return 0
    _print_status(nodes, first)
    return 0


def _client_address(member: Mapping[str, Any]) -> str:
    """Where a member serves clients: as the answering node knows it, else its address (the
    same port, unless the cluster serves peers apart)."""
    return member.get("client_address") or member.get("address", "")


def _print_status(nodes: Sequence[Mapping[str, Any]], first: Mapping[str, Any]) -> None:
    """A row per node, then the member list as ``first`` (the node that answered) sees it."""
    rows = []
    for n in nodes:
        if "error" in n:
            rows.append([n["id"], n["endpoint"], "unreachable", "-", "-", "-", "-", "-", "-"])
            continue
        leader = n["leader"] or "-"
        rows.append(
            [
                n["id"],
                n["endpoint"],
                n["role"],
                n["term"],
                leader,
                n["commit_index"],
                n["applied_index"],
                n["last_index"],
                n.get("version") or "-",  # "-": a node too old to tell
            ]
        )
    header = ["ID", "ADDRESS", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED", "LAST", "VERSION"]
    lines = format_table(header, rows)
    members = first.get("members") or []
    lines.append("")
    cluster = first.get("cluster_id") or "?"
    lines.append(f"cluster {cluster}: {len(members)} member(s), as seen by {first['id']}")
    if members:
        member_rows = [[m["id"], m["address"], m["role"], m["match_index"]] for m in members]
        lines.extend(format_table(["ID", "ADDRESS", "ROLE", "MATCH"], member_rows))
    errors = [f"{n['id']} ({n['endpoint']}): {n['error']}" for n in nodes if "error" in n]
    for err in errors:
        lines.append(f"unreachable: {err}")
    if first.get("alarms"):
        lines.append(
            f"ALARM {', '.join(first['alarms'])}: writes other than deletes are refused "
            f"({first.get('state_bytes', 0)} bytes held; see `raftfast alarm`)"
        )
    _print("\n".join(lines))


# ---------------------------------------------------------------------------------- parser


def _add_put(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("put", parents=[common], help="set KEY to VALUE")
    p.add_argument("key", type=_arg_bytes, metavar="KEY")
    p.add_argument("value", type=_arg_bytes, metavar="VALUE")
    p.set_defaults(handler=_cmd_put)


def _add_get(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("get", parents=[common], help="print the value of KEY")
    p.add_argument("key", type=_arg_bytes, metavar="KEY")
    p.add_argument("--read-mode", choices=list(READ_MODES), default=None)
    p.set_defaults(handler=_cmd_get)


def _add_delete(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("delete", parents=[common], help="delete KEY")
    p.add_argument("key", type=_arg_bytes, metavar="KEY")
    p.set_defaults(handler=_cmd_delete)


def _add_cas(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("cas", parents=[common], help="set KEY to NEW if it holds OLD")
    p.add_argument("key", type=_arg_bytes, metavar="KEY")
    p.add_argument("new", type=_arg_bytes, metavar="NEW")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--expect", type=_arg_bytes, metavar="OLD", help="the current value")
    group.add_argument("--absent", action="store_true", help="KEY must not exist")
    p.set_defaults(handler=_cmd_cas)


def _add_scan(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("scan", parents=[common], help="print KEY<TAB>VALUE lines under PREFIX")
    p.add_argument("prefix", type=_arg_bytes, metavar="PREFIX", nargs="?", default=b"")
    # (all by default, as etcdctl's get --prefix: 1,000 cut a dump short with exit 0)
    p.add_argument(
        "--limit", type=_limit, default=0, help="at most N items (default 0: all, page by page)"
    )
    p.add_argument("--read-mode", choices=list(READ_MODES), default=None)
    p.set_defaults(handler=_cmd_scan)


def _add_status(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("status", parents=[common], help="show every node's role, term, indexes")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_cmd_status)


def _add_transfer_leader(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "transfer-leader", parents=[common], help="hand leadership to node ID (no downtime)"
    )
    p.add_argument("target", metavar="ID")
    p.set_defaults(handler=_cmd_transfer_leader)


def _add_bench(sub: Any, common: argparse.ArgumentParser) -> None:
    from raftfast.tools import benchcmd

    p = sub.add_parser(
        "bench",
        parents=[common],
        help="measure throughput and latency (starts a local cluster unless --endpoints)",
        description=benchcmd.__doc__.split("\n\n")[1].replace("\n", " ").replace("``", ""),
    )
    benchcmd.add_arguments(p)
    p.set_defaults(handler=None)


def _add_alarm(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("alarm", parents=[common], help="list or disarm alarms (NOSPACE)")
    actions = p.add_subparsers(dest="alarm_action", metavar="ACTION", required=True)
    actions.add_parser("list", parents=[common], help="the raised alarms and the state's size")
    actions.add_parser(
        "disarm", parents=[common], help="clear NOSPACE once space is freed (delete keys first)"
    )
    p.set_defaults(handler=_cmd_alarm)


def _add_snapshot(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("snapshot", parents=[common], help="back up the cluster's state")
    actions = p.add_subparsers(dest="snapshot_action", metavar="ACTION", required=True)
    save = actions.add_parser(
        "save",
        parents=[common],
        help="write a consistent snapshot of the leader to FILE (restore: raftfast-node --restore)",
    )
    save.add_argument("file", type=_file_name, metavar="FILE")
    p.set_defaults(handler=_cmd_snapshot)


def _add_certs(sub: Any, common: argparse.ArgumentParser) -> None:
    from raftfast.security import certs

    p = sub.add_parser(
        "certs",
        help="make a development CA and the certificates of a TLS cluster",
        description=certs.__doc__.split("\n\n")[0].replace("``", ""),
    )
    certs.add_arguments(p)
    p.set_defaults(handler=None)


def _add_member(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("member", parents=[common], help="list, add, promote, demote or remove")
    actions = p.add_subparsers(dest="member_action", metavar="ACTION", required=True)
    a = actions.add_parser("list", parents=[common], help="voters and learners, with progress")
    a.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = actions.add_parser(
        "add", parents=[common], help="add node ID at HOST:PORT (learner, then voter)"
    )
    a.add_argument("id", metavar="ID")
    a.add_argument("address", metavar="HOST:PORT")
    a.add_argument("--learner", action="store_true", help="keep it a learner (no vote)")
    for name, text in (
        ("promote", "make learner ID a voter"),
        ("demote", "make voter ID a learner"),
        ("remove", "remove node ID (the leader too: it hands over and shuts down)"),
    ):
        a = actions.add_parser(name, parents=[common], help=text)
        a.add_argument("id", metavar="ID")
    p.set_defaults(handler=_cmd_member)


_COMMANDS: list[Callable[[Any, argparse.ArgumentParser], None]] = [
    _add_put,
    _add_get,
    _add_delete,
    _add_cas,
    _add_scan,
    _add_status,
    _add_member,
    _add_transfer_leader,
    _add_alarm,
    _add_snapshot,
    _add_bench,
    _add_certs,
]


_TLS_FLAGS = (  # (flag, environment variable, help); the value lands in tls_<flag>
    ("--cacert", "RAFTFAST_CACERT", "TLS: trust the nodes' certificates signed by this CA"),
    ("--cert", "RAFTFAST_CERT", "TLS: this client certificate, if the cluster asks for one"),
    ("--key", "RAFTFAST_KEY", "TLS: its private key"),
)


def _tls(args: argparse.Namespace) -> TLSFiles | None:
    """TLS material from --cacert/--cert/--key (None: plain connections)."""
    if not (args.tls_cacert or args.tls_cert or args.tls_key):
        return None
    return TLSFiles(args.tls_cacert, args.tls_cert, args.tls_key)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if environ is None else environ
    parser = _Parser(
        prog="raftfast",
        description="Talk to a raftfast cluster.",
        epilog=(
            "Exit codes: 0 ok; 1 not found or not swapped; 2 usage error; 3 cluster unavailable "
            "or deadline passed; 4 permission denied; 5 refused otherwise (e.g. no space); "
            "6 the answer could not be written to stdout."
        ),
    )
    parser.add_argument("--version", action="version", version=version_text("raftfast"))
    parser.add_argument(
        "--endpoints",
        default=env.get("RAFTFAST_ENDPOINTS") or None,
        metavar="HOST:PORT,...",
        help=f"nodes to contact (default: $RAFTFAST_ENDPOINTS or {DEFAULT_ENDPOINT})",
    )
    parser.add_argument(
        "--timeout",
        default=env.get("RAFTFAST_TIMEOUT") or None,
        metavar="S",
        help=(
            f"deadline of each request in seconds (default: $RAFTFAST_TIMEOUT or "
            f"{DEFAULT_TIMEOUT:g}; snapshot save {_SNAPSHOT_MIN_TIMEOUT:g}, member add "
            f"{_MEMBER_ADD_MIN_TIMEOUT:g})"
        ),
    )
    for flag, env_name, text in _TLS_FLAGS:
        parser.add_argument(
            flag,
            dest="tls_" + flag[2:],
            default=env.get(env_name) or None,
            metavar="FILE",
            help=f"{text} (${env_name})",
        )
    # The same options after the command (``raftfast get k --endpoints ...``).
    common = _Parser(add_help=False)
    common.add_argument("--endpoints", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--timeout", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for flag, _, _ in _TLS_FLAGS:
        common.add_argument(
            flag, dest="tls_" + flag[2:], default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(sub, common)
    return parser


async def _run(
    args: argparse.Namespace, endpoints: list[str], timeout: float, tls: TLSFiles | None
) -> int:
    handler: Handler = args.handler
    async with Client(endpoints, timeout=timeout, tls=tls) as client:
        try:
            return await handler(client, args)
        except (RaftfastError, TypeError, ValueError) as exc:
            code = exit_code_of(exc)
            _error(f"invalid argument: {exc}" if code == ExitCode.USAGE else str(exc))
            return code


def _bench(args: argparse.Namespace, endpoints: list[str] | None) -> int:
    from raftfast.tools import benchcmd

    try:
        args.client_tls = _tls(args)  # a running cluster's certificates (--endpoints)
        if args.client_tls is not None:
            args.client_tls.read()  # (here, not in every client process: ValueError)
        return benchcmd.main(args, endpoints)
    except ValueError as exc:
        _error(f"invalid argument: {exc}")
        return ExitCode.USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except benchcmd.BenchFailed as exc:
        _error(f"bench failed: {exc}")
        return exc.code
    except Exception as exc:  # noqa: BLE001 - the CLI promises no tracebacks
        _error(f"bench failed: {type(exc).__name__}: {exc}")
        return ExitCode.FAILED


def _certs(args: argparse.Namespace) -> int:
    from raftfast.security import certs

    try:
        return certs.main(args, _print)
    except OutputError as exc:
        _error(f"wrote the files, but cannot write what they are to stdout: {exc}")
        _drop_stdout()
        return ExitCode.OUTPUT
    except BrokenPipeError:  # (the files are written; the reader of their list went away)
        _drop_stdout()
        return ExitCode.OUTPUT
    except ValueError as exc:
        _error(str(exc))
        return ExitCode.USAGE
    except OSError as exc:  # (not 1, which says "not found": a file that cannot be written)
        _error(f"cannot write the certificates to {args.dir}: {exc.strerror or exc}")
        return ExitCode.FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (usage errors raise SystemExit(2))."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        endpoints = parse_endpoints(DEFAULT_ENDPOINT if args.endpoints is None else args.endpoints)
    except ValueError as exc:
        parser.error(f"--endpoints: {exc}")
    if args.command == "bench":
        return _bench(args, None if args.endpoints is None else endpoints)
    if args.command == "certs":
        return _certs(args)
    try:
        timeout = _positive_float(str(DEFAULT_TIMEOUT) if args.timeout is None else args.timeout)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--timeout: {exc}")
    try:
        tls = _tls(args)
        if tls is not None:
            tls.read()  # a missing or broken file: a usage error, not a failed request
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return asyncio.run(_run(args, endpoints, timeout, tls))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OutputError as exc:
        _error(f"cannot write the answer to stdout: {exc}")
        _drop_stdout()
        return ExitCode.OUTPUT
    except BrokenPipeError:
        # The reader went away (``raftfast scan | head``): the answer was not all written, as
        # with stdout closed (6, not 1: "not found"); quietly, the reader wanted no more.
        _drop_stdout()
        return ExitCode.OUTPUT
    except Exception as exc:  # noqa: BLE001 - the CLI promises no tracebacks
        _error(f"unexpected {type(exc).__name__}: {exc}")
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
