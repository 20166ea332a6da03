"""The one place that converts between core types and protobuf (nothing else imports the
generated peer messages)."""

from __future__ import annotations

from raftfast.core.types import Message, MsgType
from raftfast.proto import raftfast_pb2 as pb

_TYPES = {t.value: t for t in MsgType}


class CodecError(ValueError):
    """A peer sent a message the core cannot represent."""


def message_to_pb(m: Message) -> pb.RaftMessage:
    return pb.RaftMessage(
        type=m.type,
        src=m.src,
        dst=m.dst,
        term=m.term,
        index=m.index,
        log_term=m.log_term,
        entries=m.entries,
        commit=m.commit,
        reject=m.reject,
        hint=m.hint,
        context=m.context,
    )


def message_from_pb(p: pb.RaftMessage) -> Message:
    kind = _TYPES.get(p.type)
    if kind is None:
        raise CodecError(f"unknown message type {p.type}")
    return Message(
        kind,
        p.src,
        p.dst,
        p.term,
        p.index,
        p.log_term,
        p.entries,
        p.commit,
        p.reject,
        p.hint,
        p.context,
    )


def frame(cluster_id: str, src: str, msgs: list[Message]) -> pb.Frame:
    return pb.Frame(cluster_id=cluster_id, src=src, messages=[message_to_pb(m) for m in msgs])
