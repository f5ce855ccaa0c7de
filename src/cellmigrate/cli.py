"""The ``cellmigrate`` command line: checksum, diff, apply, verify, inspect, demo, bench.

Run ``cellmigrate --help`` (or ``python -m cellmigrate --help``) for the list, and
``cellmigrate COMMAND --help`` for each command. Conventions every command follows:

* State files are memory-mapped (:class:`~cellmigrate.statefile.StateFile`), never read
  whole, so multi-GiB states run in bounded memory.
* Exit codes: ``0`` success, ``1`` verification failed or the states differ (including a
  delta that is refused because it does not fit the base), ``2`` usage error or
  unreadable/corrupt input. Errors are one line on stderr, never a traceback (set
  ``CELLMIGRATE_DEBUG=1`` to get the traceback of an unexpected error).
* Results go to stdout (``--json`` for machine-readable output where it makes sense);
  progress bars go to stderr, only when stderr is a terminal and the work is long.
* ``--quiet`` silences everything but errors (and the value ``checksum`` was asked for).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Dict, List, NoReturn, Optional, Sequence, Union

from .statefile import StateFile, atomic_replace, copy_to_temp, format_size, parse_size, write_bytes_atomic

if TYPE_CHECKING:  # pragma: no cover - typing only
    from tqdm import tqdm as Tqdm

    from ._types import Buffer
    from .delta import DeltaSnapshot

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_DIFFERENT", "EXIT_ERROR"]

PROG = "cellmigrate"

EXIT_OK = 0
#: Verification failed, the states differ, or a delta was refused for this base.
EXIT_DIFFERENT = 1
#: Usage error, or input that cannot be read or decoded.
EXIT_ERROR = 2

#: Work below this many bytes finishes well under a second on the kernels (several GB/s),
#: so it gets no progress bar; the environment variable lowers it (for demos and tests).
PROGRESS_MIN_BYTES = int(os.environ.get("CELLMIGRATE_PROGRESS_MIN_BYTES", str(1 << 30)))
#: Chunk of the state processed between two progress updates.
CHUNK = 64 << 20

KEY_SIZE = 32
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


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for documentation and tests)."""
    from . import __version__

    # Options every command accepts, before or after the command name. The sub-parser
    # copies default to SUPPRESS so they never overwrite a value given before the command.
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="print nothing but errors (and the value for 'checksum')")

    parser = _Parser(
        prog=PROG,
        description=(
            "Verified migration of agent memory state: find the 4 KiB pages that changed "
            "between two state files, ship them as a compact self-checking delta, apply it "
            "atomically, and prove the result byte for byte."
        ),
        epilog=(
            "Exit codes: 0 success, 1 verification failed or states differ, 2 usage error or "
            "unreadable/corrupt input. Start with: cellmigrate demo"
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", default=False,
                        help="print nothing but errors (and the value for 'checksum')")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=description, parents=[common])

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
    p.add_argument("-o", "--output", metavar="DELTA", required=True, help="delta file to write (replaced atomically)")
    p.add_argument("--digest", choices=DIGEST_CHOICES, default=None,
                   help="strong digest of NEW to record (default: xxh3_128_tree, or blake3 with --key-file; "
                        "'none' gives a checksum-only delta, as the Rust crate writes)")
    p.add_argument("--key-file", metavar="F",
                   help="32-byte key: authenticate the delta with keyed BLAKE3 (a MAC)")
    p.add_argument("--agent-id", type=_uuid_arg, default=uuid.UUID(int=0), metavar="UUID",
                   help="agent id recorded in the delta (default: the nil UUID)")
    p.add_argument("--base-sequence", type=_nonneg_int, default=0, metavar="N",
                   help="sequence number of OLD (default: %(default)s)")
    p.add_argument("--sequence", type=_nonneg_int, default=None, metavar="N",
                   help="sequence number of NEW (default: base sequence + 1)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(handler=_cmd_diff)

    p = add("apply", "apply a delta to BASE (atomically)",
            "Apply DELTA to BASE. The whole result is verified against the delta's checksum and "
            "digest (and MAC) before a single byte is written: a refused delta leaves BASE byte "
            "for byte unchanged. Without -o, BASE is updated in place; with -o, BASE is copied to "
            "a temporary file beside OUT, the delta applied and synced there, and the file renamed "
            "to OUT, so OUT is either complete or absent.")
    p.add_argument("base", metavar="BASE", help="the state the delta was made against")
    p.add_argument("delta", metavar="DELTA", help="delta file written by 'cellmigrate diff'")
    p.add_argument("-o", "--output", metavar="OUT", help="write the result here instead of updating BASE")
    p.add_argument("--key-file", metavar="F", help="32-byte key of an authenticated delta")
    p.add_argument("--safe-replace", action="store_true",
                   help="in place, but through a temporary copy renamed over BASE: a crash cannot "
                        "leave BASE half-written (costs one full copy)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(handler=_cmd_apply)

    p = add("verify", "check that two state files are identical, byte for byte",
            "Compare A and B byte for byte. Exit 0 when identical; exit 1 and print the first "
            "differing offset when not.")
    p.add_argument("a", metavar="A", help="first state file")
    p.add_argument("b", metavar="B", help="second state file")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(handler=_cmd_verify)

    p = add("inspect", "show a delta's header, pages, sizes and ratios",
            "Decode DELTA (checking every structural and integrity field of the wire format) and "
            "show what it contains.")
    p.add_argument("delta", metavar="DELTA", help="delta file")
    p.add_argument("--pages", action="store_true", help="also list every page")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(handler=_cmd_inspect)

    p = add("demo", "run an end-to-end migration of a synthetic agent",
            "Migrate a synthetic agent state end to end, step by step: compatibility check, "
            "rollback point, incremental delta, transfer, atomic apply, byte-for-byte "
            "verification; then a migration whose delta is corrupted in transit, refused, and "
            "rolled back. Prints sizes, timings, GB/s and the audit trail.")
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
    p.add_argument("--min-time", type=float, default=0.25, metavar="SECONDS",
                   help="time spent repeating each row; the best run counts (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows")
    p.set_defaults(handler=_cmd_bench)
    return parser


# --------------------------------------------------------------------------------------
# helpers shared by the commands
# --------------------------------------------------------------------------------------


def _out(args: argparse.Namespace, text: str) -> None:
    """Print a result line unless --quiet."""
    if not args.quiet:
        print(text)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def _open_state(path: str, *, writable: bool = False) -> StateFile:
    """Open a state file, turning OS errors into a one-line exit-2 message."""
    try:
        return StateFile(path, writable=writable)
    except OSError as exc:
        raise CliError(f"cannot open {path!r}: {exc.strerror or exc}") from None


def _read_key(path: Optional[str]) -> Optional[bytes]:
    """Read a 32-byte key: 32 raw bytes, or 64 hex digits (a trailing newline allowed)."""
    if path is None:
        return None
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read key file {path!r}: {exc.strerror or exc}") from None
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


def _load_delta(path: str) -> "DeltaSnapshot":
    """Read and decode a delta file; unreadable or corrupt -> CliError (exit 2)."""
    from .delta import DeltaSnapshot
    from .errors import CorruptDataError

    with _open_state(path) as f:
        if f.size == 0:
            raise CliError(f"cannot decode delta {path!r}: the file is empty")
        try:
            return DeltaSnapshot.deserialize(f.buffer)
        except CorruptDataError as exc:
            raise CliError(f"cannot decode delta {path!r}: {exc}") from None


def _digest_label(delta: "DeltaSnapshot") -> str:
    algorithm = getattr(delta, "digest_algorithm", None)
    if algorithm is None:
        return "checksum only"
    if getattr(delta, "keyed", False):
        return f"{algorithm} MAC (keyed)"
    return str(algorithm)


def _delta_summary(delta: "DeltaSnapshot", wire_size: int) -> Dict[str, Any]:
    """The facts 'inspect', 'diff --json' and 'apply --json' report about a delta."""
    total = int(delta.total_size)
    pages_total = (total + 4095) // 4096
    count = delta.dirty_page_count()
    compressed_pages = sum(1 for p in delta.dirty_pages if p.compressed)
    digest_value = getattr(delta, "digest", None)
    return {
        "agent_id": str(uuid.UUID(bytes=bytes(delta.agent_id))),
        "base_sequence": int(delta.base_sequence),
        "sequence": int(delta.sequence),
        "timestamp": int(delta.timestamp),
        "total_size": total,
        "total_pages": pages_total,
        "checksum": int(delta.checksum),
        "digest_algorithm": getattr(delta, "digest_algorithm", None),
        "digest": None if digest_value is None else bytes(digest_value).hex(),
        "keyed": bool(getattr(delta, "keyed", False)),
        "dirty_pages": count,
        "dirty_fraction": (count / pages_total) if pages_total else 0.0,
        "rle_pages": compressed_pages,
        "raw_pages": count - compressed_pages,
        "uncompressed_size": int(delta.uncompressed_size()),
        "compressed_size": int(delta.compressed_size()),
        "compression_ratio": float(delta.compression_ratio()),
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
    with _open_state(args.file) as f:
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
        print(text)
    return EXIT_OK


def _cmd_diff(args: argparse.Namespace) -> int:
    from .checksum import DEFAULT_DIGEST
    from .delta import DeltaSnapshot
    from .errors import InvalidStateError

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
    sequence = args.base_sequence + 1 if args.sequence is None else args.sequence

    started = time.perf_counter()
    with _open_state(args.old) as old, _open_state(args.new) as new:
        if old.size != new.size:
            raise CliError(f"OLD and NEW must be the same size: {args.old!r} is {old.size} bytes, "
                           f"{args.new!r} is {new.size} bytes")
        bar = _progress(args, new.size, "diff")
        try:
            delta = DeltaSnapshot.create(args.agent_id.bytes, old.buffer, new.buffer,
                                         args.base_sequence, sequence, digest=algorithm, key=key,
                                         progress=_bar_callback(bar))
        except InvalidStateError as exc:
            raise CliError(str(exc)) from None
        finally:
            if bar is not None:
                bar.close()
        wire = delta.serialize()
    elapsed = time.perf_counter() - started
    try:
        write_bytes_atomic(args.output, wire)
    except OSError as exc:
        raise CliError(f"cannot write {args.output!r}: {exc.strerror or exc}") from None

    info = _delta_summary(delta, len(wire))
    if args.json:
        _print_json({"output": args.output, "seconds": elapsed, **info})
    else:
        _out(args, (
            f"{args.output}: {info['dirty_pages']} of {info['total_pages']} pages changed "
            f"({_pct(info['dirty_fraction'])}); {format_size(len(wire))} on the wire "
            f"({_pct(info['wire_fraction'])} of {format_size(info['total_size'])}); "
            f"digest: {_digest_label(delta)}"
        ))
    return EXIT_OK


def _apply_mapped(args: argparse.Namespace, path: Path, delta: "DeltaSnapshot", key: Optional[bytes]) -> None:
    """Apply ``delta`` to the file at ``path`` through a writable map, then msync it.

    ``DeltaSnapshot.apply`` computes and checks the result's checksum and digest before it
    writes anything, so a refused delta leaves the file untouched.
    """
    with StateFile(path, writable=True) as f:
        bar = _progress(args, f.size, "apply")
        try:
            delta.apply(f.buffer, key=key, progress=_bar_callback(bar))
        finally:
            if bar is not None:
                bar.close()
        f.flush()


def _cmd_apply(args: argparse.Namespace) -> int:
    from .errors import InvalidStateError

    key = _read_key(args.key_file)
    delta = _load_delta(args.delta)
    if getattr(delta, "keyed", False) and key is None:
        raise CliError(f"{args.delta!r} is authenticated (keyed BLAKE3): pass its key with --key-file")

    base = Path(args.base)
    try:
        base_size = os.path.getsize(base)
        if not base.is_file():
            raise CliError(f"cannot open {args.base!r}: not a regular file")
    except OSError as exc:
        raise CliError(f"cannot open {args.base!r}: {exc.strerror or exc}") from None
    total = int(delta.total_size)
    if base_size > total:
        # Refuse here with the library's rule, before copying anything.
        raise CliError(
            f"refused: {args.base!r} is {base_size} bytes but the delta is for a {total}-byte state; "
            f"{args.base!r} left unchanged", EXIT_DIFFERENT)

    dest = Path(args.output) if args.output else base
    via_temp = args.output is not None or args.safe_replace or base_size < total
    started = time.perf_counter()
    try:
        if via_temp:
            # Copy BASE beside DEST (zero-extended to the delta's size, the library's rule
            # for a short base), apply and sync there, then rename: DEST is complete or absent.
            with atomic_replace(dest) as tmp:
                bar = _progress(args, base_size, "copy")
                try:
                    copy_to_temp(base, tmp, size=total, on_chunk=None if bar is None else bar.update)
                finally:
                    if bar is not None:
                        bar.close()
                _apply_mapped(args, tmp, delta, key)
        elif total == 0:
            delta.apply(bytearray(), key=key)  # nothing to write, but still verify
        else:
            _apply_mapped(args, base, delta, key)
    except InvalidStateError as exc:
        where = f"{args.base!r} left unchanged" + ("" if args.output is None else f", {args.output!r} not written")
        raise CliError(f"refused: {exc.message or exc}; {where}", EXIT_DIFFERENT) from None
    except OSError as exc:
        raise CliError(f"cannot write {str(dest)!r}: {exc.strerror or exc}") from None
    elapsed = time.perf_counter() - started

    if args.json:
        _print_json({"base": args.base, "delta": args.delta, "output": str(dest), "in_place": args.output is None,
                     "pages_written": delta.dirty_page_count(), "total_size": total,
                     "verified": ["checksum"] + ([_digest_label(delta)] if getattr(delta, "digest_algorithm", None) else []),
                     "seconds": elapsed})
    else:
        checks = "checksum" if getattr(delta, "digest_algorithm", None) is None else f"checksum + {_digest_label(delta)}"
        _out(args, f"{dest}: applied {delta.dirty_page_count()} pages (sequence {delta.base_sequence} -> "
                   f"{delta.sequence}); result verified ({checks}) before writing")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    with _open_state(args.a) as a, _open_state(args.b) as b:
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
    delta = _load_delta(args.delta)
    wire_size = os.path.getsize(args.delta)
    info = _delta_summary(delta, wire_size)
    pages: List[Dict[str, Any]] = [
        {"index": int(p.index), "compressed": bool(p.compressed), "stored_size": len(p.data)}
        for p in delta.dirty_pages
    ] if args.pages else []
    if args.json:
        obj: Dict[str, Any] = {"file": args.delta, **info}
        if args.pages:
            obj["pages"] = pages
        _print_json(obj)
        return EXIT_OK
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info["timestamp"]))
    digest_text = "none (checksum only)" if info["digest"] is None else f"{_digest_label(delta)} {info['digest']}"
    rows = [
        ("agent", info["agent_id"]),
        ("sequence", f"{info['sequence']} (base {info['base_sequence']})"),
        ("created", f"{when} ({info['timestamp']})"),
        ("state size", f"{format_size(info['total_size'])} ({info['total_size']} bytes, {info['total_pages']} pages)"),
        ("checksum", f"{info['checksum']} (simple, of the result)"),
        ("digest", digest_text),
        ("dirty pages", f"{info['dirty_pages']} ({_pct(info['dirty_fraction'])} of the state); "
                        f"{info['rle_pages']} RLE-compressed, {info['raw_pages']} raw"),
        ("page data", f"{format_size(info['uncompressed_size'])} -> {format_size(info['compressed_size'])} "
                      f"(ratio {info['compression_ratio']:.3f})"),
        ("on the wire", f"{format_size(wire_size)} ({wire_size} bytes, {_pct(info['wire_fraction'])} of the state)"),
    ]
    lines = [f"{args.delta}: cellmigrate delta"] + [f"  {k:<12} {v}" for k, v in rows]
    if args.pages:
        lines.append("  pages (index, stored bytes, encoding):")
        lines += [f"    {p['index']:>10}  {p['stored_size']:>5}  {'rle' if p['compressed'] else 'raw'}" for p in pages]
    _out(args, "\n".join(lines))
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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    if not hasattr(args, "quiet"):
        args.quiet = False
    handler: Callable[[argparse.Namespace], int] = args.handler
    prefix = f"{PROG} {args.command}"
    try:
        return handler(args)
    except CliError as exc:
        _error(prefix, str(exc))
        return exc.code
    except KeyboardInterrupt:
        _error(prefix, "interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. '| head'): not an error of ours. Point stdout at
        # devnull so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except MemoryError:
        _error(prefix, "out of memory")
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - last resort: one line, no traceback
        if os.environ.get("CELLMIGRATE_DEBUG"):
            traceback.print_exc()
        _error(prefix, f"unexpected error: {type(exc).__name__}: {exc} (set CELLMIGRATE_DEBUG=1 for a traceback)")
        return EXIT_ERROR


def _error(prefix: str, message: str, stream: Optional[IO[str]] = None) -> None:
    # One line, whatever the message holds.
    line = " ".join(message.split())
    print(f"{prefix}: error: {line}", file=stream or sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
