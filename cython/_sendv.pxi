# --- a frame's buffers to a socket in one GIL-free call (see cm_sendv.h) -----------------

cdef extern from "cm_sendv.h" nogil:
    ctypedef struct cm_part:
        const uint8_t* base
        size_t len
    int cm_send_parts(int fd, const cm_part* parts, size_t n, uint64_t skip, double timeout_s,
                      uint64_t* written, int* readable)
    int cm_recv_some(int fd, uint8_t* buf, size_t n, double timeout_s, uint64_t* got)


def send_parts(int fd, parts, uint64_t skip=0, double timeout=0.0):
    """Write ``parts`` (a sequence of C-contiguous buffers, in order) to the socket ``fd``
    (sockets only: ``sendmsg``), leaving out their first ``skip`` bytes, within ``timeout`` seconds;
    the GIL is released once for the whole write.

    Returns ``(written, error, readable)``: the bytes this call wrote; 0 when all is
    written, else an errno value (``ETIMEDOUT`` past the timeout, ``EINTR`` when a signal
    arrived: call again with ``skip + written``, ``ENOSYS`` where the platform has no
    ``sendmsg``); and whether, once all was written, the peer had something to read.
    Raises ``ValueError`` for a negative timeout, ``BufferError``/``TypeError`` for a part
    that is not a contiguous buffer.
    """
    if not timeout >= 0:  # NaN too: it would make poll() wait forever
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
    cdef list items = list(parts)
    cdef size_t n = len(items), got = 0, i
    cdef Py_buffer* views = <Py_buffer*>_calloc(n + 1, sizeof(Py_buffer))
    cdef cm_part* spans = <cm_part*>_calloc(n + 1, sizeof(cm_part))
    cdef uint64_t written = 0
    cdef int err = 0, readable = 0
    cdef PyThreadState* ts
    if views == NULL or spans == NULL:
        _free(views)
        _free(spans)
        raise MemoryError()
    try:
        for i in range(n):
            PyObject_GetBuffer(items[i], &views[i], PyBUF_C_CONTIGUOUS)
            got += 1
            spans[i].base = <const uint8_t*>views[i].buf
            spans[i].len = <size_t>views[i].len
        ts = PyEval_SaveThread()
        err = cm_send_parts(fd, spans, n, skip, timeout, &written, &readable)
        PyEval_RestoreThread(ts)
    finally:
        for i in range(got):
            PyBuffer_Release(&views[i])
        _free(views)
        _free(spans)
    return written, err, bool(readable)


def recv_some(int fd, buffer, double timeout=0.0):
    """Read what has arrived on the socket ``fd`` into the writable ``buffer`` (at least one
    byte, or none at the end of the stream), waiting up to ``timeout`` seconds; the GIL is
    released once. Returns ``(got, error)``: bytes read (0: the peer closed) and 0, else an
    errno value (``ETIMEDOUT``, ``EINTR``: call again, ``ENOSYS`` without ``poll``).
    Raises ``ValueError`` for a negative timeout or an empty buffer."""
    if not timeout >= 0:  # NaN too
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
    cdef Py_buffer view
    cdef uint64_t got = 0
    cdef int err
    # Any writable C-contiguous buffer, whatever its item format (as socket.recv_into).
    PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
    try:
        if view.len == 0:
            raise ValueError("the buffer is empty")
        with nogil:
            err = cm_recv_some(fd, <uint8_t*>view.buf, <size_t>view.len, timeout, &got)
    finally:
        PyBuffer_Release(&view)
    return got, err
