"""The ranges every boundary checks (client API, admin API, peer protocol, settings).

One place, so that what the API accepts and what every persisted format can hold stay the
same: a value that passes these checks fits every field it is stored in (node ids in a WAL
hard-state record, sequences in a snapshot's dedup table, terms and indexes in the log).
"""

from __future__ import annotations

MAX_ID_BYTES = 256  # node ids, everywhere (UTF-8 bytes)
MAX_MEMBERS = 64  # voters and learners of a configuration (each is replicated to)
# Client ids and write sequences are below 2**63: the dedup table stores a client's highest
# sequence as a signed 64-bit field (-1 = none yet), and the client draws 63-bit ids.
MAX_CLIENT_ID = (1 << 63) - 1
MAX_SEQUENCE = (1 << 63) - 1
# No real term or index comes near this. A forged term close to 2**64 would be adopted and made
# durable, and then no election could ever bump it again: the cluster would be dead for good.
MAX_TERM_OR_INDEX = (1 << 62) - 1
MAX_FRAME_OPS = 10_000  # ops in one Session frame (the client sends at most 4,096 by default)
# A call's timeout: a longer one (inf, 10**400 too) is this one (gRPC's deadlines and the
# kernel's socket timeouts hold no more: a call with 1e10 s hung, one with 1e19 failed).
MAX_TIMEOUT_S = 365 * 24 * 3600.0


def node_id_problem(node_id: object) -> str | None:
    """Why ``node_id`` is not a usable node id, or None if it is."""
    if not isinstance(node_id, str) or not node_id:
        return "a node id must be a non-empty string"
    if len(node_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return f"a node id is at most {MAX_ID_BYTES} bytes"
    if not node_id.isprintable() or " " in node_id:
        return "a node id has no spaces or control characters"
    if "=" in node_id or "," in node_id:
        return "a node id has no '=' or ',' (--peers could not name it)"
    return None


def check_node_id(node_id: object) -> str:
    """``node_id`` if usable; ValueError naming the problem otherwise."""
    problem = node_id_problem(node_id)
    if problem is not None:
        shown = (
            node_id if not isinstance(node_id, str) or len(node_id) <= 40 else node_id[:40] + "..."
        )
        raise ValueError(f"bad node id {shown!r}: {problem}")
    return node_id
