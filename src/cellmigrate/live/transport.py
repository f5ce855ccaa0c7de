"""Byte streams (TCP, Unix sockets, TLS, pipes) and the framing on top of them.

A :class:`Connection` sends and receives protocol frames over any :class:`Stream`: a
connected socket (``socket``/``ssl`` objects, TCP or Unix) or a pair of pipe file
descriptors (``ssh host cellmigrate receive --stdio ...``). Every read has a deadline:
``timeout`` for the next frame to start, plus time for its body at no less than 1 MB/s,
so a stalled or trickling peer raises :class:`~cellmigrate.live.errors.PeerTimeoutError`;
a closed or reset stream raises :class:`~cellmigrate.live.errors.ConnectionLostError`;
a frame that is not this protocol's (unknown type, length over its type's bound, bad MAC)
raises :class:`~cellmigrate.live.errors.ProtocolError` or ``AuthenticationError`` before
its body is read. Addresses are ``HOST:PORT`` or ``unix:PATH``.
"""

from __future__ import annotations

import errno
import hmac
import os
import select
import signal
import socket
import ssl
import stat
import struct
import subprocess
import time
from typing import Dict, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from .._backend import kernels
from .errors import AuthenticationError, ConnectionLostError, PeerTimeoutError, ProtocolError
from .protocol import MAC_SIZE, FrameMac, Msg, body_limit

__all__ = [
    "DEFAULT_TIMEOUT",
    "Stream",
    "SocketStream",
    "PipeStream",
    "Connection",
    "FrameReader",
    "parse_address",
    "connect",
    "listen",
    "UnixListener",
    "accept",
]

#: Seconds a peer may stay silent when a frame is expected.
DEFAULT_TIMEOUT = 30.0
# A frame's body must arrive at least this fast (bytes/s) once its header has.
_MIN_RATE = 1 << 20
_HEADER = struct.Struct("<IB")
_KNOWN = frozenset(int(m) for m in Msg)
_SMALL = 64 << 10  # frames up to this size are sent as one buffer
_TIMEOUT_SLACK = 0.05
# Plain sockets are read and written by the compiled kernels (one GIL release a call,
# cython/cm_sendv.h); elsewhere (no sendmsg/poll) by Python's socket methods.
_NATIVE_IO = os.name == "posix"

Part = Union[bytes, bytearray, memoryview]


class Stream(Protocol):
    """What a :class:`Connection` needs from a byte stream."""

    def recv_into(self, view: memoryview, timeout: float) -> int:
        """Read some bytes (0 at end of stream) within ``timeout`` seconds, else ``TimeoutError``."""
        ...

    def sendall(self, data: Part, timeout: float) -> None:
        """Write all of ``data`` within ``timeout`` seconds, else ``TimeoutError``."""
        ...

    def readable(self, timeout: float) -> bool:
        """Whether a read would not block (waiting up to ``timeout``)."""
        ...

    def close(self) -> None:
        ...


class SocketStream:
    """A connected socket: TCP, Unix, or TLS (``ssl.SSLSocket``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._timeout = -1.0

    def _settimeout(self, timeout: float) -> None:
        # A frame's reads share one deadline, so each asks for a slightly shorter timeout
        # than the last; setting it is a system call (ioctl), one per read of a GiB
        # transfer. The set value is kept while it is no shorter than the asked one and
        # at most _TIMEOUT_SLACK longer: a stall is never reported early, at most that
        # fraction late.
        timeout = max(timeout, 1e-3)
        if not timeout <= self._timeout <= (1 + _TIMEOUT_SLACK) * timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def recv_into(self, view: memoryview, timeout: float) -> int:
        self._settimeout(timeout)
        if not _NATIVE_IO or isinstance(self.sock, ssl.SSLSocket):
            return self.sock.recv_into(view)
        # One GIL-free call (poll and recv): Python's recv_into takes the GIL back twice.
        deadline = time.monotonic() + timeout
        while True:
            got, err = kernels.recv_some(self.sock.fileno(), view, max(deadline - time.monotonic(), 0.0))
            if err == 0:
                return int(got)
            _raise_unless_interrupted(err)

    def sendall(self, data: Part, timeout: float) -> None:
        self._settimeout(timeout)
        self.sock.sendall(data)

    def send_parts(self, parts: Sequence[Part], timeout: float) -> Optional[bool]:
        """Write ``parts`` in order within ``timeout`` seconds; then whether the peer has
        sent something (``None``: not known).

        A plain socket takes them in one GIL-free call (``sendmsg``, see
        ``cython/cm_sendv.h``): ``sendall`` takes the GIL back after each system call, and
        each of those returns waits a switch interval while another thread runs Python.
        TLS goes through ``ssl``'s own ``sendall``.
        """
        if not _NATIVE_IO or isinstance(self.sock, ssl.SSLSocket):
            deadline = time.monotonic() + timeout
            for part in parts:  # not self.sendall: a subclass may count what that sends
                self._settimeout(deadline - time.monotonic())
                self.sock.sendall(part)
            return None
        self._settimeout(timeout)
        deadline = time.monotonic() + timeout
        fd, skip = self.sock.fileno(), 0
        while True:
            written, err, readable = kernels.send_parts(fd, parts, skip, max(deadline - time.monotonic(), 0.0))
            skip += written
            if err == 0:
                return bool(readable)
            _raise_unless_interrupted(err)

    def readable(self, timeout: float) -> bool:
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        return bool(select.select([self.sock], [], [], max(timeout, 0))[0])

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _raise_unless_interrupted(err: int) -> None:
    """A socket kernel's errno as Python's socket methods raise it; EINTR returns (the
    signal's Python handler has run, and may have raised): the caller goes on."""
    if err == errno.EINTR:
        return
    if err == errno.ETIMEDOUT:
        raise TimeoutError
    raise OSError(err, os.strerror(err))


class PipeStream:
    """Two file descriptors: one read, one written (a pipe pair, stdin/stdout, a FIFO)."""

    def __init__(self, read_fd: int, write_fd: int, *, close_fds: bool = False) -> None:
        self.read_fd, self.write_fd, self._close = read_fd, write_fd, close_fds

    def recv_into(self, view: memoryview, timeout: float) -> int:
        if not select.select([self.read_fd], [], [], max(timeout, 0))[0]:
            raise TimeoutError
        return os.readv(self.read_fd, [view])

    def sendall(self, data: Part, timeout: float) -> None:
        view = memoryview(data).cast("B")
        deadline = time.monotonic() + timeout
        while view.nbytes:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [self.write_fd], [], left)[1]:
                raise TimeoutError
            try:
                view = view[os.write(self.write_fd, view[: 1 << 20]) :]
            except BlockingIOError:  # a non-blocking pipe filled up meanwhile: wait again
                continue

    def readable(self, timeout: float) -> bool:
        return bool(select.select([self.read_fd], [], [], max(timeout, 0))[0])

    def close(self) -> None:
        if self._close:
            for fd in {self.read_fd, self.write_fd}:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _descendants(pid: int) -> List[int]:
    """The PIDs of ``pid``'s descendants, from ``/proc`` (none found without it)."""
    children: Dict[int, List[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def stop_command(proc: "subprocess.Popen[bytes]") -> None:
    """SIGKILL a shell command and everything it started, then reap it.

    The command stays in our process group and session (so it can prompt on our
    terminal: ``ssh``'s password, ``sudo``), so its descendants are found in ``/proc``:
    frozen with SIGSTOP until no new one appears (one may fork meanwhile), then killed,
    the shell last (killed first, it would hand its children to init, out of sight)."""
    if proc.poll() is None:
        frozen: List[int] = []
        for _ in range(8):
            found = [p for p in _descendants(proc.pid) if p not in frozen]
            if not found:
                break
            _signal_all(found, signal.SIGSTOP)
            frozen.extend(found)
        _signal_all([*frozen, proc.pid], signal.SIGKILL)
        _await_death(frozen, 2.0)
    proc.wait()


def _dead(pid: int) -> bool:
    """Whether ``pid`` is gone or a zombie (killed, not yet reaped by its new parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _await_death(pids: Sequence[int], timeout: float) -> None:
    """Wait (at most ``timeout`` s) until the SIGKILLed ``pids`` are dead: the signal is
    only queued by ``kill``, and on a busy machine a descendant could still be running
    when the command is reported stopped. Not our children: polled in ``/proc``."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while not _dead(pid) and time.monotonic() < deadline:
            time.sleep(0.005)


class CommandStream(PipeStream):
    """A command's standard input and output as a stream: ``send`` to
    ``exec:ssh nodeB cellmigrate receive --stdio agent.bin`` runs the receiver through
    ``ssh`` (its stderr is ours). :meth:`close` closes both pipes and waits for the
    command (after ``wait`` seconds, it and all it started are killed: see
    :func:`stop_command`). ``OSError`` when it cannot be started."""

    def __init__(self, command: str, *, wait: float = 10.0) -> None:
        self.process = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.process.stdin is not None and self.process.stdout is not None
        self._wait = wait
        # Writes must not block past their deadline: a full pipe returns what it took.
        os.set_blocking(self.process.stdin.fileno(), False)
        super().__init__(self.process.stdout.fileno(), self.process.stdin.fileno())

    def close(self) -> None:
        proc = self.process
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        try:
            proc.wait(self._wait)
        except subprocess.TimeoutExpired:
            stop_command(proc)
        except BaseException:  # an interrupt: nothing may run on by itself
            stop_command(proc)
            raise


class Connection:
    """Protocol frames over a :class:`Stream`, with optional per-frame MACs.

    ``recv`` returns a view into a buffer reused by the next ``recv`` (with ``buffers=2``,
    by the one after: a frame can be processed while the next one arrives).
    """

    def __init__(self, stream: Stream, *, timeout: float = DEFAULT_TIMEOUT, buffers: int = 1) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.stream = stream
        self.timeout = float(timeout)
        self._bufs = [_buffer(_SMALL) for _ in range(max(1, buffers))]
        self._turn = 0
        # Read-ahead for small reads (frame headers, ACKs): one system call brings every
        # frame already here, not two per frame. Bodies of _SMALL bytes or more are read
        # straight into their destination once the read-ahead is used up.
        self._ahead = _buffer(_SMALL)
        self._ahead_pos = self._ahead_end = 0
        # Whether the peer had sent something when the last send finished (as the stream
        # reported it), for the next readable(); None: ask the stream.
        self._ready: Optional[bool] = None
        self._out_mac: Optional[FrameMac] = None
        self._in_mac: Optional[FrameMac] = None
        self.bytes_sent = 0
        self.bytes_received = 0

    def enable_macs(self, session_key: bytes, sending: bytes, receiving: bytes) -> None:
        """From now on every frame carries (and must carry) a MAC under ``session_key``."""
        self._out_mac = FrameMac(session_key, sending)
        self._in_mac = FrameMac(session_key, receiving)

    # -- sending ---------------------------------------------------------------------

    def send(self, msg: Msg, *parts: Part) -> None:
        """One frame of type ``msg`` whose body is ``parts`` joined (they are not copied)."""
        length = sum(memoryview(p).nbytes for p in parts)
        if length > body_limit(msg):
            raise ValueError(f"{msg.name} frame of {length} bytes exceeds its limit of {body_limit(msg)}")
        out: List[Part] = [_HEADER.pack(length, int(msg))]
        out.extend(parts)
        if self._out_mac is not None:
            out.append(self._out_mac.next(int(msg), parts, length))
        if length <= _SMALL:
            out = [b"".join(out)]
        deadline = time.monotonic() + self.timeout + length / _MIN_RATE
        send_parts = getattr(self.stream, "send_parts", None)
        try:
            if send_parts is not None:
                self._ready = send_parts(out, deadline - time.monotonic())
            else:
                for part in out:
                    self.stream.sendall(part, deadline - time.monotonic())
        except (TimeoutError, socket.timeout):
            raise PeerTimeoutError(f"peer took no data for {self.timeout:g} s (sending {msg.name})") from None
        except ssl.SSLError as exc:
            raise ConnectionLostError(f"TLS error while sending: {exc}") from None
        except OSError as exc:
            raise ConnectionLostError(f"connection lost while sending {msg.name}: {exc}") from None
        self.bytes_sent += _HEADER.size + length

    # -- receiving -------------------------------------------------------------------

    def _read_exact(self, view: memoryview, deadline: float, what: str) -> None:
        self._ready = None  # what a send saw is stale once anything is read
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")  # bytes, whatever the caller's item format (slices copy into it)
        n = view.nbytes
        got = min(n, self._ahead_end - self._ahead_pos)
        if got:
            view[:got] = self._ahead[self._ahead_pos : self._ahead_pos + got]
            self._ahead_pos += got
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeoutError(f"peer sent {got} of {n} bytes of {what} within the deadline ({self.timeout:g} s)")
            small = n - got < _SMALL  # the read-ahead is empty here
            try:
                k = self.stream.recv_into(self._ahead if small else view[got:], left)
            except (TimeoutError, socket.timeout):
                raise PeerTimeoutError(f"peer sent nothing for {self.timeout:g} s (waiting for {what})") from None
            except ssl.SSLError as exc:
                raise ConnectionLostError(f"TLS error: {exc}") from None
            except OSError as exc:
                raise ConnectionLostError(f"connection lost: {exc}") from None
            if k == 0:
                if not (got or self.bytes_received or self._ahead_end):  # a port probe, a health check
                    raise ConnectionLostError("peer closed the connection without sending anything")
                raise ConnectionLostError(f"peer closed the connection ({got} of {n} bytes of {what} received)")
            if small:
                take = min(k, n - got)
                view[got : got + take] = self._ahead[:take]
                self._ahead_pos, self._ahead_end = take, k
                k = take
            got += k
        self.bytes_received += n

    def recv(self, *expect: Msg) -> Tuple[Msg, memoryview]:
        """The next frame: ``(type, body)``. With ``expect``, any other type but ERROR is a
        ``ProtocolError`` (an ERROR frame is returned for the caller to raise)."""
        msg, length = self.recv_header(*expect)
        return msg, self.recv_body(msg, length)

    def recv_header(self, *expect: Msg) -> Tuple[Msg, int]:
        """The next frame's type and body length, both checked (type known and expected as
        in :meth:`recv`, length within its type's bound); read its body next, with
        :meth:`recv_body` or a :meth:`reader`, before anything else."""
        header = memoryview(bytearray(_HEADER.size))
        self._read_exact(header, time.monotonic() + self.timeout, "a frame header")
        length, kind = _HEADER.unpack(header)
        if kind not in _KNOWN:
            raise ProtocolError(f"unknown frame type {kind}")
        msg = Msg(kind)
        if expect and msg not in expect and msg is not Msg.ERROR:
            raise ProtocolError(f"unexpected {msg.name} frame (expected {' or '.join(m.name for m in expect)})")
        if length > body_limit(msg):
            raise ProtocolError(f"{msg.name} frame declares {length} bytes, over its limit of {body_limit(msg)}")
        return msg, int(length)

    def recv_body(self, msg: Msg, length: int) -> memoryview:
        """The body of the frame :meth:`recv_header` announced, its MAC checked."""
        reader = self.reader(msg, length)
        body = reader.read(length)
        reader.finish()
        return body

    def reader(self, msg: Msg, length: int) -> "FrameReader":
        """Read the body of the frame :meth:`recv_header` announced piece by piece."""
        total = length + (MAC_SIZE if self._in_mac is not None else 0)
        self._turn = (self._turn + 1) % len(self._bufs)
        if total > self._bufs[self._turn].nbytes:
            self._bufs[self._turn] = _buffer(total)
        return FrameReader(self, msg, length, self._bufs[self._turn][:total])

    def readable(self) -> bool:
        """Whether a frame has (started to) arrive. Right after a send this is what the
        stream saw when the send finished (no system call, so no wait for the GIL)."""
        if self.buffered():
            return True
        ready, self._ready = self._ready, None
        if ready is not None:
            return ready
        try:
            return self.stream.readable(0)
        except (OSError, ValueError):
            return True  # let the next recv report the problem

    def buffered(self) -> bool:
        """Whether bytes of a frame were read ahead and wait to be received."""
        return self._ahead_end > self._ahead_pos

    def close(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass


class FrameReader:
    """The body of one frame, read in pieces: into the connection's reused buffer
    (:meth:`read`) or straight into the caller's memory (:meth:`read_into`, e.g. a chunk's
    pages into the staging area, with no copy in between); :meth:`finish` then checks the
    frame's MAC over everything read. The whole body shares one deadline (the timeout
    plus its length at 1 MB/s), as a frame read at once does.
    """

    def __init__(self, conn: Connection, msg: Msg, length: int, buffer: memoryview) -> None:
        self.conn = conn
        self.msg = msg
        self.length = length
        #: Bytes of the body not read yet.
        self.remaining = length
        self._buf = buffer
        self._pos = 0
        self._deadline = time.monotonic() + conn.timeout + buffer.nbytes / _MIN_RATE
        self._mac = conn._in_mac.start(int(msg), length) if conn._in_mac is not None else None

    def _take(self, n: int) -> None:
        if n > self.remaining:
            raise ProtocolError(f"{self.msg.name} frame is {self.length} bytes, too short for what it declares")
        self.remaining -= n

    def read(self, n: int) -> memoryview:
        """The next ``n`` bytes of the body (a view into the reused buffer)."""
        self._take(n)
        view = self._buf[self._pos : self._pos + n]
        self.conn._read_exact(view, self._deadline, f"a {self.msg.name} frame")
        self._pos += n
        if self._mac is not None:
            self._mac.update(view)
        return view

    def read_into(self, view: memoryview) -> None:
        """The next ``view.nbytes`` bytes of the body, written into ``view``."""
        self._take(view.nbytes)
        self.conn._read_exact(view, self._deadline, f"a {self.msg.name} frame")
        if self._mac is not None:
            self._mac.update(view)

    def finish(self) -> None:
        """After the whole body: check the frame's MAC (``AuthenticationError``)."""
        if self.remaining:
            raise ProtocolError(f"{self.msg.name} frame has {self.remaining} bytes nobody read")
        if self._mac is not None:
            mac = self._buf[self._buf.nbytes - MAC_SIZE :]
            self.conn._read_exact(mac, self._deadline, f"the MAC of a {self.msg.name} frame")
            if not _equal(bytes(self._mac.digest()), mac):
                raise AuthenticationError(f"{self.msg.name} frame failed its MAC check (tampered, or not from the key holder)")


def _buffer(n: int) -> memoryview:
    """``n`` writable bytes, not zero-filled: a chunk frame's buffer is sized for its
    whole body, but a chunk read straight into the staging only ever touches its first
    bytes (a ``bytearray`` would write, and fault in, all 8 MiB per connection)."""
    return np.empty(n, dtype=np.uint8).data.cast("B")


def _equal(a: bytes, b: memoryview) -> bool:
    return hmac.compare_digest(a, bytes(b))


# -- addresses -----------------------------------------------------------------------------


#: The address prefix of a command to speak the protocol with (see :func:`connect`).
EXEC = "exec:"


def parse_address(address: str) -> Tuple[int, Union[str, Tuple[str, int]]]:
    """``HOST:PORT`` (``[v6]:PORT`` too) or ``unix:PATH`` as ``(family, sockaddr)``."""
    if address.startswith("unix:"):
        path = address[5:]
        if not path:
            raise ValueError("unix: address needs a path")
        return socket.AF_UNIX, path
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"address must be HOST:PORT or unix:PATH, not {address!r}")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"port must be a number in {address!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {address!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, number)


def check_address(address: str, *, tls: bool = False) -> None:
    """``ValueError`` unless :func:`connect` can take ``address`` (with TLS when ``tls``):
    ``HOST:PORT``, ``unix:PATH``, or ``exec:COMMAND`` (a command, and no TLS)."""
    if address.startswith(EXEC):
        if not address[len(EXEC):].strip():
            raise ValueError("exec: needs a command")
        if tls:
            raise ValueError("TLS does not apply to an exec: address (the command carries the bytes: ssh, say)")
    else:
        parse_address(address)


def connect(
    address: str, *, timeout: float = DEFAULT_TIMEOUT, tls: Optional[ssl.SSLContext] = None, server_hostname: Optional[str] = None
) -> Stream:
    """A stream connected to ``address`` (TLS-wrapped with ``tls``): ``HOST:PORT``,
    ``unix:PATH``, or ``exec:COMMAND`` (a :class:`CommandStream`; TLS does not apply).
    ``ValueError`` for an address :func:`check_address` refuses."""
    check_address(address, tls=tls is not None)
    if address.startswith(EXEC):
        return CommandStream(address[len(EXEC):])
    family, sockaddr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            host = server_hostname or (sockaddr[0] if isinstance(sockaddr, tuple) else None)
            sock = tls.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise
    return SocketStream(sock)


class UnixListener(socket.socket):
    """A listening Unix socket that removes its path when it is closed.

    A Unix socket's path outlives the socket: left behind, the next bind on it fails with
    "Address already in use". :meth:`close` (also on ``with`` exit, so on any error or
    signal its owner turns into an exception) removes the path, only if it is still the
    socket this listener bound (same device and inode: a path another process re-bound
    since is left alone).
    """

    _bound: Optional[Tuple[str, int, int]] = None

    def _bind_path(self, path: str) -> None:
        """Bind to ``path``; a stale socket file there is removed first (see :func:`listen`)."""
        try:
            self.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            _remove_stale_socket(path)
            self.bind(path)
        st = os.stat(path)
        self._bound = (os.path.abspath(path), st.st_dev, st.st_ino)

    def close(self) -> None:
        bound, self._bound = self._bound, None
        if bound is not None:
            path, dev, ino = bound
            try:
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == (dev, ino):
                    os.unlink(path)
            except OSError:
                pass  # already gone
        super().close()


def _remove_stale_socket(path: str) -> None:
    """Remove ``path`` if it is a stale Unix socket (one nobody accepts on: a connection is
    refused), left by a listener that was killed; raise ``OSError`` (EADDRINUSE) naming why
    not for a live socket or anything that is not a socket, which are never removed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return  # gone meanwhile: the caller binds again
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EADDRINUSE, f"{path!r} exists and is not a socket (not removed)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: its listener is gone
        return
    except OSError:
        pass  # a full backlog or a timeout: someone may still be listening
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path!r} is in use: another process listens on it")


def listen(address: str, backlog: int = 4) -> socket.socket:
    """A listening socket on ``address`` (port 0 picks a free one: see ``getsockname``).

    ``unix:PATH`` gives a :class:`UnixListener`: a stale socket file at ``PATH`` (its
    listener was killed: a connection is refused) is replaced, and ``PATH`` is removed
    when the listener is closed. A live socket, or a ``PATH`` that is not a socket, is
    refused (``OSError``, EADDRINUSE) and left as it is.
    """
    family, sockaddr = parse_address(address)
    sock = UnixListener(family, socket.SOCK_STREAM) if family == socket.AF_UNIX else socket.socket(family, socket.SOCK_STREAM)
    try:
        if isinstance(sock, UnixListener):
            sock._bind_path(str(sockaddr))
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def accept(listener: socket.socket, timeout: Optional[float], tls: Optional[ssl.SSLContext] = None) -> Optional[SocketStream]:
    """The next connection (TLS handshake done), or None when ``timeout`` passed first
    (``timeout`` 0: only a connection already waiting)."""
    # settimeout(0) would make the listener non-blocking: accept() then raises
    # BlockingIOError, not a timeout. A tiny wait means the same: take what is there.
    listener.settimeout(None if timeout is None else max(timeout, 1e-3))
    try:
        sock, _ = listener.accept()
    except socket.timeout:
        return None
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        sock.settimeout(DEFAULT_TIMEOUT)
        try:
            sock = tls.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise ConnectionLostError(f"TLS handshake failed: {exc}") from None
    return SocketStream(sock)
