"""``cellmigrate send`` and ``cellmigrate receive``: live migration of a state file.

``receive --listen HOST:PORT STATE_FILE`` stages incoming rounds in a hidden file next to
STATE_FILE and renames it over STATE_FILE only once the final round is proven equal to
the sender's state; until then STATE_FILE is untouched, whatever the peer or the network
does. ``send STATE_FILE HOST:PORT`` moves a file (``--live`` while another process keeps
writing it, paused by ``--pause-cmd`` for the final round). Registered by
:func:`add_commands` from :mod:`cellmigrate.cli`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import ssl
import stat
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._buffers import as_bytes_view
from .._types import BufferLike
from .._stdout import print_out
from ..cli import _nonneg_int, _nonneg_seconds, _one_line, _positive_seconds, _print_json  # one-line results whatever a file name holds; standard JSON
from ..errors import CellError, StateChangedError
from ..fingerprints import PageFingerprints
from ..progress import MigrationProgressEvent, ProgressEventKind
from ..statefile import SignalInterrupt, StateFile, changed_while_read, plural, take_over
from ..validation import AgentRequirements, MigrationValidator, NodeCapabilities
from .agent import FileStore
from .driver import DEFAULT_DOWNTIME_LIMIT, DEFAULT_MAX_ROUNDS, LiveMigration, RoundStats
from .errors import AbortedError, ConnectionLostError, OutcomeUnknownError
from .page_cache import DEFAULT_PAGE_CACHE_BYTES, MAX_PAGE_CACHE_BYTES, page_cache_size_ok
from .pages import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES
from .protocol import derive_key
from .receiver import DEFAULT_RESUME_TIMEOUT, LiveReceiver
from .sender import StreamChannel
from .transport import DEFAULT_TIMEOUT, EXEC, PipeStream, Stream, check_address, connect, listen, stop_command

__all__ = ["add_commands", "FileSource", "FileTarget"]

AddParser = Callable[[str, str, str], argparse.ArgumentParser]


class FileSource:
    """A :class:`~cellmigrate.live.agent.SourceAgent` over a file (mapped read-only).

    ``pause_cmd``/``resume_cmd`` are shell commands run for ``pause()``/``resume()``
    (e.g. ``kill -STOP 1234``); a command that fails, or runs longer than ``timeout``
    seconds (it and all it started are then killed), raises ``CellError``. After the
    pause command, the file must not change: :meth:`extra` (asked for before the COMMIT)
    raises :class:`~cellmigrate.errors.StateChangedError` when its size, modification
    time or inode did, as a writer the command did not stop changes them with
    ``write(2)`` (best effort: writes through a memory map may change none of them). The
    file is
    mapped again (a :class:`~cellmigrate.statefile.StateFile`) whenever its size changed
    since the last round; the maps are guarded, so a page the writer truncated away
    while a round reads it reads as zeros instead of killing the sender with SIGBUS
    (the next round sees the new size, and the final round is read paused).

    ``at_rest``: the file must not change while it is sent (``send`` without ``--live``):
    :meth:`extra`, asked for after the final round and before the COMMIT, raises
    :class:`~cellmigrate.errors.StateChangedError` when it did, so the receiver never
    takes a state the file never had. Compared are the size and times and the pages
    themselves (an XXH3-64 of each, taken at open: one more read of the file at each
    end), since a write through a memory map may leave the times as they were.
    """

    def __init__(self, path: str, pause_cmd: Optional[str] = None, resume_cmd: Optional[str] = None, *,
                 at_rest: bool = False, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.pause_cmd, self.resume_cmd = pause_cmd, resume_cmd
        self.at_rest = at_rest
        self.timeout = timeout
        self._paused: Optional[Tuple[int, ...]] = None  # the file as the pause left it
        self._file = StateFile(path, sequential=False)
        self._older: List[StateFile] = []
        self._pages = PageFingerprints.of(self._file.buffer) if at_rest else None

    def state(self) -> BufferLike:
        if os.fstat(self._file.fd).st_size != self._file.size:
            # Earlier rounds' arrays may still view the old map: close it with the source.
            self._older.append(self._file)
            self._file = StateFile(self.path, sequential=False)
        return self._file.buffer

    def close(self) -> None:
        """Unmap the file."""
        for f in [*self._older, self._file]:
            f.close()

    def pause(self) -> None:
        _run_command(self.pause_cmd, "pause", self.timeout)
        self._paused = _file_key(self.path)

    def resume(self) -> None:
        self._paused = None
        _run_command(self.resume_cmd, "resume", self.timeout)

    def check(self) -> None:
        """Raise ``StateChangedError`` (or ``TruncatedInputError``) if the file changed
        since it was opened (size, times: see :meth:`StateFile.check`; with ``at_rest``
        its pages too)."""
        for f in [*self._older, self._file]:
            f.check()
        if self._pages is not None and PageFingerprints.of(self._file.buffer) != self._pages:
            raise changed_while_read(self.path)

    def extra(self) -> bytes:
        if self.at_rest:
            self.check()
        elif self._paused is not None and _file_key(self.path) != self._paused:
            raise StateChangedError(f"{self.path!r} was written after the pause command returned: it did not stop "
                                    "the writer, and the final round would mix moments of the file")
        return b""


def _file_key(path: str) -> Tuple[int, ...]:
    """What a write to ``path`` changes: its inode, size and modification time (not the
    change time, which a backup tool's hard link or chmod moves too)."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileTarget:
    """A :class:`~cellmigrate.live.agent.TargetAgent` that renames the staged file into place.

    ``resume_cmd`` runs once the state file is in place (within ``timeout`` seconds: the
    sender waits for the outcome); ``adopted`` tells whether the rename happened (the
    staging file is then the state file: nothing more may be staged into it)."""

    def __init__(self, store: FileStore, path: str, resume_cmd: Optional[str] = None, *, timeout: float = 30.0) -> None:
        self.store, self.path, self.resume_cmd = store, path, resume_cmd
        self.timeout = timeout
        self.adopted = False

    def adopt(self, state: memoryview, extra: bytes) -> None:
        # The session flushed the staged file; one atomic rename makes it the state file,
        # with the old state file's permissions and owner (a receiver run as root keeps
        # the agent's file the agent's).
        with open(self.store.path, "rb") as staged:
            if os.path.samestat(os.fstat(staged.fileno()), self.store.stat()):
                take_over(staged.fileno(), self.path)
        os.replace(self.store.path, self.path)
        self.adopted = True
        dirfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    def resume(self) -> None:
        # A failure fails the migration (the sender resumes its writer), never silently.
        _run_command(self.resume_cmd, "resume", self.timeout)


#: What a pause or resume command that succeeded wrote to stderr is passed on, this much.
_COMMAND_STDERR_SHOWN = 64 << 10


def _run_command(cmd: Optional[str], what: str, timeout: float) -> None:
    """Run a user's shell command (``timeout`` seconds at most); ``CellError`` when it
    fails, ending with the start of what it wrote to stderr. Its output never goes
    through a pipe we would wait on: a command that starts an agent in the background
    (``agent &``) keeps a pipe open until the agent ends; a file does not. Its stdout
    goes to our stderr (with ``--stdio`` our stdout is the protocol's); its stderr goes to
    a file, copied to our stderr after it succeeds (64 KiB at most). When it runs out
    of time, or we are interrupted while it runs, it and everything it started are
    killed (:func:`~cellmigrate.live.transport.stop_command`: a pause command must not go
    on to stop the writer after the migration gave up and resumed it); it keeps our
    terminal, so it may prompt (``sudo``)."""
    if not cmd:
        return
    out: Any
    try:
        out = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # embedded, no real stderr
        out = subprocess.DEVNULL
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        except OSError as exc:  # no shell
            raise CellError(f"{what} command {cmd!r} could not be run: {exc}") from None
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_command(proc)
            raise CellError(f"{what} command {cmd!r} did not finish within {timeout:g} s (--timeout): "
                            "stopped it and all it started") from None
        except BaseException:  # Ctrl-C, a signal
            stop_command(proc)
            raise
        err.seek(0)
        if code != 0:
            detail = err.read(200).decode("utf-8", "replace").strip()
            raise CellError(f"{what} command {cmd!r} failed (exit {code})" + (f": {detail}" if detail else ""))
        if out is not subprocess.DEVNULL:  # its warnings are the user's, success or not
            text = err.read(_COMMAND_STDERR_SHOWN)
            if text:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.buffer.write(text if text.endswith(b"\n") else text + b"\n")
                    sys.stderr.flush()


# -- argument helpers -----------------------------------------------------------------------


def _positive_size(text: str) -> int:
    size = _size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, not {text!r}")
    return size


def _size(text: str) -> int:
    from ..cli import _size_arg

    return _size_arg(text)


def _key(args: argparse.Namespace) -> Optional[bytes]:
    from ..cli import _read_key

    raw = _read_key(args.key_file)
    return derive_key(raw) if raw is not None else None


def _server_tls(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    from ..cli import CliError

    if not (args.tls_cert or args.tls_key):
        if args.tls_ca:
            raise CliError("--tls-ca on 'receive' needs --tls-cert and --tls-key")
        return None
    if not (args.tls_cert and args.tls_key):
        raise CliError("--tls-cert and --tls-key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_ca:  # mutual TLS: the sender must present a certificate from this CA
            ctx.load_verify_locations(args.tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot load the TLS certificate/key: {exc}") from None
    return ctx


def _client_tls(args: argparse.Namespace) -> Optional[ssl.SSLContext]:
    from ..cli import CliError

    if not args.tls_ca:
        if args.tls_cert or args.tls_key:
            raise CliError("TLS on 'send' needs --tls-ca (the CA that signed the receiver's certificate)")
        return None
    try:
        ctx = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert or args.tls_key:
            if not (args.tls_cert and args.tls_key):
                raise CliError("--tls-cert and --tls-key go together")
            ctx.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot load the TLS files: {exc}") from None
    return ctx


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", metavar="FILE",
                   help="shared key (32 raw bytes or 64 hex digits): both ends prove they hold it "
                        "(keyed BLAKE3) and every frame carries a MAC")
    p.add_argument("--tls-cert", metavar="PEM", help="TLS certificate (receive: the server's; send: a client certificate)")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-ca", metavar="PEM",
                   help="CA certificates (send: verify the receiver, enables TLS; receive: require client certificates)")
    p.add_argument("--timeout", type=_positive_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="give up on a peer silent this long, and on a --pause-cmd/--resume-cmd that runs "
                        "longer (default: %(default)g)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def add_commands(add: AddParser) -> None:
    """Add ``send`` and ``receive`` to the CLI (``add(name, help, description)`` -> parser)."""
    p = add("receive", "receive a live migration into a state file",
            "Listen for one migration (cellmigrate send) and write it to STATE_FILE. Rounds are "
            "staged in a hidden file next to STATE_FILE, each chunk verified by its digest before it "
            "is written; STATE_FILE is replaced atomically only after the final round is proven "
            "equal to the sender's state (xxh3_128_tree). A dropped connection resumes where it "
            "stopped. Exits 0 after one completed migration (--keep-listening: serve more). "
            "Example: cellmigrate receive --listen 127.0.0.1:7070 agent.bin")
    p.add_argument("state_file", metavar="STATE_FILE", help="file to (re)place with the migrated state")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (port 0: any free port; unix:PATH too)")
    where.add_argument("--stdio", action="store_true", help="speak the protocol on stdin/stdout (e.g. behind ssh)")
    p.add_argument("--keep-listening", action="store_true",
                   help="serve migrations one after another until interrupted (Ctrl-C between migrations "
                        "exits 0); one that fails before STATE_FILE changes is noted, and it serves on; a "
                        "sender reconnecting to learn the outcome of an earlier one is answered meanwhile; "
                        "--json prints one line (JSON Lines) a migration")
    p.add_argument("--resume-timeout", type=_nonneg_seconds, default=DEFAULT_RESUME_TIMEOUT, metavar="SECONDS",
                   help="how long a dropped sender may take to reconnect (default: %(default)g)")
    p.add_argument("--linger", type=_nonneg_seconds, default=2.0, metavar="SECONDS",
                   help="after a migration, answer a sender reconnecting to learn its outcome, refusing new "
                        "ones (default: %(default)g; not used with --keep-listening, which answers it while "
                        "serving)")
    p.add_argument("--max-state-size", type=_positive_size, default=None, metavar="SIZE",
                   help="refuse an offered state larger than this (at least 1 byte), and any round that grows "
                        "the state past it "
                        "(default: offers up to 64GiB; a round may grow the state to twice the offered size, or "
                        "the offered size + 1GiB if that is more, never past 64GiB)")
    p.add_argument("--arch", action="append", default=None, metavar="NAME",
                   help="architectures this node runs (repeatable); an agent requiring another is refused")
    p.add_argument("--resume-cmd", metavar="CMD",
                   help="shell command run once the new state file is in place; if it fails, the migration "
                        "fails: the sender resumes its writer, receive exits 2, and STATE_FILE keeps the "
                        "migrated (proven) state")
    _common(p)
    p.set_defaults(handler=_cmd_receive)

    p = add("send", "live-migrate a state file to a receiver",
            "Send STATE_FILE to 'cellmigrate receive' at HOST:PORT and wait until the receiver proved it "
            "holds the same bytes. With --live the file may keep changing: pre-copy rounds send what "
            "changed until the final round fits --downtime-limit, then --pause-cmd stops the writer "
            "(e.g. 'kill -STOP PID'), the final round is sent and proven, and the receiver takes over; "
            "on failure --resume-cmd runs. A dropped connection is resumed without resending what the "
            "receiver committed. Example: cellmigrate send --live --pause-cmd 'kill -STOP 4242' "
            "--resume-cmd 'kill -CONT 4242' agent.bin 10.0.0.2:7070")
    p.add_argument("state_file", metavar="STATE_FILE", help="state file to send")
    p.add_argument("address", metavar="HOST:PORT",
                   help="the receiver (unix:PATH too; exec:COMMAND runs COMMAND, e.g. "
                        "'ssh nodeB cellmigrate receive --stdio FILE', and speaks over its stdin/stdout)")
    p.add_argument("--live", action="store_true", help="pre-copy rounds while the file keeps changing")
    p.add_argument("--pause-cmd", metavar="CMD",
                   help="shell command that stops the writer for the final round (required with --live)")
    p.add_argument("--resume-cmd", metavar="CMD",
                   help="shell command that restarts the writer if the migration fails (with --live)")
    p.add_argument("--downtime-limit", type=_positive_seconds, default=None, metavar="SECONDS",
                   help=f"pause budget of the final round with --live (default: {DEFAULT_DOWNTIME_LIMIT:g}, QEMU's)")
    p.add_argument("--max-rounds", type=_nonneg_int, default=None, metavar="N",
                   help=f"pre-copy rounds at most with --live (default: {DEFAULT_MAX_ROUNDS})")
    p.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_BYTES, metavar="SIZE",
                   help=f"bytes of pages per chunk, the unit committed and resent after a cut "
                        f"(4KiB..{MAX_CHUNK_BYTES >> 20}MiB; default: {DEFAULT_CHUNK_BYTES >> 20}MiB)")
    p.add_argument("--page-cache", type=_size, default=DEFAULT_PAGE_CACHE_BYTES, metavar="SIZE",
                   help="pages sent in delta rounds kept to send them again as XZR pages (QEMU's XBZRLE "
                        f"cache; 0: none, else 4KiB..64GiB; default: {DEFAULT_PAGE_CACHE_BYTES >> 20}MiB)")
    p.add_argument("--retries", type=_nonneg_int, default=5, metavar="N", help="reconnections to try after a cut (default: 5)")
    p.add_argument("--agent-id", metavar="UUID", help="agent id (default: random)")
    p.add_argument("--arch", metavar="NAME", help="architecture the agent requires (the receiver checks it)")
    p.add_argument("--tls-server-name", metavar="NAME", help="name to verify the receiver's certificate against")
    _common(p)
    p.set_defaults(handler=_cmd_send)


# -- receive -----------------------------------------------------------------------------


#: Completed migrations a --keep-listening receiver still answers for (a sender whose
#: DONE was lost reconnects within seconds).
_FINISHED_KEPT = 64


def _staging_path(path: str) -> str:
    p = Path(path)
    return str(p.with_name(f".{p.name}.cmlive-staging"))


def _shown_address(bound: Any) -> str:
    """A listener's ``getsockname()`` as ``send`` takes it: ``HOST:PORT``, ``[HOST]:PORT``
    for IPv6, ``unix:PATH``."""
    if isinstance(bound, tuple):
        host, port = bound[0], bound[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"unix:{bound}"


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(_one_line(text), file=sys.stderr, flush=True)


def _cmd_receive(args: argparse.Namespace) -> int:
    from ..cli import CliError

    key = _key(args)
    tls = _server_tls(args)
    # A symlinked STATE_FILE: stage beside, and rename over, the file it names (the link
    # stays), as the other commands do (statefile.open_output).
    args.state_file = os.path.realpath(args.state_file)
    _check_state_file(args.state_file)
    if args.stdio and (sys.stdin is None or sys.stdout is None):  # started with <&- or >&-
        raise CliError(f"--stdio speaks on stdin and stdout: {'stdin' if sys.stdin is None else 'stdout'} is closed")
    staging = _staging_path(args.state_file)
    store: Optional[FileStore] = None
    caps = None
    if args.arch:
        caps = NodeCapabilities.new()
        caps.architectures = list(args.arch)
        caps.max_state_size = args.max_state_size or (1 << 62)
    max_state_size = args.max_state_size or 0  # 0: the library's default bound
    listener = None
    # --keep-listening: the migrations completed here, for senders reconnecting to learn
    # their outcome (the newest few: a sender retries within seconds).
    finished: Dict[bytes, int] = {}
    received = 0
    # The listener is closed (and a unix:PATH removed) on any exit from here on: a signal
    # may arrive right after the "listening on" line, before anything was received.
    try:
        # Staged into (and locked) before listening: a second receiver given the same
        # STATE_FILE is refused here, not after it has taken a sender's pages.
        store = _open_store(staging, args.state_file)
        if args.listen:
            try:
                # unix:PATH: a stale socket file is replaced, and PATH is removed when the
                # listener is closed below, on any exit (errors and signals included).
                listener = listen(args.listen)
            except OSError as exc:
                raise CliError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
            except ValueError as exc:
                raise CliError(f"cannot listen on {args.listen}: {exc}") from None
            bound = listener.getsockname()
            shown = _shown_address(bound)
            # Without a key any peer that reaches the port may replace STATE_FILE (and
            # trigger --resume-cmd): say so where the user looks, on the line that names
            # the address.
            warning = "" if key is not None else " (no --key-file: unauthenticated, any peer that reaches it can replace the state)"
            _say(args, f"cellmigrate receive: listening on {shown}{warning}")
        receiver: Optional[LiveReceiver] = None
        target: Optional[FileTarget] = None
        reported: Optional[LiveReceiver] = None
        try:
            while True:
                args.done = None  # set once this migration is reported (see _report_received)
                if store is None:
                    store = _open_store(staging, args.state_file)
                target = FileTarget(store, args.state_file, args.resume_cmd, timeout=args.timeout)
                receiver = LiveReceiver(  # a validator of its own: each migration's audit trail
                    store, target, key=key, capabilities=caps,
                    timeout=args.timeout, max_state_size=max_state_size,
                    finished=finished if args.keep_listening else None,
                )
                adopted = target

                def dropped(exc: CellError) -> None:
                    if adopted.adopted:  # the staging file is STATE_FILE now: serve nothing more with it
                        raise exc
                    _say(args, f"cellmigrate receive: connection dropped: {exc.message or exc}")

                try:
                    if listener is not None:
                        receiver.serve(listener, tls=tls, resume_timeout=args.resume_timeout, on_drop=dropped)
                    elif not receiver.handle(PipeStream(sys.stdin.fileno(), sys.stdout.fileno())):
                        raise receiver.last_error or ConnectionLostError("the sender closed the stream")
                except CellError as exc:
                    if target.adopted:  # the resume command failed (its own words), or the connection after
                        cause = exc.__cause__ if isinstance(exc.__cause__, CellError) else exc
                        raise CliError(f"{args.state_file!r} holds the migrated state, proven, but the migration "
                                       f"failed: {cause.message or cause} (the sender resumes its writer)") from None
                    message = (f"{exc.message}; {args.state_file!r} is unchanged" if isinstance(exc, AbortedError)
                               else str(exc))
                    if args.keep_listening and listener is not None:
                        # One migration failed, before STATE_FILE changed: the next may not.
                        _say(args, f"cellmigrate receive: migration failed: {message} (serving on)")
                        continue  # after the finally below: its staging file is removed
                    raise CliError(message) from None
                finally:
                    if not target.adopted:
                        store.unlink()  # still locked: no other receiver has it yet
                    store.close()
                    store = None
                _report_received(args, receiver)
                reported = receiver
                received += 1
                if not args.keep_listening or listener is None:
                    if listener is not None and args.linger > 0:
                        # A sender whose DONE was cut off reconnects to learn the outcome.
                        receiver.linger(listener, args.linger, tls)
                    return 0
                done = receiver.finished_migration
                if done is not None:
                    finished[done[0]] = done[1]
                    while len(finished) > _FINISHED_KEPT:
                        del finished[next(iter(finished))]
        except (KeyboardInterrupt, SignalInterrupt):
            # Between migrations (in the linger, or --keep-listening waiting for the next
            # sender) an interrupt ends a receive that did its work: exit 0. In the middle
            # of one, or before any with a single migration expected, it is an interrupt.
            if receiver is not None and receiver.in_progress:
                if target is not None and target.adopted:
                    _say(args, f"cellmigrate receive: {args.state_file!r} holds the migrated state, proven; "
                               "interrupted while its --resume-cmd ran")
                raise
            if receiver is not None and receiver.session.completed and reported is not receiver:
                _report_received(args, receiver)  # done, not yet said
                received += 1
            if not args.keep_listening and not received:
                raise
            if args.keep_listening:
                _say(args, f"cellmigrate receive: stopped after {plural(received, 'migration')}")
            return 0
    finally:
        if listener is not None:
            listener.close()
        if store is not None:  # never served: the empty staging file goes
            store.unlink()
            store.close()


def _check_state_file(path: str) -> None:
    """Refuse, before listening, a STATE_FILE that could never be replaced: one that is
    not a regular file, or one in a directory that is missing or not writable."""
    from ..cli import CliError
    from ..statefile import file_kind

    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        missing = not os.path.lexists(folder)
        raise CliError(f"cannot receive into {path!r}: {folder!r} {'does not exist' if missing else 'is not a directory'}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CliError(f"cannot receive into {path!r}: {exc.strerror or exc}") from None
    else:
        if not stat.S_ISREG(st.st_mode):
            raise CliError(f"cannot receive into {path!r}: is {file_kind(st.st_mode)}, not a regular file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"cannot receive into {path!r}: no permission to create files in {folder!r}")


def _open_store(staging: str, state_file: str) -> FileStore:
    from ..cli import CliError

    try:
        return FileStore(staging)
    except OSError as exc:
        raise CliError(f"cannot create the staging file {staging!r}: {exc.strerror or exc}") from None
    except CellError:
        raise CliError(f"cannot receive into {state_file!r}: another receiver is staging into it "
                       f"({staging!r} is locked)") from None


def _report_received(args: argparse.Namespace, receiver: LiveReceiver) -> None:
    s = receiver.session
    assert s.offer is not None
    size = os.stat(args.state_file).st_size
    out = sys.stderr if args.stdio else sys.stdout  # with --stdio, stdout is the protocol's
    # A report that cannot be written (stdout on a full disk) says this first (cli._main).
    args.done = f"{args.state_file!r} holds the migrated state, proven"
    if args.json:
        # --keep-listening: JSON Lines, one compact object a migration.
        _print_json({
            "state_file": args.state_file,
            "migration_id": str(uuid.UUID(bytes=s.offer.migration_id)),
            "agent_id": str(uuid.UUID(bytes=s.offer.agent_id)),
            "state_size": size,
            "chunks": s.committed_seq,
            "page_bytes": s.bytes_received,
            "audit": [e.to_dict() for e in s.validator.audit_log],
        }, file=out, flush=True, compact=args.keep_listening)
    elif not args.quiet:
        print_out(_one_line(f"received {args.state_file}: {plural(size, 'byte')} in {plural(s.committed_seq, 'chunk')} "
                         f"({s.bytes_received} page bytes), proven equal to the sender's state"), out, flush=True)


# -- send --------------------------------------------------------------------------------


def _cmd_send(args: argparse.Namespace) -> int:
    from ..cli import CliError

    if not args.live:  # each option of the pre-copy rounds, named when given without them
        given = [name for name, value in (("--pause-cmd", args.pause_cmd), ("--resume-cmd", args.resume_cmd),
                                          ("--max-rounds", args.max_rounds), ("--downtime-limit", args.downtime_limit))
                 if value is not None]
        if given:
            raise CliError(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --live")
    if args.max_rounds is None:
        args.max_rounds = DEFAULT_MAX_ROUNDS
    if args.downtime_limit is None:
        args.downtime_limit = DEFAULT_DOWNTIME_LIMIT
    if args.live and not args.pause_cmd:
        # Without a pause the final round races the writer: the receiver would prove the
        # pages as they were sent, a mix of moments, and the summary's digest would be of
        # the file as it is after, neither a state the file ever had.
        raise CliError("--live needs --pause-cmd, the command that stops the writer for the final round "
                       "('--pause-cmd true' if the writer stops by itself)")
    try:
        check_address(args.address, tls=bool(args.tls_ca))  # a usage error, before the state file is opened
    except ValueError as exc:
        raise CliError(f"bad receiver address: {exc}") from None
    _key(args)  # bad key or TLS files are reported before the state file is opened
    _client_tls(args)
    try:
        source = FileSource(args.state_file, args.pause_cmd, args.resume_cmd, at_rest=not args.live,
                            timeout=args.timeout)
    except OSError as exc:
        raise CliError(f"cannot open {args.state_file!r}: {exc.strerror or exc}") from None
    except CellError as exc:  # locked by a writer of ours, a pending journal, ...
        raise CliError(str(exc)) from None
    try:
        return _send(args, source)
    finally:
        source.close()


def _reason(exc: BaseException) -> str:
    """An error in words: an OS error's own text, without its '[Errno 111]'."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _send(args: argparse.Namespace, source: FileSource) -> int:
    from ..cli import EXIT_DIFFERENT, CliError, _progress

    key = _key(args)
    tls = _client_tls(args)
    size = as_bytes_view(source.state()).nbytes
    try:
        agent_id = uuid.UUID(args.agent_id) if args.agent_id else uuid.uuid4()
    except ValueError:
        raise CliError(f"invalid --agent-id {args.agent_id!r}") from None

    connected = False

    def open_stream() -> Stream:
        nonlocal connected
        stream = connect(args.address, timeout=args.timeout, tls=tls, server_hostname=args.tls_server_name)
        connected = True
        return stream

    bar = None if args.json else _progress(args, size, "send")
    rounds: List[RoundStats] = []

    def on_event(event: MigrationProgressEvent) -> None:
        if bar is not None and event.kind is ProgressEventKind.TRANSFER_PROGRESS:
            done = min(getattr(event, "transferred_bytes", 0), size)
            if done > bar.n:
                bar.update(done - bar.n)

    def on_round(stats: RoundStats) -> None:
        rounds.append(stats)
        if not args.quiet and not args.json:
            tag = "final" if stats.final else f"round {stats.round}"
            print(f"  {tag}: {plural(stats.dirty_pages, 'page')}, {plural(stats.wire_bytes, 'byte')} sent in {stats.duration_s:.3f} s"
                  + (f", downtime {stats.actual_downtime_s:.3f} s" if stats.actual_downtime_s is not None else ""),
                  file=sys.stderr, flush=True)

    if not 4096 <= args.chunk_size <= MAX_CHUNK_BYTES:
        raise CliError(f"--chunk-size must be between 4KiB and {MAX_CHUNK_BYTES >> 20}MiB")
    if not page_cache_size_ok(args.page_cache):
        raise CliError(f"--page-cache must be 0 (none) or between 4KiB and {MAX_PAGE_CACHE_BYTES >> 30}GiB")
    # A command started again is a new receiver (nothing staged to resume): no retries.
    retries = 0 if args.address.startswith(EXEC) else args.retries
    channel = StreamChannel(
        open_stream, key=key, timeout=args.timeout, retries=retries, window_bytes=3 * args.chunk_size,
        on_reconnect=lambda attempt, cause: _say(
            args, f"cellmigrate send: {'reconnecting' if connected else 'trying to connect again'} ({attempt}): "
                  f"{_reason(cause)}"),
    )
    validator = MigrationValidator()
    migration = LiveMigration(
        source, channel, agent_id=agent_id,
        requirements=AgentRequirements(architecture=args.arch, state_size=size),
        downtime_limit=args.downtime_limit, max_rounds=args.max_rounds if args.live else 0, chunk_bytes=args.chunk_size,
        page_cache_bytes=args.page_cache, validator=validator, progress=on_event, on_round=on_round,
    )
    try:
        summary = migration.run()
    except CellError as exc:
        changed = exc if isinstance(exc, StateChangedError) else None
        if changed is None and not args.live and connected and not isinstance(exc, OutcomeUnknownError):
            try:  # a file written while sent explains a refused chunk or digest
                source.check()
            except StateChangedError as found:
                changed = found
            except CellError:
                pass  # only an explanation: the migration's own error stands
        if changed is not None:
            hint = ("--pause-cmd must stop every writer of the file" if args.live
                    else "a file being written needs --live with --pause-cmd")
            raise CliError(f"{changed.message}; the receiver keeps its state ({hint})", EXIT_DIFFERENT) from None
        cause = exc.__cause__
        if not connected and isinstance(cause, OSError):  # never reached: "connection lost" would mislead
            raise CliError(f"cannot connect to {args.address}: {cause.strerror or cause}") from None
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot reach {args.address}: {exc.strerror or exc}") from None
    finally:
        if bar is not None:
            bar.close()
    args.done = f"{args.state_file!r} is migrated, proven equal on the receiver"  # see cli._main
    if args.json:
        out: Any = summary.to_dict()
        out["reconnects"] = channel.reconnects
        _print_json(out, flush=True)
    elif not args.quiet:
        print_out(_one_line(f"sent {args.state_file}: {plural(summary.state_size, 'byte')} in {plural(len(summary.rounds), 'round')}, "
                         f"{summary.wire_bytes} bytes on the wire ({summary.transfer_ratio:.2f}x the state), "
                         f"downtime {summary.downtime_s:.3f} s, proven equal on the receiver "
                         f"(xxh3_128_tree {summary.digest.hex()})"), flush=True)
    return 0
