"""etcdctl, etcd's own command-line client (Debian's etcd-client 3.4), against the etcd v3 API
of a real 3-node raftfast cluster: a client no one here wrote.

One cluster for the module (each test uses keys of its own). Every etcdctl run has a timeout;
long-running ones (watch, lease keep-alive, lock, elect) are read line by line with a deadline
and stopped by PID. Nothing sleeps to let things settle: every wait polls a condition. The two
bounded looks for something that must NOT happen (a second locker or campaigner getting in while
the first holds) only give a broken recipe a chance to show itself; they pass or fail on what
the client printed, never on how long anything took.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time

import pytest

from raftfast.etcd.api import API_VERSION, member_id
from raftfast.tools.localcluster import ProcCluster, wait_for

ETCDCTL = shutil.which("etcdctl")
RUN_TIMEOUT = 60.0  # seconds for one etcdctl run (CI is a loaded 2-core machine)
LINE_TIMEOUT = 30.0  # seconds to wait for the next line of a long-running etcdctl
# (no ETCDCTL_* settings from the caller's environment: the flags say everything)
ENV = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
ENV["ETCDCTL_API"] = "3"
COMPACTED = "etcdserver: mvcc: required revision has been compacted"
FUTURE_REV = "etcdserver: mvcc: required revision is a future revision"
LEASE_NOT_FOUND = "etcdserver: requested lease not found"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if ETCDCTL is None:
        pytest.fail(
            "etcdctl is not installed: `make test` installs it (Debian's etcd-client)",
            pytrace=False,
        )
    with ProcCluster(tmp_path_factory.mktemp("etcdctl")) as c:
        c.wait_leader()
        yield c


# -- running etcdctl ------------------------------------------------------------------------


def _command(c: ProcCluster, args, nodes) -> list[str]:
    endpoints = ",".join(c.addrs[n] for n in nodes) if nodes else ",".join(c.endpoints)
    return [
        ETCDCTL,
        f"--endpoints={endpoints}",
        "--dial-timeout=10s",
        "--command-timeout=30s",
        *map(str, args),
    ]


def ctl(c: ProcCluster, *args, nodes=None, stdin=None, ok=True) -> subprocess.CompletedProcess:
    """Run etcdctl to completion (against ``nodes``, default all); it must succeed (``ok``),
    fail (``ok=False``), or either (``ok=None``)."""
    proc = subprocess.run(
        _command(c, args, nodes),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env=ENV,
    )
    if ok is True and proc.returncode != 0:
        raise AssertionError(f"etcdctl {args} exited {proc.returncode}: {proc.stderr[-2000:]}")
    if ok is False and proc.returncode == 0:
        raise AssertionError(f"etcdctl {args} succeeded, expected an error: {proc.stdout}")
    return proc


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """etcdctl's "Error: ..." lines (its client library also logs JSON warnings)."""
    return [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]


def json_of(proc: subprocess.CompletedProcess):
    """The (last) JSON document etcdctl printed (txn -i prints its prompts first)."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("{", "["))]
    assert lines, proc.stdout
    return json.loads(lines[-1])


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str | None) -> str:
    return base64.b64decode(text or "").decode()


def put(c: ProcCluster, key: str, value: str, *flags, nodes=None) -> int:
    """Put and return the revision it made."""
    return json_of(ctl(c, "put", key, value, *flags, "-w", "json", nodes=nodes))["header"][
        "revision"
    ]


def get(c: ProcCluster, key: str, *flags, nodes=None) -> dict:
    return json_of(ctl(c, "get", key, *flags, "-w", "json", nodes=nodes))


def kv_pairs(response: dict) -> list[tuple[str, str]]:
    return [(unb64(kv["key"]), unb64(kv.get("value"))) for kv in response.get("kvs") or []]


def leader_and_followers(c: ProcCluster) -> tuple[str, list[str]]:
    leader = c.wait_leader()
    return leader, [n for n in c.ids if n != leader]


class Stream:
    """A long-running etcdctl: its stdout lines come from a reader thread, so a test can wait
    for the next one with a deadline. Stopped (by PID) on the way out of ``with``."""

    def __init__(self, c: ProcCluster, *args, nodes=None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            _command(c, args, nodes),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def line(self, what: str = "a line", timeout: float = LINE_TIMEOUT) -> str | None:
        """The next line (None: etcdctl exited)."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no {what} from etcdctl {self.args} within {timeout}s; "
                f"stderr: {self.stderr[-2000:]}"
            ) from None

    def quiet_for(self, seconds: float, why: str) -> None:
        """Nothing printed during ``seconds`` (a bounded look for something that must not
        happen)."""
        try:
            line = self._lines.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"etcdctl {self.args} printed {line!r}, but {why}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop it (if it still runs); its exit code, once all it wrote to stderr is read
        (a test that checks ``stderr`` after this found it empty on a loaded machine)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=RUN_TIMEOUT)
        self._drainer.join(timeout=RUN_TIMEOUT)
        return code

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(signal.SIGKILL)


class Watch(Stream):
    """``etcdctl watch ... -w json``: its events as (type, key, value, mod_revision)."""

    def __init__(self, c: ProcCluster, *args, nodes=None) -> None:
        super().__init__(c, "watch", *args, "-w", "json", nodes=nodes)
        self._events: list[tuple[str, str, str, int]] = []

    def events(self, n: int, timeout: float = LINE_TIMEOUT) -> list[tuple[str, str, str, int]]:
        """The next ``n`` events (whatever responses they came in)."""
        deadline = time.monotonic() + timeout
        while len(self._events) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"only {self._events} of {n} events within {timeout}s")
            line = self.line(f"{n} events (have {self._events})", remaining)
            assert line is not None, f"the watch ended; stderr: {self.stderr[-2000:]}"
            if not line.startswith("{"):
                continue
            response = json.loads(line)
            assert not response.get("Canceled"), response
            for ev in response.get("Events") or []:
                kv = ev["kv"]
                kind = "DELETE" if ev.get("type") == 1 else "PUT"
                self._events.append(
                    (kind, unb64(kv["key"]), unb64(kv.get("value")), kv["mod_revision"])
                )
        out, self._events = self._events[:n], self._events[n:]
        return out


# -- KV -------------------------------------------------------------------------------------


def test_put_get_prefix_and_delete_count(cluster):
    _, followers = leader_and_followers(cluster)
    for key, value in [("p/a", "1"), ("p/b", "2"), ("p/c", "3"), ("q/x", "9")]:
        assert ctl(cluster, "put", key, value).stdout.strip() == "OK"
    assert ctl(cluster, "get", "p/", "--prefix").stdout.splitlines() == [
        "p/a",
        "1",
        "p/b",
        "2",
        "p/c",
        "3",
    ]
    # a linearizable read through a follower alone sees every acknowledged write
    keys = ctl(cluster, "get", "p/", "--prefix", "--keys-only", nodes=[followers[0]]).stdout
    assert [k for k in keys.splitlines() if k] == ["p/a", "p/b", "p/c"]
    limited = get(cluster, "p/", "--prefix", "--limit", "2")
    assert kv_pairs(limited) == [("p/a", "1"), ("p/b", "2")]
    assert limited["count"] == 3 and limited["more"] is True
    assert ctl(cluster, "del", "p/", "--prefix").stdout.strip() == "3"
    assert ctl(cluster, "del", "p/", "--prefix").stdout.strip() == "0"
    assert ctl(cluster, "get", "p/", "--prefix").stdout == ""
    assert ctl(cluster, "get", "q/x", "--print-value-only").stdout.strip() == "9"


def test_get_json_has_revisions_and_version(cluster):
    r1 = put(cluster, "j/k", "v1")
    r2 = put(cluster, "j/k", "v2")
    assert r2 > r1
    response = get(cluster, "j/k")
    assert response["count"] == 1 and response["header"]["revision"] >= r2
    (kv,) = response["kvs"]
    assert (kv["key"], kv["value"]) == (b64("j/k"), b64("v2"))
    assert (kv["create_revision"], kv["mod_revision"], kv["version"]) == (r1, r2, 2)
    assert "lease" not in kv  # (0: omitted)
    (old,) = get(cluster, "j/k", "--rev", r1)["kvs"]
    assert (old["value"], old["mod_revision"], old["version"]) == (b64("v1"), r1, 1)
    # deleted and put again: a new generation (version 1, a new create_revision)
    r3 = json_of(ctl(cluster, "del", "j/k", "-w", "json"))["header"]["revision"]
    assert r3 == r2 + 1
    r4 = put(cluster, "j/k", "v3")
    (kv,) = get(cluster, "j/k")["kvs"]
    assert (kv["create_revision"], kv["mod_revision"], kv["version"]) == (r4, r4, 1)
    assert get(cluster, "j/k", "--rev", r3).get("kvs") is None

    # every member answers with the cluster's id, and a serializable read of its own state
    # catches up with the write
    def caught_up(nid: str) -> dict | None:
        view = get(cluster, "j/k", "--consistency=s", nodes=[nid])
        return view if view["header"]["revision"] >= r4 else None

    ids = set()
    for nid in cluster.ids:
        view = wait_for(f"{nid} to apply revision {r4}", lambda nid=nid: caught_up(nid))
        assert view["header"]["member_id"] == member_id(nid)
        assert view["kvs"][0]["mod_revision"] == r4
        ids.add(view["header"]["cluster_id"])
    assert len(ids) == 1


def test_txn_with_interactive_input(cluster):
    r_a = put(cluster, "t/k", "a")
    put(cluster, "t/other", "x")
    # success: every compare holds
    stdin = 'value("t/k") = "a"\nversion("t/other") = "1"\n\nput t/k b\nget t/other\n\n'
    stdin += "put t/failed yes\n\n"
    response = json_of(ctl(cluster, "txn", "-i", "-w", "json", stdin=stdin))
    assert response["succeeded"] is True
    put_response, range_response = (r["Response"] for r in response["responses"])
    assert "ResponsePut" in put_response
    got = range_response["ResponseRange"]
    assert [(unb64(kv["key"]), unb64(kv["value"])) for kv in got["kvs"]] == [("t/other", "x")]
    r_b = response["header"]["revision"]
    assert kv_pairs(get(cluster, "t/k")) == [("t/k", "b")]
    assert get(cluster, "t/failed").get("kvs") is None
    # failure: the value compare no longer holds; the failure branch runs, in order
    stdin = 'value("t/k") = "a"\n\nput t/k c\n\nput t/failed yes\nget t/failed\n\n'
    out = ctl(cluster, "txn", "-i", stdin=stdin).stdout.splitlines()
    assert out[out.index("FAILURE") :] == ["FAILURE", "", "OK", "", "t/failed", "yes"]
    assert kv_pairs(get(cluster, "t/k")) == [("t/k", "b")]
    # compares of revisions (mod, create) and of an absent key's version; a read in a txn at
    # a past revision sees that revision (as etcd's does)
    stdin = (
        f'mod("t/k") = "{r_b}"\ncreate("t/k") < "{r_b}"\nversion("t/none") = "0"\n\n'
        f"get t/k --rev {r_a}\ndel t/failed\n\n\n"
    )
    response = json_of(ctl(cluster, "txn", "-w", "json", stdin=stdin))
    assert response["succeeded"] is True
    old, deleted = (r["Response"] for r in response["responses"])
    (kv,) = old["ResponseRange"]["kvs"]
    assert (unb64(kv["value"]), kv["mod_revision"]) == ("a", r_a)
    assert deleted["ResponseDeleteRange"]["deleted"] == 1
    # a compare that does not hold, no failure ops: nothing happens
    stdin = f'mod("t/k") > "{r_b}"\n\nput t/k z\n\n\n'
    response = json_of(ctl(cluster, "txn", "-w", "json", stdin=stdin))
    assert not response.get("succeeded") and not response.get("responses")
    assert kv_pairs(get(cluster, "t/k")) == [("t/k", "b")]


# -- watch and compaction -------------------------------------------------------------------


def test_watch_on_a_follower_from_a_past_revision(cluster):
    _, followers = leader_and_followers(cluster)
    revs = [put(cluster, f"w/{i}", f"v{i}") for i in range(3)]
    with Watch(cluster, "w/", "--prefix", "--rev", revs[0], nodes=[followers[0]]) as w:
        assert w.events(3) == [("PUT", f"w/{i}", f"v{i}", revs[i]) for i in range(3)]
        r3 = put(cluster, "w/3", "v3")
        r4 = json_of(ctl(cluster, "del", "w/0", "-w", "json"))["header"]["revision"]
        put(cluster, "x/unwatched", "-")
        assert w.events(2) == [("PUT", "w/3", "v3", r3), ("DELETE", "w/0", "", r4)]
        # nothing repeated, nothing else: the next event is the next write
        r5 = put(cluster, "w/end", "e")
        assert w.events(1) == [("PUT", "w/end", "e", r5)]


def test_compaction_refuses_reads_and_watches_before_it(cluster):
    _, followers = leader_and_followers(cluster)
    follower = followers[0]
    r1 = put(cluster, "c/k", "1")
    r2 = put(cluster, "c/k", "2")
    r3 = put(cluster, "c/k", "3")
    assert ctl(cluster, "compaction", r2).stdout.strip() == f"compacted revision {r2}"
    # (the compaction is applied by every member: the follower's own state has it)
    wait_for(
        f"{follower} to apply the compaction",
        lambda: (
            COMPACTED
            in ctl(
                cluster, "get", "c/k", "--rev", r1, "--consistency=s", nodes=[follower], ok=None
            ).stderr
        ),
    )
    failed = ctl(cluster, "get", "c/k", "--rev", r1, ok=False)
    assert error_lines(failed) == [f"Error: {COMPACTED}"]
    assert kv_pairs(get(cluster, "c/k", "--rev", r2)) == [("c/k", "2")]
    assert error_lines(ctl(cluster, "compaction", r2, ok=False)) == [f"Error: {COMPACTED}"]
    future = ctl(cluster, "compaction", r3 + 1000, ok=False)
    assert error_lines(future) == [f"Error: {FUTURE_REV}"]
    # a watch from before the compaction is canceled, saying why
    with Watch(cluster, "c/k", "--rev", r1, nodes=[follower]) as w:
        response = json.loads(w.line("the canceled watch's response"))
        assert response["Canceled"] is True and response["CompactRevision"] == r2
        assert not response["Events"]
        assert w.line("the end of the canceled watch") is None  # (etcdctl exits)
        assert w.stop() != 0
        assert f"watch was canceled ({COMPACTED})" in w.stderr
    # from the compaction revision itself: its change is still there (as etcd keeps it)
    with Watch(cluster, "c/k", "--rev", r2, nodes=[follower]) as w:
        assert w.events(2) == [("PUT", "c/k", "2", r2), ("PUT", "c/k", "3", r3)]


def test_errors_carry_etcds_messages(cluster):
    """Clients map errors by their message (clientv3's rpctypes): etcdctl prints the bare
    message only when it recognised it (else "rpc error: code = ... desc = ...")."""
    r1 = put(cluster, "e/k", "1")
    put(cluster, "e/k", "2")
    ctl(cluster, "compaction", r1 + 1)
    failed = ctl(cluster, "get", "e/k", "--rev", r1, ok=False)
    assert error_lines(failed) == [f"Error: {COMPACTED}"]
    failed = ctl(cluster, "put", "e/k", "3", "--lease", "1234abcd", ok=False)
    assert error_lines(failed) == [f"Error: {LEASE_NOT_FOUND}"]
    failed = ctl(cluster, "lease", "revoke", "1234abcd", ok=False)
    assert error_lines(failed) == [f"Error: failed to revoke lease ({LEASE_NOT_FOUND})"]
    assert kv_pairs(get(cluster, "e/k")) == [("e/k", "2")]


# -- leases ---------------------------------------------------------------------------------


def test_lease_keep_alive_keeps_a_key_then_it_expires(cluster):
    ttl = 3  # (etcdctl renews every TTL/3: 1 s, 2 s of slack on a loaded machine)
    grant = json_of(ctl(cluster, "lease", "grant", ttl, "-w", "json"))
    lease, granted_at = grant["ID"], time.monotonic()
    assert grant["TTL"] == ttl
    hex_id = format(lease, "016x")  # (as etcdctl prints lease ids)
    put(cluster, "l/k", "v", "--lease", hex_id)
    (kv,) = get(cluster, "l/k")["kvs"]
    assert kv["lease"] == lease
    info = json_of(ctl(cluster, "lease", "timetolive", hex_id, "--keys", "-w", "json"))
    assert (info["id"], info["granted-ttl"]) == (lease, ttl)
    assert 0 <= info["ttl"] < ttl  # (whole seconds left, cut as etcd's: 2 just after a grant of 3)
    assert [unb64(k) for k in info["keys"]] == ["l/k"]
    assert lease in [
        int(x["id"]) for x in json_of(ctl(cluster, "lease", "list", "-w", "json"))["leases"]
    ]
    with Stream(cluster, "lease", "keep-alive", hex_id) as keeper:
        assert keeper.line("a keep-alive") == f"lease {hex_id} keepalived with TTL({ttl})"
        # the key outlives its TTL while the keep-alive runs
        while time.monotonic() < granted_at + ttl + 2:
            assert kv_pairs(get(cluster, "l/k")) == [("l/k", "v")]
            time.sleep(0.2)  # (a check every 0.2 s while the time passes)
        assert keeper.line("another keep-alive") == f"lease {hex_id} keepalived with TTL({ttl})"
        keeper.stop()
    # no one renews it now: it expires, and its key goes with it
    wait_for("the lease's key to go", lambda: get(cluster, "l/k").get("kvs") is None)
    info = json_of(ctl(cluster, "lease", "timetolive", hex_id, "-w", "json"))
    assert info["ttl"] == -1
    said = ctl(cluster, "lease", "timetolive", hex_id).stdout.strip()
    assert said == f"lease {hex_id} already expired"
    failed = ctl(cluster, "lease", "keep-alive", "--once", hex_id, ok=False)
    assert "not found" in failed.stderr or "expired" in failed.stderr, failed.stderr


# -- cluster --------------------------------------------------------------------------------


def test_member_list(cluster):
    response = json_of(ctl(cluster, "member", "list", "-w", "json"))
    members = sorted(response["members"], key=lambda m: m["name"])
    assert [m["name"] for m in members] == ["n1", "n2", "n3"]
    for m in members:
        assert m["ID"] == member_id(m["name"])
        assert m["clientURLs"] == [f"http://{cluster.addrs[m['name']]}"]
        assert not m.get("isLearner")
    # the simple format: hex ids, "started"
    rows = [line.split(", ") for line in ctl(cluster, "member", "list").stdout.splitlines()]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted(
        (format(member_id(n), "x"), "started", n) for n in cluster.ids
    )
    # a member added but never started: no name, no client URLs, "unstarted" (etcd's; it said
    # "started", named and with a made-up client URL: a script waiting for it went on at once)
    added = json_of(ctl(cluster, "member", "add", "newbie", "--learner",
                        "--peer-urls=http://127.0.0.1:9", "-w", "json"))  # fmt: skip
    new = format(added["member"]["ID"], "x")
    try:
        rows = [line.split(", ") for line in ctl(cluster, "member", "list").stdout.splitlines()]
        [row] = [r for r in rows if r[0] == new]
        assert row[1:5] == ["unstarted", "", "http://127.0.0.1:9", ""] and row[5] == "true", row
    finally:
        ctl(cluster, "member", "remove", new)
    # every member gives the same list
    for nid in cluster.ids:
        again = json_of(ctl(cluster, "member", "list", "-w", "json", nodes=[nid]))
        assert sorted(m["ID"] for m in again["members"]) == sorted(m["ID"] for m in members)
        assert again["header"]["cluster_id"] == response["header"]["cluster_id"]


def test_endpoint_hashkv_and_hash_agree_on_every_member(cluster):
    import grpc

    from raftfast.proto.etcd import rpc_pb2 as pb
    from raftfast.proto.etcd import rpc_pb2_grpc as pb_grpc

    ctl(cluster, "put", "hash-me", "1")

    def hashes():
        rows = json_of(ctl(cluster, "endpoint", "hashkv", "-w", "json"))
        got = {row["Endpoint"]: row["HashKV"].get("hash", 0) for row in rows}
        agreed = len(got) == 3 and len(set(got.values())) == 1 and 0 not in got.values()
        return got if agreed else None

    hashkv = wait_for("the members to agree on HashKV", hashes)
    for nid, addr in cluster.addrs.items():  # Maintenance.Hash (no etcdctl command): the same
        with grpc.insecure_channel(addr) as channel:
            got = pb_grpc.MaintenanceStub(channel).Hash(pb.HashRequest(), timeout=RUN_TIMEOUT)
        assert got.hash == hashkv[addr]
        assert got.header.member_id == member_id(nid)


def test_endpoint_status(cluster):
    def agreed():
        rows = json_of(ctl(cluster, "endpoint", "status", "-w", "json"))
        status = {row["Endpoint"]: row["Status"] for row in rows}
        leaders = {s["leader"] for s in status.values()}
        terms = {s["raftTerm"] for s in status.values()}
        return status if len(leaders) == 1 and 0 not in leaders and len(terms) == 1 else None

    status = wait_for("the members to agree on the leader and term", agreed)
    assert set(status) == set(cluster.endpoints)
    leader = cluster.wait_leader()
    for nid, addr in cluster.addrs.items():
        s = status[addr]
        assert s["header"]["member_id"] == member_id(nid)
        assert s["leader"] == member_id(leader)
        assert s["version"] == API_VERSION
        assert s["raftTerm"] >= 1 and s["raftIndex"] >= 1
        assert s["raftAppliedIndex"] >= 1
    # --cluster: the endpoints come from the member list's client URLs
    rows = json_of(ctl(cluster, "endpoint", "status", "--cluster", "-w", "json", nodes=["n1"]))
    assert sorted(row["Endpoint"] for row in rows) == sorted(
        f"http://{a}" for a in cluster.endpoints
    )


def test_alarm_disarm_says_which_alarm_it_cleared(cluster):
    import grpc

    from raftfast.proto.etcd import rpc_pb2 as pb
    from raftfast.proto.etcd import rpc_pb2_grpc as pb_grpc

    leader = cluster.wait_leader()
    with grpc.insecure_channel(cluster.addrs[leader]) as channel:
        pb_grpc.MaintenanceStub(channel).Alarm(
            pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, alarm=pb.NOSPACE), timeout=RUN_TIMEOUT
        )
    assert "alarm:NOSPACE" in ctl(cluster, "alarm", "list").stdout
    # (as etcd's: what it deactivated; it printed nothing)
    assert "alarm:NOSPACE" in ctl(cluster, "alarm", "disarm").stdout
    assert ctl(cluster, "alarm", "list").stdout.strip() == ""


def test_endpoint_status_says_no_leader_once_the_quorum_is_gone(tmp_path):
    with ProcCluster(tmp_path, 3) as c:
        leader = c.wait_leader()
        for nid in c.ids[:2]:
            c.kill(nid)
        last = c.ids[2]

        def no_leader() -> list[str] | None:
            rows = json_of(ctl(c, "endpoint", "status", "-w", "json", nodes=[last], ok=None))
            errors = rows[0]["Status"].get("errors") or [] if rows else []
            return errors if "etcdserver: no leader" in errors else None

        # (etcd's words, where monitoring looks: its ERRORS column was empty)
        wait_for(f"{last} to say it has no leader (the leader was {leader})", no_leader, 60)


# -- concurrency recipes (sessions on leases, txn, watch) -----------------------------------


def _holders(cluster, prefix: str, want: int | None = None) -> list[str] | None:
    """The keys under ``prefix``, oldest first (the lock's or election's queue); with
    ``want``, None unless there are that many."""
    kvs = get(cluster, prefix, "--prefix").get("kvs") or []
    keys = [unb64(kv["key"]) for kv in sorted(kvs, key=lambda kv: kv["create_revision"])]
    return keys if want is None or len(keys) == want else None


def test_lock_excludes_a_second_locker_until_the_first_exits(cluster):
    name = "lock/a"
    with Stream(cluster, "lock", name) as first:
        key_1 = first.line("the first locker's key")
        assert key_1.startswith(f"{name}/")
        with Stream(cluster, "lock", name) as second:
            queue_ = wait_for(
                "the second locker to queue", lambda: _holders(cluster, f"{name}/", want=2)
            )
            assert queue_[0] == key_1
            second.quiet_for(1.0, "the first locker still holds the lock")
            assert first.stop(signal.SIGTERM) == 0  # (it unlocks)
            key_2 = second.line("the second locker's key, after the first exited")
            assert key_2 == queue_[1]
            assert _holders(cluster, f"{name}/") == [key_2]
            assert second.stop(signal.SIGTERM) == 0
    assert _holders(cluster, f"{name}/") == []


def test_a_lock_held_by_a_killed_locker_goes_when_its_lease_expires(cluster):
    name = "lock/b"
    with Stream(cluster, "lock", "--ttl=2", name) as first:
        key_1 = first.line("the first locker's key")
        with Stream(cluster, "lock", "--ttl=2", name) as second:
            wait_for("the second locker to queue", lambda: _holders(cluster, f"{name}/", want=2))
            first.stop(signal.SIGKILL)  # no unlock: its session's lease expires
            key_2 = second.line("the second locker's key, after the first's lease expired")
            assert key_2 != key_1 and key_2.startswith(f"{name}/")
            assert _holders(cluster, f"{name}/") == [key_2]


def test_election_has_one_leader_and_the_next_takes_over(cluster):
    name = "elect/a"
    with Stream(cluster, "elect", name, "alpha") as alpha:
        key_a = alpha.line("alpha's leader key")
        assert key_a.startswith(f"{name}/") and alpha.line("alpha's proposal") == "alpha"
        with Stream(cluster, "elect", "-l", name) as observer:
            assert observer.line("the observed leader") == key_a
            assert observer.line("the observed proposal") == "alpha"
            with Stream(cluster, "elect", name, "beta") as beta:
                wait_for("beta to campaign", lambda: _holders(cluster, f"{name}/", want=2))
                beta.quiet_for(1.0, "alpha is still the leader")
                assert alpha.stop(signal.SIGINT) == 0  # (it resigns)
                key_b = beta.line("beta's leader key, after alpha resigned")
                assert key_b != key_a and beta.line("beta's proposal") == "beta"
                assert observer.line("the next observed leader") == key_b
                assert observer.line("the next observed proposal") == "beta"
                assert _holders(cluster, f"{name}/") == [key_b]
                assert beta.stop(signal.SIGINT) == 0
    assert _holders(cluster, f"{name}/") == []


# -- leader changes (last: it kills and restarts a member) ----------------------------------


def test_a_watch_on_a_follower_survives_leader_changes(cluster):
    """A watcher on a follower sees every write once, in order, while leadership moves
    (etcdctl move-leader) and then the leader is killed and restarted."""
    leader, (watched, target) = leader_and_followers(cluster)
    start = put(cluster, "lc/start", "-")
    n = 0

    def write(nodes=None) -> None:
        """Create lc/NNN once (a create-if-absent txn: a retry never writes it twice)."""
        nonlocal n
        key = f"lc/{n:03d}"
        stdin = f'create("{key}") = "0"\n\nput {key} {n}\n\n\n'
        wait_for(f"the write of {key}", lambda: ctl(cluster, "txn", stdin=stdin, nodes=nodes), 90)
        n += 1

    killed = None
    with Watch(cluster, "lc/", "--prefix", "--rev", start + 1, nodes=[watched]) as w:
        try:
            for _ in range(5):
                write()
            wait_for(
                f"leadership to move to {target}",
                lambda: (
                    ctl(cluster, "move-leader", format(member_id(target), "x")).returncode == 0
                    and cluster.leader() == target
                ),
                60,
            )
            for _ in range(5):
                write()
            killed = target
            cluster.kill(killed)
            live = [nid for nid in cluster.ids if nid != killed]
            for _ in range(5):
                write(nodes=live)  # (through the election that follows)
            cluster.start(killed, first_time=False)
            killed = None
            for _ in range(5):
                write()
            events = w.events(n, timeout=90)
            assert [(e[0], e[1], e[2]) for e in events] == [
                ("PUT", f"lc/{i:03d}", str(i)) for i in range(n)
            ]
            revisions = [e[3] for e in events]
            assert revisions == sorted(set(revisions))
            end = put(cluster, "lc/end", "-")
            assert w.events(1) == [("PUT", "lc/end", "-", end)]
        finally:
            if killed is not None:
                cluster.start(killed, first_time=False)
    # every member is back, and has applied all of it
    leader = cluster.wait_leader(timeout=60)
    commit = cluster.status(leader).commit_index
    for nid in cluster.ids:
        cluster.wait_applied(nid, commit, f"{nid} to catch up")


# -- backups ----------------------------------------------------------------------------------


def test_snapshot_save_writes_a_backup_the_node_restores(cluster, tmp_path):
    # etcdctl snapshot save (a cron job's backup) gets a raftfast backup file: every key
    # written before it, from the leader or a follower (each member's own state, as etcd's)
    for i in range(50):
        put(cluster, f"snap/{i:02d}", f"v{i}")
    leader, (follower, _) = leader_and_followers(cluster)
    files = {}
    for nid in (leader, follower):
        path = tmp_path / f"{nid}.db"
        saved = ctl(cluster, "snapshot", "save", path, nodes=[nid])
        assert "Snapshot saved at" in saved.stdout + saved.stderr, saved
        files[nid] = path
    put(cluster, "snap/after", "later")
    for nid, path in files.items():
        (tmp_path / f"restored-{nid}").mkdir()
        with ProcCluster(tmp_path / f"restored-{nid}", restore=str(path)) as new:
            new.wait_leader()
            got = json_of(ctl(new, "get", "snap/", "--prefix", "-w", "json"))
            pairs = {unb64(kv["key"]): unb64(kv["value"]) for kv in got["kvs"]}
            assert pairs == {f"snap/{i:02d}": f"v{i}" for i in range(50)}
