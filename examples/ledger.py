"""A state machine of your own, served by ``raftfast-node``: a ledger of accounts.

Commands and queries are JSON (never pickle: anyone who can reach a node can send bytes)::

    {"op": "deposit", "account": "alice", "amount": 5}     -> the new balance
    {"op": "transfer", "from": "alice", "to": "bob", "amount": 2}
    query: "alice"                                        -> alice's balance

Three nodes serving it (clients use ``Client.propose`` and ``Client.query``)::

    PYTHONPATH=examples raftfast-node --state-machine ledger:Ledger --id n1 ...
    raftfast ... (or, in Python:)
    with SyncClient(endpoints) as c:
        c.propose(json.dumps({"op": "deposit", "account": "alice", "amount": 5}))
        c.query("alice")                                   # b"5"
"""

from __future__ import annotations

import json
from typing import BinaryIO

from raftfast import StateMachine


class Ledger(StateMachine):
    def __init__(self) -> None:
        self.balances: dict[str, int] = {}

    def apply(self, index: int, command: bytes) -> bytes | Exception:
        try:
            cmd = json.loads(command)
            op, amount = cmd["op"], int(cmd["amount"])
        except (ValueError, KeyError, TypeError, OverflowError) as exc:  # (Infinity)
            return ValueError(f"bad command: {exc}")  # returned: the proposer's error
        if amount <= 0:
            return ValueError("amounts are positive")
        if op == "deposit":
            account = str(cmd.get("account"))
            self.balances[account] = self.balances.get(account, 0) + amount
            return str(self.balances[account]).encode()
        if op == "transfer":
            source, target = str(cmd.get("from")), str(cmd.get("to"))
            if self.balances.get(source, 0) < amount:
                return ValueError(f"{source} has {self.balances.get(source, 0)}, not {amount}")
            self.balances[source] -= amount
            self.balances[target] = self.balances.get(target, 0) + amount
            return str(self.balances[source]).encode()
        return ValueError(f"unknown op {op!r}")

    def query(self, request: bytes) -> bytes:
        return str(self.balances.get(request.decode(), 0)).encode()

    def snapshot(self, out: BinaryIO) -> None:
        out.write(json.dumps(self.balances, sort_keys=True).encode())

    def restore(self, inp: BinaryIO) -> None:
        self.balances = json.loads(inp.read())


def main() -> int:
    """Three ``raftfast-node --state-machine ledger:Ledger`` processes, a few commands through
    a client; prints one JSON line (exit 0 if the balances are right)."""
    import os
    import tempfile
    from pathlib import Path

    from raftfast import SyncClient
    from raftfast.tools.localcluster import ProcCluster

    here = str(Path(__file__).resolve().parent)
    env = {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(prefix="ledger-") as tmp:
        extra = ["--state-machine", "ledger:Ledger", "--log-level", "WARNING"]
        with ProcCluster(Path(tmp), 3, extra=extra, env=env) as cluster:
            cluster.wait_leader()
            with SyncClient(cluster.endpoints, timeout=30) as c:
                c.propose(json.dumps({"op": "deposit", "account": "alice", "amount": 10}))
                c.propose(json.dumps({"op": "transfer", "from": "alice", "to": "bob", "amount": 3}))
                balances = {who: int(c.query(who)) for who in ("alice", "bob")}
    print(json.dumps(balances))
    return 0 if balances == {"alice": 7, "bob": 3} else 1


if __name__ == "__main__":
    raise SystemExit(main())
