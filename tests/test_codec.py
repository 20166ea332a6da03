"""The hand-spliced frame encoder against protobuf's own: the same Frame after parsing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftfast.core.types import Message, MsgType
from raftfast.proto import raftfast_pb2 as pb
from raftfast.transport.codec import delimited_header, encode_frame, frame

U64 = st.integers(0, 2**64 - 1)
ids = st.text(max_size=8)
messages = st.builds(
    Message,
    st.sampled_from(list(MsgType)),
    ids,
    ids,
    U64,
    U64,
    U64,
    st.one_of(st.just(b""), st.binary(max_size=300), st.binary(min_size=16_000, max_size=20_000)),
    U64,
    st.booleans(),
    U64,
    U64,
)


@given(cluster_id=ids, src=ids, msgs=st.lists(messages, max_size=5))
def test_encode_frame_parses_to_the_same_frame(cluster_id, src, msgs):
    encoded = encode_frame(cluster_id, src, msgs)
    assert pb.Frame.FromString(encoded) == frame(cluster_id, src, msgs)


@pytest.mark.parametrize("n", [1, 127, 128, 16_383, 16_384, 2_097_152])
def test_delimited_header_is_protobufs(n):
    # (n >= 1: proto3 leaves an empty bytes field out, and so does encode_frame)
    data = b"x" * n
    assert delimited_header(7, n) + data == pb.RaftMessage(entries=data).SerializeToString()


@given(
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.lists(
        st.tuples(st.sampled_from([0, 1, 4]), st.binary(max_size=8), st.integers(0, 70_000)),
        max_size=5,
    ),
)
@settings(max_examples=60, deadline=None)
def test_a_session_frame_with_spliced_values_parses_to_the_same_frame(frame_id, client_id, ops):
    from raftfast.client.session import _SPLICE_BYTES, serialize_frame

    whole = pb.SessionFrame(frame_id=frame_id, client_id=client_id)
    lean = pb.SessionFrame(frame_id=frame_id, client_id=client_id)
    big = {}
    for i, (kind, key, size) in enumerate(ops):
        value = bytes([i]) * size
        whole.ops.add(kind=kind, key=key, value=value, sequence=i + 1)
        lean.ops.add(
            kind=kind, key=key, value=b"" if size >= _SPLICE_BYTES else value, sequence=i + 1
        )
        if size >= _SPLICE_BYTES:
            big[i] = value
    encoded = serialize_frame((lean, big))
    assert pb.SessionFrame.FromString(encoded) == whole
    assert len(encoded) == whole.ByteSize()
