"""etcd's errors: the gRPC status code and the exact message etcd sends, which etcd clients map
back to their own error types (clientv3's rpctypes, python-etcd3's exceptions) by the text."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

__all__ = ["EtcdError"]

# (names of grpc.StatusCode: the state machine uses these errors, and runs without grpc)
_C = SimpleNamespace(
    **{
        name: name
        for name in (
            "INVALID_ARGUMENT",
            "OUT_OF_RANGE",
            "RESOURCE_EXHAUSTED",
            "NOT_FOUND",
            "FAILED_PRECONDITION",
            "UNAVAILABLE",
        )
    }
)


class EtcdError(Exception):
    """An etcd API error: ``code`` (a grpc.StatusCode) and ``message`` (etcd's own text).

    The state machine returns these (deterministically, the same on every node) instead of
    raising; the services raise them and answer with the status."""

    def __init__(self, code: Any, message: str) -> None:
        """``code``: a grpc.StatusCode or its name."""
        super().__init__(message)
        self.code_name: str = code if isinstance(code, str) else code.name
        self.message = message

    @property
    def code(self) -> Any:
        """The grpc.StatusCode."""
        import grpc

        return grpc.StatusCode[self.code_name]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EtcdError) and (self.code_name, self.message) == (
            other.code_name,
            other.message,
        )

    def __hash__(self) -> int:
        return hash((self.code_name, self.message))

    def __repr__(self) -> str:
        return f"EtcdError({self.code_name}, {self.message!r})"


# etcd's fixed errors: ``errors.EMPTY_KEY`` and the others are made anew at each use. One
# exception object raised again and again keeps every traceback it was raised with, and each
# holds its frames and their requests: 600 refused 2 MiB Puts took a node to 1.3 GB.
def _e(code: str, message: str) -> tuple[str, str]:
    return code, message


def __getattr__(name: str) -> EtcdError:
    spec = globals().get(f"_{name}") if name.isupper() else None
    if not isinstance(spec, tuple):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return EtcdError(*spec)


def __dir__() -> list[str]:
    fixed = [name[1:] for name, value in globals().items() if _is_fixed(name, value)]
    return sorted([*globals(), *fixed])


def _is_fixed(name: str, value: object) -> bool:
    return name.startswith("_") and name[1:].isupper() and isinstance(value, tuple)


_EMPTY_KEY = _e(_C.INVALID_ARGUMENT, "etcdserver: key is not provided")
_KEY_NOT_FOUND = _e(_C.INVALID_ARGUMENT, "etcdserver: key not found")
_VALUE_PROVIDED = _e(_C.INVALID_ARGUMENT, "etcdserver: value is provided")
_LEASE_PROVIDED = _e(_C.INVALID_ARGUMENT, "etcdserver: lease is provided")
_TOO_MANY_OPS = _e(_C.INVALID_ARGUMENT, "etcdserver: too many operations in txn request")
_DUPLICATE_KEY = _e(_C.INVALID_ARGUMENT, "etcdserver: duplicate key given in txn request")
_COMPACTED = _e(_C.OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted")
_FUTURE_REV = _e(_C.OUT_OF_RANGE, "etcdserver: mvcc: required revision is a future revision")
_NO_SPACE = _e(_C.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded")
_LEASE_NOT_FOUND = _e(_C.NOT_FOUND, "etcdserver: requested lease not found")
_LEASE_EXIST = _e(_C.FAILED_PRECONDITION, "etcdserver: lease already exists")
_LEASE_TTL_TOO_LARGE = _e(_C.OUT_OF_RANGE, "etcdserver: too large lease TTL")
_MEMBER_EXIST = _e(_C.FAILED_PRECONDITION, "etcdserver: member ID already exist")
_PEER_URL_EXIST = _e(_C.FAILED_PRECONDITION, "etcdserver: Peer URLs already exists")
_MEMBER_BAD_URLS = _e(_C.INVALID_ARGUMENT, "etcdserver: given member URLs are invalid")
_MEMBER_NOT_FOUND = _e(_C.NOT_FOUND, "etcdserver: member not found")
_MEMBER_NOT_LEARNER = _e(_C.FAILED_PRECONDITION, "etcdserver: can only promote a learner member")
_LEARNER_NOT_READY = _e(
    _C.FAILED_PRECONDITION,
    "etcdserver: can only promote a learner member which is in sync with leader",
)
_REQUEST_TOO_LARGE = _e(_C.INVALID_ARGUMENT, "etcdserver: request is too large")
_TOO_MANY_REQUESTS = _e(_C.RESOURCE_EXHAUSTED, "etcdserver: too many requests")
_NO_LEADER = _e(_C.UNAVAILABLE, "etcdserver: no leader")
_NOT_LEADER = _e(_C.FAILED_PRECONDITION, "etcdserver: not leader")
_LEADER_CHANGED = _e(_C.UNAVAILABLE, "etcdserver: leader changed")
_STOPPED = _e(_C.UNAVAILABLE, "etcdserver: server stopped")
_TIMEOUT = _e(_C.UNAVAILABLE, "etcdserver: request timed out")
_BAD_LEADER_TRANSFEREE = _e(_C.FAILED_PRECONDITION, "etcdserver: bad leader transferee")


def lease_full(lease_id: int, most: int) -> EtcdError:
    """A put would attach a key to a lease that holds the most keys a lease may hold here."""
    return EtcdError(
        _C.RESOURCE_EXHAUSTED,
        f"etcdserver: lease {lease_id:x} holds {most} keys, the most a lease may hold here",
    )


def too_many_leases(most: int) -> EtcdError:
    """A grant past the most leases a cluster holds here."""
    return EtcdError(
        _C.RESOURCE_EXHAUSTED,
        f"etcdserver: the cluster holds {most} leases, the most it may hold here: revoke some",
    )


def txn_reads_too_much(count: int, most: int) -> EtcdError:
    """A Txn would look at more records than a node reads in one apply here."""
    return EtcdError(
        _C.INVALID_ARGUMENT,
        f"etcdserver: the txn would read {count} keys, more than {most} at once: "
        "read them with a Range in pages (limit), outside the txn",
    )


def too_many_deletes(count: int, most: int) -> EtcdError:
    """A write would delete more keys at once than a node deletes in one apply here."""
    return EtcdError(
        _C.INVALID_ARGUMENT,
        f"etcdserver: the request would delete {count} keys, more than {most} at once: "
        "delete the range in parts",
    )


def answer_too_big(size: int, most: int) -> EtcdError:
    """A Range whose answer could not be sent (gRPC's limit): refused before it is built."""
    return EtcdError(
        _C.RESOURCE_EXHAUSTED,
        f"etcdserver: the answer would hold {size} bytes of keys and values, more than "
        f"{most}: read the range in parts (limit, then from the last key)",
    )


def invalid(message: str) -> EtcdError:
    """A request etcd would take but raftfast cannot hold (an out-of-range value, a txn
    nested too deep): INVALID_ARGUMENT with a message that says which limit."""
    return EtcdError(_C.INVALID_ARGUMENT, f"etcdserver: {message}")
