# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A writer thread that never takes the GIL (twin of raftfast._sync_py).

The WAL's group commit, when it leaves the event loop, is one ``writev`` and one ``fdatasync``.
Done by a Python thread (``run_in_executor``), the thread takes the GIL to start, again after
each of the two system calls, and to hand the result back: each time it may wait for the busy
event loop to let go of it, and each hand-off is a context switch. Measured under 8 clients x 1
put in flight: ~1 ms from submit to result for a ~0.3 ms fdatasync, and the executor thread
switched ~6 times per sync. This thread is C: it waits on a condition variable, does the
system calls, and writes a byte to a pipe the event loop watches (``fileno``); nothing of it
needs the GIL, so the loop is woken once, when the job is done. (fdatasync; fsync on macOS,
which has no fdatasync.)

One job at a time: ``submit`` a file descriptor and the pieces to write (any objects with the
buffer protocol: they are held, read-only, until ``result``), wait for ``fileno`` to be
readable, then ``result`` gives the bytes written or raises the OSError of the failed call.
"""

import os

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from libc.errno cimport EINTR, EIO, errno
from libc.stdlib cimport calloc, free

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<unistd.h>" nogil:
    ssize_t write(int fd, const void *buf, size_t count)
    ssize_t read(int fd, void *buf, size_t count)
    int close(int fd)
    int pipe(int fds[2])
    int usleep(unsigned int usec)

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    int F_GETFL
    int F_SETFL
    int F_SETFD
    int FD_CLOEXEC
    int O_NONBLOCK

cdef extern from *:
    """
    #include <unistd.h>
    #ifdef __APPLE__
    static int raftfast_datasync(int fd) { return fsync(fd); }  /* (no fdatasync there) */
    #else
    static int raftfast_datasync(int fd) { return fdatasync(fd); }
    #endif
    """
    int raftfast_datasync(int fd) nogil

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t *thread, const void *attr, void *(*start)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_signal(pthread_cond_t *c)

cdef enum:
    IOV_CHUNK = 1024  # iovecs per writev (Linux's IOV_MAX)


cdef struct Shared:
    # Everything the thread reads or writes; the GIL-holding side touches it under ``lock``.
    pthread_mutex_t lock
    pthread_cond_t cond
    int pending  # a job is waiting for the thread (or being done)
    int stop
    int fd
    iovec *iov
    int iovcnt
    int datasync
    unsigned int delay_us
    long long written
    int err  # errno of the failed call, 0 if none
    int failed_call  # 1: writev, 2: fdatasync
    int done_fd  # a pipe's read end: one byte per job done
    int signal_fd  # its write end


cdef int _write_all(Shared *s) noexcept nogil:
    """writev until every piece is written (short writes go on from where they stopped)."""
    cdef iovec *iov = s.iov
    cdef int left = s.iovcnt
    cdef ssize_t n
    cdef int count
    while left > 0:
        count = left if left < IOV_CHUNK else IOV_CHUNK
        n = writev(s.fd, iov, count)
        if n < 0:
            if errno == EINTR:
                continue
            return errno
        if n == 0:
            return EIO  # (no progress)
        s.written += n
        while left > 0 and <size_t>n >= iov[0].iov_len:
            n -= iov[0].iov_len
            iov += 1
            left -= 1
        if n > 0:
            iov[0].iov_base = <char *>iov[0].iov_base + n
            iov[0].iov_len -= n
    return 0


cdef void *_thread_main(void *arg) noexcept nogil:
    cdef Shared *s = <Shared *>arg
    cdef char one = 1
    cdef int err
    while True:
        pthread_mutex_lock(&s.lock)
        while not s.pending and not s.stop:
            pthread_cond_wait(&s.cond, &s.lock)
        if not s.pending:
            pthread_mutex_unlock(&s.lock)
            return NULL
        pthread_mutex_unlock(&s.lock)
        if s.delay_us:
            usleep(s.delay_us)
        pthread_mutex_lock(&s.lock)
        s.written = 0
        s.failed_call = 0
        pthread_mutex_unlock(&s.lock)
        err = _write_all(s)
        if err:
            s.failed_call = 1
        elif s.datasync:
            while raftfast_datasync(s.fd) != 0:
                if errno != EINTR:
                    err = errno
                    s.failed_call = 2
                    break
        pthread_mutex_lock(&s.lock)
        s.err = err
        s.pending = 0
        pthread_mutex_unlock(&s.lock)
        while write(s.signal_fd, &one, 1) < 0 and errno == EINTR:
            pass


cdef class FileWriter:
    """A thread of its own that writes pieces to a file descriptor, then fdatasyncs it."""

    cdef Shared *s
    cdef pthread_t thread
    cdef bint running
    cdef bint busy
    cdef Py_buffer *bufs
    cdef int nbufs
    cdef object held  # the pieces of the job in progress

    def __cinit__(self):
        self.s = <Shared *>calloc(1, sizeof(Shared))
        if self.s == NULL:
            raise MemoryError()
        self.s.done_fd = self.s.signal_fd = -1
        pthread_mutex_init(&self.s.lock, NULL)
        pthread_cond_init(&self.s.cond, NULL)
        cdef int fds[2]
        if pipe(fds) != 0:
            raise OSError(errno, "pipe failed")
        self.s.done_fd, self.s.signal_fd = fds[0], fds[1]
        fcntl(fds[0], F_SETFL, fcntl(fds[0], F_GETFL) | O_NONBLOCK)
        fcntl(fds[0], F_SETFD, FD_CLOEXEC)
        fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        cdef int err = pthread_create(&self.thread, NULL, _thread_main, self.s)
        if err:
            raise OSError(err, "cannot start the writer thread")
        self.running = True

    def fileno(self) -> int:
        """Readable once a submitted job is done (a pipe)."""
        return self.s.done_fd

    @property
    def busy(self) -> bool:
        return self.busy

    def submit(self, int fd, pieces, bint datasync, double delay=0.0) -> None:
        """Write ``pieces`` in order to ``fd``, then fdatasync it if ``datasync``. ``delay``
        (seconds, tests only) makes the thread start that much later."""
        if not self.running:
            raise RuntimeError("the writer is closed")
        if self.busy:
            raise RuntimeError("the writer is busy with an earlier job")
        cdef list items = list(pieces)
        cdef int n = len(items)
        cdef int i
        cdef Py_buffer *bufs = <Py_buffer *>calloc(n if n else 1, sizeof(Py_buffer))
        cdef iovec *iov = <iovec *>calloc(n if n else 1, sizeof(iovec))
        if bufs == NULL or iov == NULL:
            free(bufs)
            free(iov)
            raise MemoryError()
        cdef int used = 0  # iovecs: the non-empty pieces
        i = 0
        try:
            while i < n:
                PyObject_GetBuffer(items[i], &bufs[i], PyBUF_SIMPLE)
                i += 1
                if bufs[i - 1].len:
                    iov[used].iov_base = bufs[i - 1].buf
                    iov[used].iov_len = bufs[i - 1].len
                    used += 1
        except BaseException:
            while i > 0:
                i -= 1
                PyBuffer_Release(&bufs[i])
            free(bufs)
            free(iov)
            raise
        self.bufs, self.nbufs, self.held = bufs, n, items
        self.busy = True
        cdef Shared *s = self.s
        pthread_mutex_lock(&s.lock)
        free(s.iov)
        s.iov = iov
        s.iovcnt = used
        s.fd = fd
        s.datasync = datasync
        s.delay_us = <unsigned int>(delay * 1e6) if delay > 0 else 0
        s.pending = 1
        pthread_cond_signal(&s.cond)
        pthread_mutex_unlock(&s.lock)

    def result(self):
        """The bytes the finished job wrote (raises its OSError); None while it runs."""
        if not self.busy:
            raise RuntimeError("no job was submitted")
        cdef Shared *s = self.s
        cdef char byte
        # The thread writes one byte per job, after the job's outcome is stored.
        if read(s.done_fd, &byte, 1) != 1:
            return None
        pthread_mutex_lock(&s.lock)  # (pairs with the thread's store of the outcome)
        err, failed_call, written = s.err, s.failed_call, s.written
        pthread_mutex_unlock(&s.lock)
        self._release()
        if err:
            what = "write" if failed_call == 1 else "fdatasync"
            raise OSError(err, f"{what} failed: {_strerror(err)}")
        return written

    cdef void _release(self):
        cdef int i
        for i in range(self.nbufs):
            PyBuffer_Release(&self.bufs[i])
        free(self.bufs)
        self.bufs = NULL
        self.nbufs = 0
        self.held = None
        self.busy = False

    def close(self) -> None:
        """Stop the thread once its job (if any) is done; then the writer cannot be used."""
        if not self.running:
            return
        cdef Shared *s = self.s
        pthread_mutex_lock(&s.lock)
        s.stop = 1
        pthread_cond_signal(&s.cond)
        pthread_mutex_unlock(&s.lock)
        with nogil:
            pthread_join(self.thread, NULL)
        self.running = False
        if self.busy:
            self._release()

    def __dealloc__(self):
        if self.s == NULL:
            return
        if self.running:
            self.close()
        if self.s.done_fd >= 0:
            close(self.s.done_fd)
        if self.s.signal_fd >= 0:
            close(self.s.signal_fd)
        free(self.s.iov)
        pthread_cond_destroy(&self.s.cond)
        pthread_mutex_destroy(&self.s.lock)
        free(self.s)
        self.s = NULL


cdef str _strerror(int err):
    return os.strerror(err)
