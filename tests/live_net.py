"""Helpers of the live-migration network tests: a receiver process, a cutting proxy, TLS files."""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Sequence

CLI = [sys.executable, "-m", "cellmigrate"]
_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


class Receiver:
    """``cellmigrate receive --listen 127.0.0.1:0`` in a subprocess; ``address`` once it listens."""

    def __init__(self, state_file: Path, *extra: str, stdout: Any = subprocess.PIPE) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "receive", "--listen", "127.0.0.1:0", str(state_file), *extra],
            stdout=stdout, stderr=subprocess.PIPE, text=True, env=_ENV,
        )
        assert self.proc.stderr is not None
        self.err_lines: List[str] = []
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, "receiver did not start listening"
            line = self.proc.stderr.readline()
            assert line, f"receiver exited: {self.proc.wait()} {self.err_lines}"
            self.err_lines.append(line)
            m = re.search(r"listening on (\S+)", line)
            if m:
                self.address = m.group(1)
                break

    def wait(self, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
        out, err = self.proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, "".join(self.err_lines) + err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def send(*args: str, timeout: float = 120) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([*CLI, "send", *args], capture_output=True, text=True, timeout=timeout, env=_ENV)


#: What a relay does with a piece read from one side: ``(data, other side) -> end the connection?``
Forward = Callable[[bytes, socket.socket], bool]


def _send_on(data: bytes, to: socket.socket) -> bool:
    """The plain :data:`Forward`: pass the piece on, keep the connection."""
    to.sendall(data)
    return False


class _Proxy:
    """Listens on 127.0.0.1 (``address``), counts the connections it accepts
    (``connections``) and hands each to :meth:`_accepted` on its accept thread, until
    :meth:`close`. Subclasses set their own attributes before calling ``__init__``: the
    accept thread starts there."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            self._accepted(client, self.connections - 1)

    def _accepted(self, client: socket.socket, index: int) -> None:
        """Connection number ``index`` (from 0) was accepted: relay it, hold it or close it."""
        raise NotImplementedError

    def _relay(self, client: socket.socket, up: Forward, down: Forward = _send_on, seconds: float = 300) -> None:
        """Connect to ``target`` and relay between it and ``client`` on a thread of its own:
        what the client sends goes through ``up``, what the server sends through ``down``.
        The client is closed if the target cannot be reached."""
        try:
            server = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        threading.Thread(target=_pump, args=(client, server, up, down, seconds), daemon=True).start()

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        self._thread.join(5)


def _pump(client: socket.socket, server: socket.socket, up: Forward, down: Forward, seconds: float) -> None:
    """Relay until either side closes, a :data:`Forward` ends the connection, an error, or
    ``seconds`` (bounded: no endless loop whatever happens); then close both sides."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([client, server], [], [], 0.5)
            for s in ready:
                data = s.recv(1 << 16)
                if not data:
                    return
                if up(data, server) if s is client else down(data, client):
                    return
    except OSError:
        return
    finally:
        for s in (client, server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class CuttingProxy(_Proxy):
    """Forwards 127.0.0.1 connections to ``target``; the first ``cuts`` connections are cut
    (both sides closed) once ``cut_after[i]`` bytes went from client to server."""

    def __init__(self, target: str, cut_after: Sequence[int]) -> None:
        self.cut_after = list(cut_after)
        self.forwarded = 0  # client -> server bytes, all connections
        super().__init__(target)

    def _accepted(self, client: socket.socket, index: int) -> None:
        limit = self.cut_after[index] if index < len(self.cut_after) else None
        sent = 0

        def up(data: bytes, server: socket.socket) -> bool:
            nonlocal sent
            if limit is not None and sent + len(data) >= limit:
                server.sendall(data[: limit - sent])
                self.forwarded += limit - sent
                return True  # cut
            sent += len(data)
            self.forwarded += len(data)
            server.sendall(data)
            return False

        self._relay(client, up)


class FlippingProxy(_Proxy):
    """Forwards 127.0.0.1 connections to ``target``; on the first connection the byte at
    client -> server offset ``at`` is flipped (damage in transit that TCP missed)."""

    def __init__(self, target: str, at: int) -> None:
        self.at = at
        super().__init__(target)

    def _accepted(self, client: socket.socket, index: int) -> None:
        sent = 0

        def up(data: bytes, server: socket.socket) -> bool:
            nonlocal sent
            if index == 0 and sent <= self.at < sent + len(data):
                piece = bytearray(data)
                piece[self.at - sent] ^= 0x01
                data = bytes(piece)
            sent += len(data)
            server.sendall(data)
            return False

        self._relay(client, up)


def self_signed(tmp: Path) -> tuple:
    """A self-signed certificate for 127.0.0.1/localhost made with the openssl CLI: (cert, key)."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


class DoneDroppingProxy(_Proxy):
    """Forwards 127.0.0.1 connections to ``target`` (an unkeyed stream-protocol receiver)
    but never delivers the receiver's DONE frame: it closes both sides instead, so the
    sender cannot learn that the commit succeeded. Reconnections after that never reach
    the receiver: with ``after="refuse"`` the proxy stops listening (connection refused),
    with ``"eof"`` it accepts and closes at once, with ``"silent"`` it accepts and says
    nothing until :meth:`close`; with ``"forward"`` it relays them to ``target``."""

    _HEADER = struct.Struct("<IB")  # frame length, frame type (transport._HEADER)
    _DONE = 12  # protocol.Msg.DONE

    def __init__(self, target: str, after: str) -> None:
        self.after = after
        self.dropped_done = threading.Event()
        self._held: List[socket.socket] = []
        super().__init__(target)

    def _accepted(self, client: socket.socket, index: int) -> None:
        if self.dropped_done.is_set():  # a reconnection: the receiver is never reached
            if self.after == "forward":
                self._relay(client, _send_on, _send_on, seconds=120)
            elif self.after == "silent":
                self._held.append(client)
            else:
                client.close()
            return
        pending = b""  # server -> client bytes not yet forwarded (whole frames only)

        def down(data: bytes, client: socket.socket) -> bool:
            nonlocal pending
            pending += data
            while len(pending) >= self._HEADER.size:
                length, kind = self._HEADER.unpack_from(pending)
                if kind == self._DONE:
                    if self.after == "refuse":
                        self.listener.close()
                    self.dropped_done.set()
                    return True
                end = self._HEADER.size + length
                if len(pending) < end:
                    break
                client.sendall(pending[:end])
                pending = pending[end:]
            return False

        self._relay(client, _send_on, down, seconds=120)

    def close(self) -> None:
        super().close()
        for s in self._held:
            s.close()
