"""The WAL's writer thread (raftfast._sync, a C thread, and its pure twin): what it writes, how
it reports a failed write or fdatasync, and how it refuses misuse."""

from __future__ import annotations

import errno
import os
import select
import time

import pytest

from raftfast import _sync_py

IMPLS = [_sync_py]
if not os.environ.get("RAFTFAST_PUREPYTHON"):
    from raftfast import _sync  # a missing build must fail loudly here

    IMPLS.append(_sync)


@pytest.fixture(params=IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def writer(request):
    w = request.param.FileWriter()
    yield w
    w.close()


def finish(w, timeout: float = 10.0):
    """Wait for the job's pipe, then its result (as the event loop's reader does)."""
    readable, _, _ = select.select([w.fileno()], [], [], timeout)
    assert readable, "the writer did not finish its job"
    return w.result()


def test_writes_the_pieces_in_order_then_syncs(writer, tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        pieces = [b"head", b"", memoryview(b"--view--"), bytearray(b"x" * 70_000), b"tail"]
        writer.submit(fd, pieces, True)
        assert writer.busy
        assert finish(writer) == 4 + 8 + 70_000 + 4
        assert not writer.busy
        writer.submit(fd, [b"!"], False)  # the writer takes the next job
        assert finish(writer) == 1
    finally:
        os.close(fd)
    assert path.read_bytes() == b"head--view--" + b"x" * 70_000 + b"tail!"


def test_more_pieces_than_one_writev_takes(writer, tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    pieces = [b"%05d," % i for i in range(3000)]  # Linux's IOV_MAX is 1024
    try:
        writer.submit(fd, pieces, True)
        assert finish(writer) == 6 * 3000
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(pieces)


def test_nothing_to_write(writer, tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        writer.submit(fd, [], True)
        assert finish(writer) == 0
        writer.submit(fd, [b"", b""], False)
        assert finish(writer) == 0
    finally:
        os.close(fd)


def test_result_is_none_until_the_job_is_done(writer, tmp_path):
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        started = time.monotonic()
        writer.submit(fd, [b"late"], False, 0.3)  # (the delay tests use for slow disks)
        assert writer.result() is None
        assert not select.select([writer.fileno()], [], [], 0)[0]
        assert finish(writer) == 4
        assert time.monotonic() - started >= 0.3
    finally:
        os.close(fd)


def test_a_failed_write_is_reported_with_its_errno(writer):
    with open("/dev/full", "wb", buffering=0) as full:
        writer.submit(full.fileno(), [b"x" * 100], True)
        with pytest.raises(OSError) as info:
            finish(writer)
    assert info.value.errno == errno.ENOSPC
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    writer.submit(fd, [b"x"], False)  # a closed descriptor
    with pytest.raises(OSError) as info:
        finish(writer)
    assert info.value.errno == errno.EBADF


def test_a_failed_fdatasync_is_reported_with_its_errno(writer):
    r, w = os.pipe()  # a pipe takes the write but cannot be synced
    try:
        writer.submit(w, [b"abc"], True)
        with pytest.raises(OSError) as info:
            finish(writer)
        assert info.value.errno == errno.EINVAL
        assert os.read(r, 10) == b"abc"
    finally:
        os.close(r)
        os.close(w)


def test_misuse_is_refused(writer, tmp_path):
    with pytest.raises(RuntimeError, match="no job"):
        writer.result()
    with pytest.raises(TypeError):
        writer.submit(1, [b"ok", 123], False)
    assert not writer.busy  # a refused submit holds nothing
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        writer.submit(fd, [b"a"], False, 0.2)
        with pytest.raises(RuntimeError, match="busy"):
            writer.submit(fd, [b"b"], False)
        writer.close()  # waits for the job in progress
        with pytest.raises(RuntimeError, match="closed"):
            writer.submit(fd, [b"c"], False)
        writer.close()  # twice is fine
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"a"


def test_the_pieces_are_held_while_the_thread_writes(writer, tmp_path):
    """The caller may drop its references at once: the writer keeps the buffers alive."""
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        writer.submit(fd, [bytes([i]) * 4096 for i in range(64)], True, 0.05)
        assert finish(writer) == 64 * 4096
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"".join(bytes([i]) * 4096 for i in range(64))


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_closed_writers_leave_no_descriptor_or_thread(impl):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("counts descriptors in /proc")
    before = len(os.listdir("/proc/self/fd"))
    # Relative to this process's threads now: earlier tests may leave a few
    # (grpc's, executors') winding down, which only lowers the count.
    threads_before = len(os.listdir("/proc/self/task"))
    for _ in range(200):
        w = impl.FileWriter()
        w.close()
        del w
    for _ in range(200):
        impl.FileWriter()  # dropped unclosed: collected, closed
    assert len(os.listdir("/proc/self/fd")) <= before + 2
    deadline = time.monotonic() + 10
    while len(os.listdir("/proc/self/task")) > threads_before + 2:
        assert time.monotonic() < deadline, "writer threads outlived their writers"
        time.sleep(0.01)
