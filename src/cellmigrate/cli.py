"""The ``cellmigrate`` command line: checksum, diff, apply, recover, verify, inspect, demo, bench.

Run ``cellmigrate --help`` (or ``python -m cellmigrate --help``) for the list, and
``cellmigrate COMMAND --help`` for each command. Conventions every command follows:

* State files are memory-mapped (:class:`~cellmigrate.statefile.StateFile`), never read
  whole, so multi-GiB states run in bounded memory.
* Exit codes: ``0`` success, ``1`` verification failed or the states differ (including a
  delta that is refused because it does not fit the base, and a state that changed while
  it was read), ``2`` usage error, unreadable/corrupt/truncated input, or a full disk;
  ``141`` (no message) when the reader of stdout went away. Errors are one line on stderr, never a traceback (set
  ``CELLMIGRATE_DEBUG=1`` to get the traceback of an unexpected error).
* Results go to stdout (``--json`` for machine-readable output where it makes sense);
  progress bars go to stderr, only when stderr is a terminal and the work is long.
* ``--quiet`` silences everything but errors (and the value ``checksum`` was asked for).
* Files (:mod:`cellmigrate.statefile`, :mod:`cellmigrate.journal`): outputs are never an
  input and never an existing file without ``-f/--force``; ``-`` is stdin/stdout for
  deltas; in-place ``apply`` is journaled; SIGTERM/SIGHUP clean up like SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hmac
import os
import re
import stat
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple, Union, cast

from ._jsontext import json_text
from ._stdout import STDOUT, StdoutError, flush_stdout, print_out
from .errors import JournalError, StateChangedError, TruncatedInputError
from .statefile import (
    STREAM,
    Output,
    SignalInterrupt,
    StateFile,
    copy_range,
    format_size,
    open_input_stream,
    open_output,
    parse_size,
    plural,
    signals_raise,
    spool_stream,
    hook_pause,
    write_all,
)
from .wire import DEFAULT_MAX_TOTAL_SIZE, payload_wire_size

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tqdm import tqdm as Tqdm

    from ._pages import DecodedPages
    from ._types import Buffer
    from .delta import DeltaSnapshot

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_DIFFERENT", "EXIT_ERROR", "EXIT_BROKEN_PIPE"]

PROG = "cellmigrate"

EXIT_OK = 0
#: Verification failed, the states differ, or a delta was refused for this base.
EXIT_DIFFERENT = 1
#: Usage error, or input that cannot be read or decoded.
EXIT_ERROR = 2
#: The reader of stdout went away before the output was all written (no message): the
#: status of a filter that SIGPIPE ended, 128 + 13.
EXIT_BROKEN_PIPE = 141

#: Work below this many bytes finishes well under a second on the kernels (several GB/s),
#: so it gets no progress bar; the environment variable lowers it (for demos and tests).
PROGRESS_MIN_BYTES = int(os.environ.get("CELLMIGRATE_PROGRESS_MIN_BYTES", str(1 << 30)))
#: Chunk of the state processed between two progress updates.
CHUNK = 64 << 20

KEY_SIZE = 32
#: Default of ``--max-size`` on every command that writes or reads a delta (diff, apply,
#: inspect): the wire reader's own default bound on a delta's state size (64 GiB), one
#: constant for both sides, so a delta 'diff' writes by default is one that
#: 'inspect'/'apply' (and ``DeltaSnapshot.deserialize``) read by default.
DEFAULT_MAX_SIZE = DEFAULT_MAX_TOTAL_SIZE
#: The second is the default: the digest deltas carry (``cellmigrate.DEFAULT_DIGEST``).
CHECKSUM_ALGORITHMS = ("simple", "xxh3_128_tree", "xxh3_128", "blake3")
DIGEST_CHOICES = ("xxh3_128_tree", "xxh3_128", "blake3", "none")


class CliError(Exception):
    """An expected failure: printed as one line on stderr, mapped to an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------------------
# argparse plumbing
# --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (``prog: error: ... (see --help)``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")

    def _print_message(self, message: str, file: Any = None) -> None:
        # argparse drops a failed write of --help or --version (exit 0 with nothing
        # written to a full disk); the help and version go through print_out like the rest.
        if message:
            if file is None or file is sys.stdout:
                print_out(message, end="")
            else:
                try:
                    file.write(message)
                except OSError:
                    pass  # stderr itself is gone: nothing is left to tell


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _uuid_arg(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid UUID {text!r}") from None


#: The longest duration an option takes, in seconds (about 116 days): past it, the
#: system's clocks and socket timeouts overflow (time_t, poll's milliseconds).
_MAX_SECONDS = 10_000_000


def _seconds(text: str, *, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not (0 <= value <= _MAX_SECONDS) or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise argparse.ArgumentTypeError(f"must be a number of seconds {bound} and at most {_MAX_SECONDS}, got {text}")
    return value


def _positive_seconds(text: str) -> float:
    """A duration that must pass (a timeout, a budget): finite, > 0."""
    return _seconds(text, zero_ok=False)


def _nonneg_seconds(text: str) -> float:
    """A duration that may be zero (a grace period): finite, >= 0."""
    return _seconds(text, zero_ok=True)


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


#: Largest value of a u64 wire-format field (sequence numbers).
_U64_MAX = (1 << 64) - 1


def _u64_arg(text: str) -> int:
    """An integer option stored in a u64 field of the wire format: 0 .. 2**64-1."""
    value = _nonneg_int(text)
    if value > _U64_MAX:
        raise argparse.ArgumentTypeError(f"must be <= {_U64_MAX} (a u64 of the wire format), got {value}")
    return value


def _add_allow_legacy_keyed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-legacy-keyed", action="store_true",
                   help="accept a keyed version-1 delta (refused by default). DANGEROUS: the v1 header "
                        "(agent id, sequences, timestamp, sizes) is not under the MAC, so such a delta "
                        "can be replayed to another agent or round undetected; use only for a delta you "
                        "know the origin of, and re-create it with this version")


def _add_max_size(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("--max-size", type=_size_arg, default=DEFAULT_MAX_SIZE, metavar="SIZE",
                   help=f"{role}; the same limit on the writing and the reading side "
                        f"(default: {format_size(DEFAULT_MAX_SIZE).replace(' ', '')}, the library reader's default)")


#: What -q/--quiet does in each command (its help there).
_QUIET_HELP = {
    "checksum": "print nothing but errors and the value (or the --json object)",
    "diff": "print no summary line (errors, and the --json object if asked, still are)",
    "apply": "print no result line (errors, and the --json object if asked, still are)",
    "recover": "print no result line, only errors",
    "verify": "print nothing but errors: the exit code says identical (0) or not (1)",
    "inspect": "print nothing but errors (and the --json object if asked): a check that DELTA decodes",
    "demo": "print nothing but errors: the exit code says whether every step behaved",
    "bench": "print no table (the --json list, if asked, still is)",
    "receive": "print no 'listening on' line, notes or result line (errors, and the --json object if asked, still are)",
    "send": "print no progress, per-round lines, notes or summary line (errors, and the --json object if asked, "
            "still are)",
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for documentation and tests)."""
    from . import __version__

    # -q/--quiet is accepted before or after the command name. The sub-parser's copy
    # defaults to SUPPRESS so it never overwrites a value given before the command; its
    # help says what it silences in that command (_QUIET_HELP).

    parser = _Parser(
        prog=PROG,
        description=(
            "Verified migration of agent memory state: find the 4 KiB pages that changed "
            "between two state files, ship them as a compact self-checking delta, apply it "
            "atomically, and prove the result byte for byte."
        ),
        epilog=(
            # The README's sentence, word for word (tests/test_cli_trial.py checks it).
            "Exit codes: 0 success, 1 states differ, delta refused or a state changed while read, 2 usage "
            "error, corrupt or truncated input, or a full disk. Start with: cellmigrate demo"
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", default=False,
                        help="print nothing but errors (and the value for 'checksum')")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description)
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=_QUIET_HELP[name])
        return p

    p = add("checksum", "print the checksum or digest of a state file",
            "Print the checksum of FILE: 'simple' is the Rust crate's weighted sum (decimal u32), "
            "'xxh3_128_tree' (XXH3-128 over 1 MiB leaves, the digest deltas carry), 'xxh3_128' and "
            "'blake3' are strong digests (hex). With --key-file, blake3 is keyed "
            "(the MAC a keyed delta carries).")
    p.add_argument("file", metavar="FILE", help="state file")
    p.add_argument("-a", "--algorithm", choices=CHECKSUM_ALGORITHMS, default=CHECKSUM_ALGORITHMS[1],
                   help="checksum algorithm (default: %(default)s)")
    p.add_argument("--key-file", metavar="F", help="32-byte key for keyed blake3 (raw, or 64 hex digits)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(handler=_cmd_checksum)

    p = add("diff", "write the delta that turns OLD into NEW",
            "Compare OLD and NEW (same size) page by page and write the changed 4 KiB pages, "
            "compressed, as a self-checking delta file. The delta records the checksum and a "
            "strong digest of NEW, so 'apply' can prove its result.")
    p.add_argument("old", metavar="OLD", help="the state the receiver already has")
    p.add_argument("new", metavar="NEW", help="the state to ship")
    p.add_argument("-o", "--output", metavar="DELTA", required=True,
                   help="delta file to write (atomically; '-' for stdout; a FIFO or device is written through)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing DELTA (never an input)")
    p.add_argument("--digest", choices=DIGEST_CHOICES, default=None,
                   help="strong digest of NEW to record (default: xxh3_128_tree, or blake3 with --key-file; "
                        "'none' gives a checksum-only delta, as the Rust crate writes: raw and RLE pages only, "
                        "no XOR pages, which need a proven base)")
    p.add_argument("--key-file", metavar="F",
                   help="32-byte key (raw, or 64 hex digits): authenticate the delta with keyed BLAKE3 (a MAC)")
    p.add_argument("--agent-id", type=_uuid_arg, default=uuid.UUID(int=0), metavar="UUID",
                   help="agent id recorded in the delta (default: the nil UUID)")
    p.add_argument("--base-sequence", type=_u64_arg, default=0, metavar="N",
                   help="sequence number of OLD (default: %(default)s)")
    p.add_argument("--sequence", type=_u64_arg, default=None, metavar="N",
                   help="sequence number of NEW (default: base sequence + 1)")
    p.add_argument("--resize", action="store_true",
                   help="let OLD and NEW differ in size (e.g. a WebAssembly memory.grow): pages past OLD's "
                        "end are diffed against zeros, and apply grows or cuts the base to NEW's size")
    p.add_argument("--compress", default="auto", metavar="{auto,none,rle,xor,zstd[:LEVEL]}",
                   help="page encodings: 'auto' (default: zero pages, XOR with OLD, RLE, each page the "
                        "smallest; zstd over the page data when it wins), 'xor' (the same, never zstd), "
                        "'rle' (the Rust crate's), 'none' (raw pages), 'zstd[:LEVEL]' (always zstd, "
                        "level 1-22, default 3); see docs/FORMAT.md")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    _add_max_size(p, "refuse an OLD or NEW larger than this, as readers refuse deltas for larger states")
    p.set_defaults(handler=_cmd_diff)

    p = add("apply", "apply a delta to BASE (atomically)",
            "Apply DELTA to BASE. The whole result is verified against the delta's checksum and "
            "digest (and MAC) before a single byte is written: a refused delta leaves BASE byte "
            "for byte unchanged. Without -o, BASE is updated in place under an undo journal "
            "(BASE.cmjournal): killed at any instant, BASE is the old or the new state once the next "
            "cellmigrate command (or 'cellmigrate recover BASE') has run. With -o, the result is built "
            "in a temporary file beside OUT, synced and renamed to OUT, so OUT is either complete or "
            "absent.")
    p.add_argument("base", metavar="BASE", help="the state the delta was made against")
    p.add_argument("delta", metavar="DELTA", help="delta file written by 'cellmigrate diff' ('-' for stdin)")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="write the result here instead of updating BASE ('-' for stdout)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing OUT (never an input)")
    p.add_argument("--key-file", metavar="F", help="32-byte key (raw, or 64 hex digits) of an authenticated delta")
    p.add_argument("--safe-replace", action="store_true",
                   help="in place, but through a temporary copy renamed over BASE: a crash cannot "
                        "leave BASE half-written (costs one full copy)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    _add_max_size(p, "refuse a delta for a state larger than this")
    _add_allow_legacy_keyed(p)
    p.set_defaults(handler=_cmd_apply)

    p = add("recover", "roll back the journal of an interrupted in-place apply",
            "If an in-place 'apply' on BASE was interrupted (killed, power lost), BASE.cmjournal holds "
            "the original bytes of the pages it was writing: write them back so BASE is exactly the "
            "state it was before that apply (an incomplete journal, written before BASE was touched, "
            "is just removed). On a clean file, says so. Every other command does this by itself when "
            "it can write BASE.")
    p.add_argument("base", metavar="BASE", help="state file")
    p.set_defaults(handler=_cmd_recover)

    p = add("verify", "check that two state files are identical, byte for byte",
            "Compare A and B byte for byte. Exit 0 when identical; exit 1 and print the first "
            "differing offset when not.")
    p.add_argument("a", metavar="A", help="first state file")
    p.add_argument("b", metavar="B", help="second state file")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(handler=_cmd_verify)

    p = add("inspect", "show a delta's header, pages, sizes and ratios",
            "Decode DELTA (checking its structure and the XXH3-128 hash of its payload, which catches "
            "damage in transit) and show what it contains. The digest or MAC of the result it carries "
            "needs the base (and the key): 'apply' checks it, 'inspect' does not.")
    p.add_argument("delta", metavar="DELTA", help="delta file ('-' for stdin)")
    p.add_argument("--pages", action="store_true", help="also list every page")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    _add_max_size(p, "refuse a delta for a state larger than this")
    _add_allow_legacy_keyed(p)
    p.set_defaults(handler=_cmd_inspect)

    p = add("demo", "run an end-to-end migration of a synthetic agent",
            "Migrate a synthetic agent state end to end, step by step: compatibility check, "
            "rollback point, incremental delta, transfer, atomic apply, byte-for-byte "
            "verification; then a migration whose delta is corrupted in transit, refused, and "
            "rolled back; then a running WebAssembly agent migrated live over TCP on 127.0.0.1 "
            "(pre-copy rounds while it runs, a paused final round, resumed on the target; needs "
            "wasmtime, cellmigrate[wasm], and is skipped with a note without it). "
            "Prints sizes, timings, GB/s and the audit trail.")
    p.add_argument("--size", type=_size_arg, default=256 << 20, metavar="SIZE",
                   help="state size, e.g. 64MiB, 1GiB or bytes (default: 256MiB)")
    p.add_argument("--seed", type=_nonneg_int, default=2024, metavar="N",
                   help="random seed of the synthetic state (default: %(default)s)")
    p.set_defaults(handler=_cmd_demo)

    p = add("bench", "quick throughput table: cellmigrate's kernels vs peers",
            "Measure GB/s of cellmigrate's kernels (checksum, compare, dirty pages, delta) next to "
            "peers (xxhash, blake3, zlib.crc32, numpy, bytes ==) on an in-memory state. Takes a "
            "few seconds; use the pytest-benchmark suite in benches/ for careful numbers.")
    p.add_argument("--size", type=_size_arg, default=64 << 20, metavar="SIZE",
                   help="state size (default: 64MiB)")
    p.add_argument("--min-time", type=_nonneg_seconds, default=0.25, metavar="SECONDS",
                   help="time spent repeating each row; the best run counts (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows")
    p.set_defaults(handler=_cmd_bench)

    from .live.cli import add_commands  # send / receive (issue 11): the live subpackage

    add_commands(add)
    return parser


# --------------------------------------------------------------------------------------
# helpers shared by the commands
# --------------------------------------------------------------------------------------


# Line breaks (\n \r \v \f, NEL, U+2028/9), tabs and every other C0/C1 control character
# (the ESC of terminal escape sequences included): what a file name may smuggle into a line.
_NOT_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def _one_line(text: str) -> str:
    """``text`` safe to print as one terminal line: each run of control characters
    (newlines, tabs, escapes) becomes one space, so a file name holding them cannot split
    or forge a line. Used for every error, note and result line."""
    return _NOT_ONE_LINE.sub(" ", text)


def _out(args: argparse.Namespace, text: str, file: Optional[IO[str]] = STDOUT) -> None:
    """Print a result line (made one line, see :func:`_one_line`) unless --quiet."""
    if not args.quiet:
        print_out(_one_line(text), file)


def _print_json(obj: Any, file: Optional[IO[str]] = STDOUT, flush: bool = False, compact: bool = False) -> None:
    """Print ``obj`` as standard JSON (:func:`~cellmigrate._jsontext.json_text`: a
    non-finite float is ``null``), the one way every ``--json`` output is written;
    ``compact``: on one line (a JSON Lines record)."""
    print_out(json_text(obj, indent=None if compact else 2), file, flush)


def _open_state(path: str, *, private: bool = False) -> StateFile:
    """Open a state file, turning OS errors into a one-line exit-2 message.

    A pending journal of an interrupted apply is rolled back by :class:`StateFile`; that
    is reported as a note on stderr.
    """
    if path == STREAM:
        raise CliError("'-' (stdin) is only accepted for deltas: state files must be regular files")
    try:
        f = StateFile(path, private=private)
    except OSError as exc:
        raise CliError(f"cannot open {path!r}: {exc.strerror or exc}") from None
    except JournalError as exc:
        raise CliError(str(exc)) from None
    if f.recovered is not None:
        print(_one_line(f"{PROG}: note: {f.recovered.describe()}"), file=sys.stderr)
    hook_pause("opened")
    return f


def _check_read(f: StateFile) -> None:
    """Raise the CLI error for a file truncated (exit 2) or changed (exit 1) while read."""
    try:
        f.check()
    except TruncatedInputError as exc:
        raise CliError(str(exc)) from None
    except StateChangedError as exc:
        raise CliError(f"{exc}; nothing was written", EXIT_DIFFERENT) from None


@contextlib.contextmanager
def _reading(path: str, *, private: bool = False, check_after: bool = True) -> Iterator[StateFile]:
    """Open a state file for reading; on leaving, check it was not truncated or changed
    (``check_after=False``: only when leaving with an error; the caller checks it itself).

    A truncated or changed input also explains any failure of the work done on it (a
    truncated map reads zeros, which may fail to decode), so it is reported instead.
    """
    f = _open_state(path, private=private)
    try:
        try:
            yield f
        except (KeyboardInterrupt, SignalInterrupt):
            raise
        except BaseException:
            _check_read(f)
            raise
        if check_after:
            _check_read(f)
    finally:
        f.close()


def _resolve_output(name: str, inputs: Sequence[Union[str, int]], force: bool) -> Output:
    """The output target, or a one-line exit-2 refusal (an input, an existing file, ...)."""
    try:
        return open_output(name, inputs=[i for i in inputs if i != STREAM], force=force)
    except OSError as exc:
        raise CliError(f"cannot write {name!r}: {exc.strerror or exc}") from None


def _os_error(what: str, exc: OSError) -> CliError:
    """One line for an OS error while writing (ENOSPC: the disk is full)."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # Files are written beside their target and renamed: nothing changed. A stream
        # (stdout, a pipe, a FIFO) may hold the part written before the disk filled.
        reason += (" (disk full: what was written to the stream is incomplete)" if what == STREAM
                   else " (disk full: nothing was changed)")
    return CliError(f"cannot write {what!r}: {reason}")


def _read_key(path: Optional[str]) -> Optional[bytes]:
    """Read a 32-byte key: 32 raw bytes, or 64 hex digits (a trailing newline allowed)."""
    if path is None:
        return None
    # Read a bounded amount: a key file may be a pipe (<(...)) or, by mistake, a device
    # or a huge file (--key-file /dev/zero used to read until the OOM killer came).
    limit = 4 * KEY_SIZE  # 64 hex digits, with room for whitespace
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as exc:
        raise CliError(f"cannot read key file {path!r}: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise CliError(f"key file {path!r} holds more than {limit} bytes: not a {KEY_SIZE}-byte key")
    if len(raw) == KEY_SIZE:
        return raw
    text = raw.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    raise CliError(f"key file {path!r} must hold exactly {KEY_SIZE} raw bytes (or {2 * KEY_SIZE} hex digits), got {len(raw)} bytes")


def _progress(args: argparse.Namespace, total: int, desc: str) -> Optional["Tqdm[Any]"]:
    """A tqdm bar on stderr for long work, only when stderr is a terminal and not --quiet."""
    if args.quiet or total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, leave=False, dynamic_ncols=True)


def _bar_callback(bar: Optional["Tqdm[Any]"]) -> Optional[Callable[[int, int], None]]:
    """Adapt a tqdm bar to the library's ``progress(done, total)`` callbacks (None: no bar)."""
    if bar is None:
        return None

    def update(done: int, total: int) -> None:
        if done > bar.n:
            bar.update(done - bar.n)

    return update


def chunked_checksum(
    buf: Buffer, algorithm: str, *, key: Optional[bytes] = None,
    on_chunk: Optional[Callable[[int], object]] = None, chunk: int = CHUNK,
) -> Union[int, bytes]:
    """Checksum/digest of ``buf`` computed chunk by chunk (for a progress bar).

    Gives exactly :func:`cellmigrate.simple_checksum` / :func:`cellmigrate.digest`: the
    weighted sum is positional (``offset=``) and the digests are streaming hashers.
    """
    from .checksum import Hasher, simple_checksum

    with memoryview(buf) as whole:
        view = whole.cast("B") if whole.format != "B" else whole
        n = view.nbytes
        if algorithm == "simple":
            total = 0
            for pos in range(0, n, chunk):
                total = (total + simple_checksum(view[pos:pos + chunk], offset=pos)) & 0xFFFFFFFF
                if on_chunk is not None:
                    on_chunk(min(chunk, n - pos))
            return total
        hasher = Hasher(algorithm, key)  # the one streaming hasher digests and deltas use
        for pos in range(0, n, chunk):
            hasher.update(view[pos:pos + chunk])
            if on_chunk is not None:
                on_chunk(min(chunk, n - pos))
        return hasher.digest()


def chunked_first_difference(
    a: Buffer, b: Buffer, *, on_chunk: Optional[Callable[[int], object]] = None, chunk: int = CHUNK,
) -> Optional[int]:
    """First differing offset of two buffers, or ``None``; unequal lengths differ at the end
    of the shorter one when its bytes are a prefix of the longer one."""
    from .compare import first_difference

    with memoryview(a) as va, memoryview(b) as vb:
        n = min(va.nbytes, vb.nbytes)
        for pos in range(0, n, chunk):
            end = min(pos + chunk, n)
            diff = first_difference(va[pos:end], vb[pos:end])
            if diff is not None:
                return pos + diff
            if on_chunk is not None:
                on_chunk(end - pos)
        return None if va.nbytes == vb.nbytes else n


def _max_delta_bytes(max_size: int) -> int:
    """Largest delta read from a stream: one for the largest state the reader accepts (``--max-size``)."""
    pages = -(-max_size // 4096)
    return max_size + 64 * pages + (1 << 20)


@contextlib.contextmanager
def _delta_input(path: str, max_size: int = DEFAULT_MAX_SIZE, check_after: bool = True) -> Iterator[StateFile]:
    """A delta file mapped, or a stream (``-``, a FIFO, ``<(...)``) spooled then mapped
    (``check_after``: as :func:`_reading`'s)."""
    try:
        stream = open_input_stream(path)
    except OSError as exc:
        raise CliError(f"cannot open {path!r}: {exc.strerror or exc}") from None
    if stream is None:
        with _reading(path, check_after=check_after) as f:
            yield f
        return
    from .errors import CorruptDataError, DeclaredSizeError
    from .wire import wire_length_bound

    name = "stdin" if path == STREAM else path
    try:
        # The header is checked as soon as it arrives and bounds the spool: a foreign,
        # endless (/dev/zero) or oversized stream is refused from its first bytes.
        spooled = spool_stream(stream, limit=_max_delta_bytes(max_size), what=name,
                               bound=lambda head: wire_length_bound(head, max_total_size=max_size))
    except DeclaredSizeError as exc:
        what = "state" if exc.field == "total_size" else "base"
        raise _too_large(f"delta {path!r} is for a {what} of", exc.size, max_size) from None
    except CorruptDataError as exc:
        raise CliError(f"cannot decode delta {path!r}: {exc}") from None
    except ValueError as exc:
        raise CliError(f"cannot read delta from {name}: {exc}") from None
    except OSError as exc:
        raise CliError(f"cannot read delta from {name}: {exc.strerror or exc}") from None
    finally:
        os.close(stream)
    with spooled:
        yield spooled


def _load_delta(path: str, max_size: int = DEFAULT_MAX_SIZE,
                allow_legacy_keyed: bool = False) -> Tuple["DeltaSnapshot", int]:
    """Read and decode a delta (file or stream); return it and its size on the wire
    (:func:`_opened_delta`, for a caller done with the file once it is decoded)."""
    with _opened_delta(path, max_size, allow_legacy_keyed) as (delta, size):
        return delta, size


@contextlib.contextmanager
def _opened_delta(path: str, max_size: int = DEFAULT_MAX_SIZE,
                  allow_legacy_keyed: bool = False) -> Iterator[Tuple["DeltaSnapshot", int]]:
    """Read and decode a delta (file or stream); yield it and its size on the wire.

    The delta's pages are views of the mapped file, which stays open (under the SIGBUS
    guard, and checked for truncation or change on leaving) while the caller uses them.
    Unreadable, truncated or corrupt -> CliError (exit 2); so is a delta for a state over
    ``max_size`` bytes (``--max-size``), naming the option.
    """
    from .delta import DeltaSnapshot
    from .errors import CorruptDataError, DeclaredSizeError, LegacyKeyedError
    from .wire import decode_delta

    # Checked (not truncated, not changed) once decoded, and again only to explain a failure:
    # the work done with a delta that decoded and verified stands.
    with _delta_input(path, max_size, check_after=False) as f:
        if f.size == 0:
            raise CliError(f"cannot decode delta {path!r}: the file is empty")
        try:
            # The reader refuses a declared size over the limit from the header, before
            # decoding anything (a zstd payload is sized by the declared pages).
            # Read in place from the map (the pages are views of it; a zstd payload is
            # decoded into an unnamed temporary file): memory stays bounded (docs/CLI.md).
            fields = decode_delta(f.buffer, max_total_size=max_size, allow_legacy_keyed=allow_legacy_keyed,
                                  spool_zstd=True)
            try:
                delta = DeltaSnapshot(**fields)
            except (TypeError, ValueError) as exc:  # as DeltaSnapshot.deserialize words it
                raise CorruptDataError(f"delta fields are inconsistent: {exc}") from None
        except DeclaredSizeError as exc:
            what = "state" if exc.field == "total_size" else "base"
            raise _too_large(f"delta {path!r} is for a {what} of", exc.size, max_size) from None
        except LegacyKeyedError:
            raise CliError(
                f"keyed version-1 delta {path!r} refused: its header (agent id, sequences, timestamp, sizes) "
                f"is not under its MAC, so it could be replayed to another agent or round; re-create it with "
                f"this version, or pass --allow-legacy-keyed to accept it knowingly"
            ) from None
        except CorruptDataError as exc:
            raise CliError(f"cannot decode delta {path!r}: {exc}") from None
        _check_read(f)
        yield delta, f.size


def _too_large(what: str, size: int, max_size: int) -> CliError:
    """The refusal of ``size`` over ``--max-size`` (exit 2), the same words on both sides."""
    return CliError(
        f"{what} {size} bytes ({format_size(size)}), over --max-size {max_size} bytes "
        f"({format_size(max_size)}); pass a larger --max-size to 'diff', 'inspect' and 'apply' alike"
    )


def _check_max_size(what: str, size: int, max_size: int) -> None:
    """Refuse ``size`` over ``--max-size``."""
    if size > max_size:
        raise _too_large(what, size, max_size)


#: "Checksum only": the weak checksum ignores trailing zeros and is easy to forge, so a
#: delta without a strong digest is never called verified.
CHECKSUM_ONLY = "checksum only, not verified"


def _integrity(delta: "DeltaSnapshot", checked: bool = False) -> str:
    """How a delta's result is checked, in words (the JSON ``integrity`` field).

    ``checked``: the result was verified against it here ('apply'). Otherwise ('diff',
    'inspect': no base, no key) it says only what the delta carries, and who checks it.
    """
    algorithm = getattr(delta, "digest_algorithm", None)
    if algorithm is None:
        return CHECKSUM_ONLY
    keyed = getattr(delta, "keyed", False)
    if checked:
        return f"authenticated ({algorithm} MAC)" if keyed else f"verified ({algorithm} digest)"
    return f"{algorithm} {'MAC' if keyed else 'digest'} (checked by apply)"


def _digest_label(delta: "DeltaSnapshot") -> str:
    algorithm = getattr(delta, "digest_algorithm", None)
    if algorithm is None:
        return CHECKSUM_ONLY
    if getattr(delta, "keyed", False):
        return f"{algorithm} MAC (keyed)"
    return str(algorithm)


def _recorded_base_size(delta: "DeltaSnapshot") -> Optional[int]:
    """The size a BASE must have for ``delta`` ('apply' refuses another), or None for a
    version-1 delta, which records none."""
    from .journal import expected_base_size

    return expected_base_size(delta) if int(getattr(delta, "wire_version", 2)) >= 2 else None


def _delta_summary(delta: "DeltaSnapshot", wire_size: int) -> Dict[str, Any]:
    """The facts 'inspect', 'diff --json' and 'apply --json' report about a delta."""
    total = int(delta.total_size)
    pages_total = (total + 4095) // 4096
    count = delta.dirty_page_count()
    counts = delta.encoding_counts()
    digest_value = getattr(delta, "digest", None)
    version = int(getattr(delta, "wire_version", 2))
    payload_wire = (payload_wire_size(wire_size, 0 if digest_value is None else len(digest_value), count)
                    if version >= 2 else int(delta.stored_size()))
    return {
        "agent_id": str(uuid.UUID(bytes=bytes(delta.agent_id))),
        "base_sequence": int(delta.base_sequence),
        "sequence": int(delta.sequence),
        "timestamp": int(delta.timestamp),
        "total_size": total,
        "total_pages": pages_total,
        "base_size": _recorded_base_size(delta),
        "checksum": int(delta.checksum),
        "digest_algorithm": getattr(delta, "digest_algorithm", None),
        "digest": None if digest_value is None else bytes(digest_value).hex(),
        "keyed": bool(getattr(delta, "keyed", False)),
        "integrity": _integrity(delta),
        "dirty_pages": count,
        "dirty_fraction": (count / pages_total) if pages_total else 0.0,
        "rle_pages": counts["rle"][0],
        "raw_pages": counts["raw"][0],
        "encodings": {name: {"pages": n, "bytes": size} for name, (n, size) in counts.items()},
        "payload_compression": str(getattr(delta, "compression", "none")),
        "wire_version": version,
        "uncompressed_size": int(delta.uncompressed_size()),
        "compressed_size": int(delta.stored_size()),
        "compression_ratio": (delta.stored_size() / delta.uncompressed_size()) if count else 1.0,
        # After the whole-payload compression (zstd): what the page data costs on the wire.
        "payload_wire_size": payload_wire,
        "payload_wire_ratio": (payload_wire / delta.uncompressed_size()) if count else 1.0,
        "wire_size": wire_size,
        "wire_fraction": (wire_size / total) if total else 0.0,
    }


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}%"


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------


def _cmd_checksum(args: argparse.Namespace) -> int:
    from .checksum import digest, simple_checksum

    key = _read_key(args.key_file)
    if key is not None and args.algorithm != "blake3":
        raise CliError("--key-file needs --algorithm blake3 (a keyed BLAKE3 MAC)")
    with _reading(args.file) as f:
        bar = _progress(args, f.size, "checksum")
        if bar is not None:
            with bar:
                value = chunked_checksum(f.buffer, args.algorithm, key=key, on_chunk=bar.update)
        elif args.algorithm == "simple":
            value = simple_checksum(f.buffer)
        else:
            value = digest(f.buffer, args.algorithm, key=key)
        size = f.size
    text = str(value) if isinstance(value, int) else value.hex()
    if args.json:
        _print_json({"file": args.file, "size": size, "algorithm": args.algorithm,
                     "keyed": key is not None, "value": text})
    else:
        # The value is the command's result: printed even with --quiet.
        print_out(text)
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    import tempfile

    from ._pages import parse_compress
    from ._streaming import create_file
    from .checksum import DEFAULT_DIGEST

    key = _read_key(args.key_file)
    algorithm: Optional[str]
    if args.digest is None:
        algorithm = "blake3" if key is not None else DEFAULT_DIGEST
    elif args.digest == "none":
        if key is not None:
            raise CliError("--key-file authenticates the delta with blake3; it cannot be combined with --digest none")
        algorithm = None
    else:
        algorithm = args.digest
        if key is not None and algorithm != "blake3":
            raise CliError(f"--key-file needs the blake3 digest ({algorithm} is not a MAC)")
    if args.sequence is None and args.base_sequence >= _U64_MAX:
        # Checked before any I/O: the default sequence (base + 1) would not fit its u64 field.
        raise CliError(f"--base-sequence {args.base_sequence} leaves no room for the default --sequence "
                       f"(base + 1 > {_U64_MAX}); pass --sequence explicitly")
    sequence = args.base_sequence + 1 if args.sequence is None else args.sequence
    try:
        plan = parse_compress(args.compress, digest=algorithm is not None)
    except ValueError as exc:  # a --compress the delta cannot use
        raise CliError(f"--compress {args.compress}: {exc}") from None
    output = _resolve_output(args.output, [args.old, args.new], args.force)

    started = time.perf_counter()
    with _reading(args.old) as old, _reading(args.new) as new:
        # Readers bound the sizes a delta declares by their --max-size: refuse here what they would.
        _check_max_size(f"OLD {args.old!r} is", old.size, args.max_size)
        _check_max_size(f"NEW {args.new!r} is", new.size, args.max_size)
        if old.size != new.size and not args.resize:
            raise CliError(f"OLD and NEW must be the same size: {args.old!r} is {old.size} bytes, "
                           f"{args.new!r} is {new.size} bytes (--resize writes a delta that resizes the state)")
        try:
            with contextlib.ExitStack() as stack:
                # The delta is written window by window (bounded memory, docs/CLI.md): into the
                # output's own temporary file, or for a stream into an unnamed spool first.
                if output.stream:
                    fd = stack.enter_context(tempfile.TemporaryFile()).fileno()
                else:
                    fd = stack.enter_context(output.open())
                bar = stack.enter_context(_closing_bar(_progress(args, new.size, "diff")))
                with memoryview(old.buffer) as old_view, memoryview(new.buffer) as new_view:
                    delta = create_file(fd, args.agent_id.bytes, old_view, new_view, args.base_sequence, sequence,
                                        algorithm=algorithm, key=key, plan=plan, progress=_bar_callback(bar),
                                        recheck=_recheck_pages(args.new, new))
                # Nothing becomes visible before both inputs are known unchanged.
                _check_read(old)
                _check_read(new)
                if output.stream:
                    with output.open() as out_fd:
                        _send_file(fd, out_fd, delta.wire_size)
        except BrokenPipeError:
            raise  # '-o - | head': the reader went away (main() ends quietly, 141)
        except OSError as exc:
            raise _os_error(args.output, exc) from None
    if not output.stream:
        args.done = f"{args.output!r} is written"  # a failure from here on (stdout) says so
    elapsed = time.perf_counter() - started
    wire_size = delta.wire_size

    info = _delta_summary(cast("DeltaSnapshot", delta), wire_size)
    # With '-o -' stdout carries the delta: the summary goes to stderr.
    report = sys.stderr if args.output == STREAM else sys.stdout
    if args.json:
        _print_json({"output": args.output, "seconds": elapsed, **info}, file=report)
    else:
        _out(args, (
            f"{'<stdout>' if args.output == STREAM else args.output}: {info['dirty_pages']} of {plural(info['total_pages'], 'page')} changed "
            f"({_pct(info['dirty_fraction'])}); {format_size(wire_size)} on the wire "
            f"({_pct(info['wire_fraction'])} of {format_size(info['total_size'])}); "
            f"digest: {_digest_label(cast('DeltaSnapshot', delta))}"
        ), file=report)
    return EXIT_OK


@contextlib.contextmanager
def _closing_bar(bar: Optional["Tqdm[Any]"]) -> Iterator[Optional["Tqdm[Any]"]]:
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def _send_file(src_fd: int, dst_fd: int, length: int) -> None:
    """Copy ``length`` bytes from the start of the file ``src_fd`` to the stream ``dst_fd``
    in the kernel (``sendfile``), or through a map where it cannot."""
    pos = 0
    try:
        while pos < length:
            sent = os.sendfile(dst_fd, src_fd, pos, min(CHUNK, length - pos))
            if sent <= 0:
                raise TruncatedInputError(f"spooled delta ended early ({pos} of {length} bytes)")
            pos += sent
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or pos:
            raise
    with StateFile("spool", fd=os.dup(src_fd), length=length) as spool, memoryview(spool.buffer) as view:
        for start in range(0, view.nbytes, CHUNK):
            write_all(dst_fd, view[start:start + CHUNK])


def _recheck_pages(name: str, new: StateFile) -> Callable[["DecodedPages"], None]:
    """A check of each page the delta copied against NEW as it is after the scan (SPEC: no
    state that never was), for ``create_file``'s ``recheck``: window by window, the pages
    as they were copied (decoded from the delta being written) against NEW's bytes now.

    A writer may change NEW during the scan within one timestamp tick, so on top of the
    size/mtime/ctime check, the copied pages must still be what the file holds.
    """
    import numpy as np

    hook_pause("scanned")
    whole = np.frombuffer(new.buffer, dtype=np.uint8) if new.size else np.empty(0, dtype=np.uint8)
    total = new.size

    def check(decoded: "DecodedPages") -> None:
        idx = decoded.indices
        if not len(idx):
            return
        # Compared as 8-byte words: a window's pages in a few numpy calls.
        copied = decoded.buffer.view(np.uint64).reshape(-1, 512)
        full = len(idx) - (1 if int(idx[-1]) * 4096 + 4096 > total else 0)
        now = whole[: (total // 4096) * 4096].view(np.uint64).reshape(-1, 512)[idx[:full]]
        bad = np.flatnonzero((copied[:full] != now).any(axis=1))
        if not len(bad) and full < len(idx):
            tail = int(idx[-1]) * 4096
            if not np.array_equal(decoded.buffer[-4096:][: total - tail], whole[tail:]):
                bad = np.array([len(idx) - 1])
        if len(bad):
            raise CliError(f"{name!r} changed while it was read (page {int(idx[int(bad[0])])} differs from the copy "
                           "taken during the scan); nothing was written", EXIT_DIFFERENT)

    return check


def _apply_to_stream(args: argparse.Namespace, base: StateFile, delta: "DeltaSnapshot", key: Optional[bytes],
                     output: Output) -> None:
    """Verify the delta on BASE's map, then write the result to the stream ``output`` front
    to back (BASE's bytes with the pages over it, window by window: nothing is held).

    A growing delta's tail past BASE is zeros with pages over it; a shrinking one is cut.
    """
    from ._passes import before_end
    from ._streaming import WindowedApply
    from .checksum import check_key

    plan = WindowedApply(delta)
    with memoryview(base.buffer) as view:
        bar = _progress(args, int(delta.total_size), "apply")
        try:
            plan.verify(view, check_key(key), before_end(_bar_callback(bar)))
        except Exception:
            _check_read(base)  # a file changed while read explains a refusal
            raise
        finally:
            if bar is not None:
                bar.close()
        _check_read(base)
        with output.open() as fd:
            plan.write_stream(fd, view)
    _check_read(base)


def _cmd_apply(args: argparse.Namespace) -> int:
    from .errors import InvalidStateError
    from .journal import apply_in_place, apply_into, check_base_size

    key = _read_key(args.key_file)
    base_path = Path(args.base)
    if args.base == STREAM:
        raise CliError("BASE cannot be '-': it is a file updated in place (the delta may come from stdin)")
    try:
        base_st = os.stat(base_path)
    except OSError as exc:
        raise CliError(f"cannot open {args.base!r}: {exc.strerror or exc}") from None
    if args.delta != STREAM:
        with contextlib.suppress(OSError):
            if os.path.samestat(base_st, os.stat(args.delta)):
                raise CliError(f"{args.base!r} and {args.delta!r} are the same file")
    output: Optional[Output] = None
    if args.output is not None:
        output = _resolve_output(args.output, [args.base, args.delta] + ([0] if args.delta == STREAM else []),
                                 args.force)
    # The delta file stays mapped (its pages are views of it) until the apply is done.
    with _opened_delta(args.delta, args.max_size, args.allow_legacy_keyed) as (delta, _):
        if getattr(delta, "keyed", False) and key is None:
            raise CliError(f"{args.delta!r} is authenticated (keyed BLAKE3): pass its key with --key-file")

        total = int(delta.total_size)
        dest_name = args.output if args.output is not None else args.base
        where = f"{args.base!r} left unchanged" + ("" if args.output is None else f", {args.output!r} not written")
        if stat.S_ISREG(base_st.st_mode):  # anything else is refused as a state file below
            _check_recorded_base_size(args.base, base_st.st_size, delta, where)
        started = time.perf_counter()
        recovered = None
        try:
            if output is None and not args.safe_replace:
                # In place, under the undo journal (docs/CLI.md): old or new after any crash.
                bar = _progress(args, total, "apply")
                try:
                    report = apply_in_place(base_path, delta, key=key, progress=_bar_callback(bar))
                finally:
                    if bar is not None:
                        bar.close()
                recovered = report.recovered
            else:
                if output is None:  # --safe-replace: a fresh copy renamed over BASE
                    output = Output(name=args.base, path=Path(os.path.realpath(base_path)), stream=False, exists=True)
                # BASE is checked (not truncated, not changed) explicitly before the result is
                # committed: after --safe-replace renames over it, its old inode has changed.
                with _open_state(args.base) as base:
                    check_base_size(base.size, delta)
                    if output.stream:
                        _apply_to_stream(args, base, delta, key, output)
                    else:
                        with output.open(size=total) as fd:
                            bar = _progress(args, base.size, "copy")
                            try:
                                # BASE zero-extended (the tail is already reserved as zeros) or,
                                # for a delta that shrinks the state, cut to its new size.
                                copy_range(base.fd, fd, min(base.size, total), what=args.base,
                                           on_chunk=None if bar is None else bar.update)
                            finally:
                                if bar is not None:
                                    bar.close()
                            bar = _progress(args, total, "apply")
                            try:
                                apply_into(fd, delta, key=key, progress=_bar_callback(bar), name=dest_name)
                            finally:
                                if bar is not None:
                                    bar.close()
                            _check_read(base)
        except InvalidStateError as exc:
            hint = " (BASE already is this delta's result: was it applied before?)" if _is_result(
                args.base, delta, key) else ""
            raise CliError(f"refused: {exc.message or exc}; {where}{hint}", EXIT_DIFFERENT) from None
        except TruncatedInputError as exc:
            raise CliError(f"{exc}; {where}") from None
        except StateChangedError as exc:
            raise CliError(f"{exc}; {where}", EXIT_DIFFERENT) from None
        except JournalError as exc:
            raise CliError(str(exc)) from None
        except BrokenPipeError:
            raise  # '-o - | head': the reader went away (main() ends quietly, 141)
        except OSError as exc:
            raise _os_error(dest_name, exc) from None
        if output is None or not output.stream:  # a file (not stdout, a pipe, a FIFO) holds it
            args.done = f"{dest_name!r} holds the result, verified"  # see _main
        elapsed = time.perf_counter() - started
        if recovered is not None:
            print(_one_line(f"{PROG}: note: {recovered.describe()}"), file=sys.stderr)

        dest = args.output if args.output is not None else args.base
        report_to = sys.stderr if args.output == STREAM else sys.stdout
        if args.json:
            _print_json({"base": args.base, "delta": args.delta, "output": dest, "in_place": args.output is None,
                         "pages_written": delta.dirty_page_count(), "total_size": total,
                         "verified": ["checksum"] + ([_digest_label(delta)] if getattr(delta, "digest_algorithm", None) else []),
                         "integrity": _integrity(delta, checked=True),
                         "seconds": elapsed}, file=report_to)
        else:
            if getattr(delta, "digest_algorithm", None) is None:
                checked = (f"{CHECKSUM_ONLY}: the delta has no strong digest, only its weak checksum was "
                           f"checked before writing")
            else:
                checked = f"result verified (checksum + {_digest_label(delta)}) before writing"
            shown = "<stdout>" if args.output == STREAM else dest  # as diff names it
            _out(args, f"{shown}: applied {plural(delta.dirty_page_count(), 'page')} (sequence {delta.base_sequence} -> "
                       f"{delta.sequence}); {checked}", file=report_to)
        return EXIT_OK


def _is_result(path: str, delta: Any, key: Optional[bytes]) -> bool:
    """Whether the file ``path`` already is ``delta``'s result (its size, checksum and
    digest): a refusal for a delta applied twice then says so. An XOR delta is relative
    to its base, so a second apply is refused rather than idempotent."""
    from .checksum import digest, simple_checksum
    from .errors import CellError

    try:
        with _open_state(path) as f:
            if f.size != int(delta.total_size) or simple_checksum(f.buffer) != int(delta.checksum):
                return False
            algorithm = getattr(delta, "digest_algorithm", None)
            if algorithm is None:
                return True
            # A keyed delta's digest is a MAC: compared in constant time, as everywhere (SPEC §6).
            ours = digest(f.buffer, algorithm, key=key if getattr(delta, "keyed", False) else None)
            return hmac.compare_digest(ours, bytes(delta.digest))
    except (CellError, OSError, ValueError):
        return False  # only a hint: the refusal stands as it is


def _check_recorded_base_size(name: str, size: int, delta: "DeltaSnapshot", where: str) -> None:
    """Refuse (exit 1, before any work) a BASE whose size is not the base size a version-2
    delta records: the result could only fail its checksum, which explains nothing.

    A version-1 delta records no base size: a shorter BASE is still zero-extended (the
    library's rule for a short ``bytearray``), a longer one refused by the apply.
    """
    expected = _recorded_base_size(delta)
    if expected is not None and size != expected:
        raise CliError(f"refused: {name!r} is {size} bytes ({format_size(size)}), but the delta was made against a "
                       f"base of {expected} bytes ({format_size(expected)}); {where}", EXIT_DIFFERENT)


def _cmd_recover(args: argparse.Namespace) -> int:
    from .journal import recover

    if args.base == STREAM:
        raise CliError("BASE must be a file")
    try:
        done = recover(args.base)
    except JournalError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot open {args.base!r}: {exc.strerror or exc}") from None
    if done.action != "clean":  # nothing was done to a clean base: no claim to make
        args.done = f"{args.base!r} is {done.action}" if done.action == "rolled back" else "the torn journal is removed"
    _out(args, done.describe())
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    with _reading(args.a) as a, _reading(args.b) as b:
        bar = _progress(args, min(a.size, b.size), "verify")
        if bar is not None:
            with bar:
                diff = chunked_first_difference(a.buffer, b.buffer, on_chunk=bar.update)
        else:
            diff = chunked_first_difference(a.buffer, b.buffer, chunk=max(1, min(a.size, b.size)))
        size_a, size_b = a.size, b.size
        detail = ""
        if diff is not None and diff < min(size_a, size_b):
            detail = f" (A has 0x{a.buffer[diff]:02x}, B has 0x{b.buffer[diff]:02x})"
    if args.json:
        _print_json({"a": args.a, "b": args.b, "identical": diff is None, "size_a": size_a,
                     "size_b": size_b, "first_difference": diff})
    elif diff is None:
        _out(args, f"identical: {args.a} and {args.b} ({format_size(size_a)}, {size_a} bytes)")
    else:
        sizes = "" if size_a == size_b else f"; sizes differ: {size_a} vs {size_b} bytes"
        _out(args, f"differ: first difference at offset {diff} (0x{diff:x}){detail}{sizes}")
    return EXIT_OK if diff is None else EXIT_DIFFERENT


def _cmd_inspect(args: argparse.Namespace) -> int:
    delta, wire_size = _load_delta(args.delta, args.max_size, args.allow_legacy_keyed)
    info = _delta_summary(delta, wire_size)
    pages: List[Dict[str, Any]] = [
        {"index": int(p.index), "compressed": bool(p.compressed), "encoding": p.encoding.label,
         "stored_size": len(p.data)}
        for p in delta.dirty_pages
    ] if args.pages else []
    if args.json:
        obj: Dict[str, Any] = {"file": args.delta, **info}
        if args.pages:
            obj["pages"] = pages
        _print_json(obj)
        return EXIT_OK
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["timestamp"]))
    digest_text = (f"none ({CHECKSUM_ONLY})" if info["digest"] is None
                   else f"{_digest_label(delta)} {info['digest']} (of the result; checked by apply)")
    rows = [
        ("agent", info["agent_id"]),
        ("sequence", f"{info['sequence']} (base {info['base_sequence']})"),
        ("created", f"{when} ({info['timestamp']})"),
        ("state size", f"{format_size(info['total_size'])} ({plural(info['total_size'], 'byte')}, {plural(info['total_pages'], 'page')})"),
        ("base size", "not recorded (wire format v1: a shorter BASE is zero-extended)" if info["base_size"] is None
                      else f"{format_size(info['base_size'])} ({plural(info['base_size'], 'byte')}; apply refuses a BASE "
                           f"of another size)"),
        ("checksum", f"{info['checksum']} (simple, of the result)"),
        ("digest", digest_text),
        ("dirty pages", f"{info['dirty_pages']} ({_pct(info['dirty_fraction'])} of the state); "
                        f"{info['rle_pages']} RLE-compressed, {info['raw_pages']} raw, "
                        f"{info['encodings']['zero']['pages']} zero, {info['encodings']['xzr']['pages']} XOR (xzr)"),
        ("encodings", ", ".join(f"{name} {plural(e['pages'], 'page')} / {plural(e['bytes'], 'byte')}" for name, e in info["encodings"].items())),
        ("page data", f"{format_size(info['uncompressed_size'])} -> {format_size(info['compressed_size'])} "
                      f"in page encodings (ratio {info['compression_ratio']:.3f}); payload compression: "
                      f"{info['payload_compression']}"
                      + (f" -> {format_size(info['payload_wire_size'])} (ratio {info['payload_wire_ratio']:.3f})"
                         if info["payload_compression"] != "none" else "")
                      + f"; wire format v{info['wire_version']}"),
        ("on the wire", f"{format_size(wire_size)} ({wire_size} bytes, {_pct(info['wire_fraction'])} of the state)"),
    ]
    lines = [f"{args.delta}: cellmigrate delta"] + [f"  {k:<12} {v}" for k, v in rows]
    if args.pages:
        lines.append("  pages (index, stored bytes, encoding):")
        lines += [f"    {p['index']:>10}  {p['stored_size']:>5}  {p['encoding']}" for p in pages]
    for line in lines:  # each line made safe on its own (a DELTA name may hold a newline)
        _out(args, line)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(size=args.size, seed=args.seed, quiet=args.quiet)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .quickbench import run_bench

    return run_bench(size=args.size, as_json=args.json, quiet=args.quiet, min_time=max(0.0, args.min_time))


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the command's own handling: while building the parser
        _error(PROG, "interrupted")
        return 130


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the command's own parser: its name and its --help
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, usage errors
        code = exc.code if isinstance(exc.code, int) else EXIT_ERROR
        return _flushed(PROG, code)
    except StdoutError as exc:  # --help or --version into a full disk
        _error(PROG, f"cannot write to stdout: {exc}")
        return EXIT_ERROR
    except BrokenPipeError:
        return _flushed(PROG, EXIT_BROKEN_PIPE)
    if not hasattr(args, "quiet"):
        args.quiet = False
    handler: Callable[[argparse.Namespace], int] = args.handler
    prefix = f"{PROG} {args.command}"
    try:
        # SIGTERM/SIGHUP raise like SIGINT, so temporary files are removed on the way out.
        with signals_raise():
            code = handler(args)
            # What stdout holds is written here, not at exit, where a failure (a full
            # disk, /dev/full) would be lost: it is reported like any other.
            flush_stdout()
            return code
    except StdoutError as exc:
        # After committed work (args.done), say both, so nobody takes the failure for
        # "nothing changed" and runs the command again.
        done = getattr(args, "done", None)
        _error(prefix, f"{done + ', but ' if done else ''}cannot write to stdout: {exc}")
        return EXIT_ERROR
    except CliError as exc:
        _error(prefix, str(exc))
        return exc.code
    except KeyboardInterrupt:
        _error(prefix, "interrupted")
        return 130
    except SignalInterrupt as exc:
        _error(prefix, str(exc))
        return 128 + exc.signum
    except TruncatedInputError as exc:
        _error(prefix, str(exc))
        return EXIT_ERROR
    except StateChangedError as exc:
        _error(prefix, str(exc))
        return EXIT_DIFFERENT
    except JournalError as exc:
        _error(prefix, str(exc))
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (e.g. '| head'): quietly, with the status of a filter that
        # SIGPIPE ended (141), so 'set -o pipefail' still sees that the output was not
        # all delivered (a delta piped into 'ssh' that died). Point stdout at devnull so
        # the interpreter's final flush does not complain either.
        return _reader_gone()
    except MemoryError:
        _error(prefix, "out of memory")
        return EXIT_ERROR
    except OSError as exc:
        done = getattr(args, "done", None)
        if done is None:
            return _unexpected(prefix, exc)
        _error(prefix, f"{done}, but then: {exc.strerror or exc}")  # as for StdoutError
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - last resort: one line, no traceback
        return _unexpected(prefix, exc)


def _unexpected(prefix: str, exc: BaseException) -> int:
    if os.environ.get("CELLMIGRATE_DEBUG"):
        traceback.print_exception(type(exc), exc, exc.__traceback__)  # (the 3.9 signature)
    _error(prefix, f"unexpected error: {type(exc).__name__}: {exc} (set CELLMIGRATE_DEBUG=1 for a traceback)")
    return EXIT_ERROR


def _flushed(prefix: str, code: int) -> int:
    """Flush stdout (the help, the version) and return ``code``, or the status of the
    failure: 141 for a reader that went away, 2 with one line for any other."""
    try:
        flush_stdout()
    except BrokenPipeError:
        return _reader_gone()
    except StdoutError as exc:
        _error(prefix, f"cannot write to stdout: {exc}")
        return EXIT_ERROR
    return code


def _reader_gone() -> int:
    """Point stdout at devnull (so the interpreter's final flush does not complain) and
    return 141, the status of a filter that SIGPIPE ended."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def _error(prefix: str, message: str, stream: Optional[IO[str]] = None) -> None:
    # One line, whatever the message holds.
    print(_one_line(f"{prefix}: error: {message.strip()}"), file=stream or sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
