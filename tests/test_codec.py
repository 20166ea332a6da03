"""The hand-spliced frame encoder against protobuf's own: the same Frame after parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
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
