"""A running WebAssembly agent as a migration source and target (optional: needs ``wasmtime``).

:class:`WasmAgent` instantiates a module with `wasmtime <https://pypi.org/project/wasmtime/>`_
(install ``cellmigrate[wasm]``), runs its ``step`` export in a background thread and
exposes what live migration needs:

* **the state**: the instance's linear memory as a zero-copy writable ``memoryview``
  (:meth:`WasmAgent.state`) or numpy array (:meth:`WasmAgent.numpy`) over wasmtime's own
  memory (``Memory.data_ptr``/``data_len`` through ctypes). Writes through the view are
  seen by the module and the other way round. The view has the memory's length when it
  was taken; after ``memory.grow`` take a new one for the new length;
* **the rest of the agent's state**: its exported *mutable* globals, read and written by
  name (:meth:`WasmAgent.globals`, :meth:`WasmAgent.set_globals`) and serialized
  compactly by :meth:`WasmAgent.extra` (:func:`encode_globals`);
* **pause/resume**: :meth:`WasmAgent.pause` returns only once no step is running, and no
  step starts until :meth:`WasmAgent.resume` (so a paused agent's memory and globals are a
  consistent snapshot);
* **the target side**: :meth:`WasmAgent.adopt` (or :meth:`WasmAgent.from_migrated`) takes a
  migrated memory and globals into a fresh instance of the same module, growing its memory
  to the migrated size, after which :meth:`WasmAgent.resume` continues the run.

The agent ABI: the module exports a memory ``memory`` and a function ``step(n: i32) -> i64``
that runs ``n`` iterations of the agent's work (``n = 0`` runs none) and returns the total
number of iterations run so far. Everything else the agent keeps across steps must live in
its memory or its exported mutable globals, or it cannot be migrated. The package ships
such a module, :func:`mutator_wat` (``cellmigrate/agents/mutator.wat``): it rewrites its
memory and grows it deterministically, so a migrated run can be compared byte for byte
with an unmigrated one.

Why the views stay valid: every instance is created in an engine configured with
``memory_may_move = False`` and a 4 GiB reservation (the whole 32-bit address space), so
``memory.grow`` never relocates the memory and a view taken earlier still points at it
(it just does not cover the grown part). Each view keeps its agent, and so wasmtime's
store, alive.

Threads: wasmtime's ``Store`` is not thread-safe, so every call into it (steps, globals,
growing, reading the memory's address and size) is made under one lock; the memory's
bytes are read and written without it (that is the point of a live migration: the
driver reads pages while the agent writes them; a consistent round is the driver's job).

This module is an optional integration: nothing in the core imports it.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

from ._buffers import as_bytes_view
from ._forksafe import guard
from ._types import BufferLike
from .checksum import digest
from .errors import CorruptDataError, ExecutionFailedError, InvalidStateError

try:
    import wasmtime
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "cellmigrate.wasm needs the wasmtime package: pip install 'cellmigrate[wasm]' "
        "(from a checkout: pip install '.[wasm]')"
    ) from exc

__all__ = [
    "WASM_PAGE_SIZE",
    "WasmAgent",
    "WasmGlobals",
    "decode_globals",
    "encode_globals",
    "mutator_wat",
]

#: Size of a WebAssembly memory page, in bytes (the unit of ``memory.grow``).
WASM_PAGE_SIZE = 65536
#: Virtual address space reserved per memory: all of wasm32's, so memories never move.
_RESERVATION = 1 << 32

# --- the globals' wire form ----------------------------------------------------------
#
#   magic "CMWG" | version u8 (1) | module digest (16 bytes) | count u16
#   count x ( name length u8 | name (UTF-8) | kind u8 | value (8 bytes, little-endian) )
#
# kind: 0 i32, 1 i64 (two's complement, sign-extended to 8 bytes), 2 f32, 3 f64 (IEEE
# bits; an f32 in the low 4 bytes). The module digest (BLAKE3 of the module binary,
# first 16 bytes) ties the globals to the module they belong to.
_MAGIC = b"CMWG"
_VERSION = 1
_HEADER = struct.Struct("<4sB16sH")
_KINDS = ("i32", "i64", "f32", "f64")
_MAX_NAME = 255


@dataclass(frozen=True)
class WasmGlobals:
    """Decoded :meth:`WasmAgent.extra` bytes.

    ``module_digest`` is the first 16 bytes of the module binary's BLAKE3 digest;
    ``values`` maps each exported mutable global's name to ``(kind, value)`` with kind one
    of ``"i32"``, ``"i64"``, ``"f32"``, ``"f64"`` (ints for the integer kinds, floats for the
    others), in the module's export order.
    """

    module_digest: bytes
    values: Dict[str, Tuple[str, Union[int, float]]]


def encode_globals(module_digest: bytes, values: Mapping[str, Tuple[str, Union[int, float]]]) -> bytes:
    """Serialize globals (``name -> (kind, value)``) for ``module_digest`` (16 bytes).

    Raises ``ValueError`` for a digest that is not 16 bytes, a name longer than 255 bytes
    of UTF-8, more than 65535 globals, an unknown kind or a value out of the kind's range.
    """
    if len(module_digest) != 16:
        raise ValueError(f"module_digest must be 16 bytes, got {len(module_digest)}")
    if len(values) > 0xFFFF:
        raise ValueError(f"too many globals: {len(values)} (at most 65535)")
    out = bytearray(_HEADER.pack(_MAGIC, _VERSION, bytes(module_digest), len(values)))
    for name, (kind, value) in values.items():
        raw = name.encode("utf-8")
        if len(raw) > _MAX_NAME:
            raise ValueError(f"global name too long ({len(raw)} bytes, at most {_MAX_NAME}): {name[:40]!r}...")
        if kind not in _KINDS:
            raise ValueError(f"unknown global kind {kind!r}; expected one of {_KINDS}")
        out += bytes((len(raw),)) + raw + bytes((_KINDS.index(kind),))
        try:
            if kind == "i32":
                out += struct.pack("<q", _check_int(int(value), 32))
            elif kind == "i64":
                out += struct.pack("<q", _check_int(int(value), 64))
            elif kind == "f32":
                out += struct.pack("<fxxxx", float(value))
            else:
                out += struct.pack("<d", float(value))
        except (struct.error, OverflowError) as exc:
            raise ValueError(f"global {name!r}: value {value!r} does not fit {kind}: {exc}") from None
    return bytes(out)


def _check_int(value: int, bits: int) -> int:
    # Accept both the signed and the unsigned spelling of a wasm integer; store signed.
    if not -(1 << (bits - 1)) <= value < (1 << bits):
        raise ValueError(f"{value} does not fit in {bits} bits")
    return value - (1 << bits) if value >= (1 << (bits - 1)) else value


def decode_globals(data: BufferLike) -> WasmGlobals:
    """Parse :func:`encode_globals` bytes. Raises ``CorruptDataError`` on anything malformed
    (wrong magic or version, truncation, trailing bytes, an unknown kind, a bad name, an
    i32 out of range, a duplicate name)."""
    view = as_bytes_view(data, "globals")
    if len(view) < _HEADER.size:
        raise CorruptDataError(f"wasm globals: {len(view)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, module_digest, count = _HEADER.unpack_from(view, 0)
    if magic != _MAGIC:
        raise CorruptDataError(f"wasm globals: bad magic {bytes(magic)!r} (expected {_MAGIC!r})")
    if version != _VERSION:
        raise CorruptDataError(f"wasm globals: unsupported version {version} (this reader knows {_VERSION})")
    pos = _HEADER.size
    values: Dict[str, Tuple[str, Union[int, float]]] = {}
    for i in range(count):
        if pos >= len(view):
            raise CorruptDataError(f"wasm globals: truncated at global {i} of {count}")
        name_len = view[pos]
        end = pos + 1 + name_len + 1 + 8
        if end > len(view):
            raise CorruptDataError(f"wasm globals: truncated at global {i} of {count}")
        try:
            name = bytes(view[pos + 1:pos + 1 + name_len]).decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptDataError(f"wasm globals: the name of global {i} is not UTF-8") from None
        kind_id = view[pos + 1 + name_len]
        if kind_id >= len(_KINDS):
            raise CorruptDataError(f"wasm globals: global {name!r} has unknown kind {kind_id}")
        kind = _KINDS[kind_id]
        raw = bytes(view[end - 8:end])
        value: Union[int, float]
        if kind == "i32":
            value = struct.unpack("<q", raw)[0]
            if not -(1 << 31) <= value < (1 << 31):
                raise CorruptDataError(f"wasm globals: i32 global {name!r} holds {value}")
        elif kind == "i64":
            value = struct.unpack("<q", raw)[0]
        elif kind == "f32":
            value = struct.unpack("<fxxxx", raw)[0]
        else:
            value = struct.unpack("<d", raw)[0]
        if name in values:
            raise CorruptDataError(f"wasm globals: global {name!r} appears twice")
        values[name] = (kind, value)
        pos = end
    if pos != len(view):
        raise CorruptDataError(f"wasm globals: {len(view) - pos} trailing bytes after {count} globals")
    return WasmGlobals(bytes(module_digest), values)


# --- modules ---------------------------------------------------------------------------

def mutator_wat() -> str:
    """The WAT text of the shipped demonstration agent (``cellmigrate/agents/mutator.wat``).

    Its ``step(n)`` rewrites one 8-byte word per iteration (7 in 8 in its first MiB),
    starts at 64 WebAssembly pages (4 MiB) and grows by one page every 1024 iterations up
    to 256 pages (16 MiB); its mutable globals are ``lcg`` and ``steps``. Deterministic:
    the memory and globals after N iterations do not depend on how they were split into
    calls.
    """
    return resources.files("cellmigrate").joinpath("agents/mutator.wat").read_text(encoding="utf-8")


_ModuleSource = Union[str, bytes, "os.PathLike[str]", None]

_engine_lock = threading.Lock()
guard(sys.modules[__name__], "_engine_lock")  # taken around fork(): see _forksafe
_engine: Optional["wasmtime.Engine"] = None


def _shared_engine() -> "wasmtime.Engine":
    """One engine per process (engines are thread-safe and costly), configured so that
    linear memories never move when they grow, and with epoch interruption (how a step
    that overruns ``step_timeout`` is stopped; every store sets its own deadline)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            config = wasmtime.Config()
            config.memory_may_move = False
            config.memory_reservation = _RESERVATION
            config.epoch_interruption = True
            _engine = wasmtime.Engine(config)
        return _engine


#: Seconds between two epoch ticks while a step with a ``step_timeout`` runs.
_TICK = 0.01
#: An epoch deadline that is never reached (ticks), for steps without a timeout.
_NO_DEADLINE = 1 << 62


class _EpochTicker:
    """Advances the shared engine's epoch every ``_TICK`` seconds while at least one step
    with a timeout runs (and sleeps otherwise), so overrunning steps trap."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> None:
        with self._cond:
            self._active += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cellmigrate-wasm-epoch", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._active -= 1

    def _run(self) -> None:
        engine = _shared_engine()
        while True:
            with self._cond:
                while not self._active:
                    self._cond.wait()
            time.sleep(_TICK)
            engine.increment_epoch()


_ticker = _EpochTicker()


def _module_binary(module: _ModuleSource) -> bytes:
    """The module's binary from WAT text (str), a binary or WAT as bytes, or a file path
    (a ``PathLike``, or a ``str`` that is no WAT text: WAT starts with ``(`` or a
    comment)."""
    if module is None:
        module = mutator_wat()
    if isinstance(module, str) and not module.strip():
        # Taken as a path, "" would be "." and fail as "Is a directory".
        raise InvalidStateError("the wasm module is empty")
    if isinstance(module, str) and not module.lstrip().startswith(("(", ";;")):
        module = Path(module)
    if isinstance(module, os.PathLike):
        path = os.fspath(module)
        try:
            with open(module, "rb") as f:
                module = f.read()
        except OSError as exc:
            raise InvalidStateError(f"cannot read the wasm module {path!r}: {exc}") from None
        if not module.strip():
            raise InvalidStateError(f"the wasm module file {path!r} is empty")
    if isinstance(module, (bytes, bytearray, memoryview)):
        raw = bytes(module)
        if not raw.strip():
            raise InvalidStateError("the wasm module is empty")
        if raw.startswith(b"\0asm"):
            return raw
        try:
            module = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidStateError("the wasm module is neither a binary (\\0asm...) nor UTF-8 WAT text") from None
    try:
        return bytes(wasmtime.wat2wasm(module))
    except wasmtime.WasmtimeError as exc:
        raise InvalidStateError(f"the WAT text does not compile: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _kind(valtype: "wasmtime.ValType") -> Optional[str]:
    for kind in _KINDS:
        if valtype == getattr(wasmtime.ValType, kind)():
            return kind
    return None


def _failure(error: BaseException) -> ExecutionFailedError:
    """The error :meth:`WasmAgent.pause` and :meth:`WasmAgent.wait` report for the runner's ``error``."""
    if isinstance(error, ExecutionFailedError):
        # Its text already carries the class's prefix: wrapping str(error) would repeat it.
        return ExecutionFailedError(error.message)
    return ExecutionFailedError(f"the wasm agent failed: {error}")


# --- the agent -------------------------------------------------------------------------

class WasmAgent:
    """One instance of a WebAssembly agent module, stepped in a background thread.

    ``module``: WAT text (``str``), a module binary or WAT as ``bytes``, a path to either
    (a ``PathLike``, or a ``str`` that is not WAT text, which starts with ``(`` or ``;;``),
    or ``None`` for the shipped :func:`mutator_wat`. ``batch``: iterations per ``step``
    call of the background runner (steps are the unit :meth:`pause` waits for, so keep
    them short). ``rate``: iterations per second the runner aims at (``None``: as fast as
    it can; a pace lets a live migration converge while the agent runs, the way a real
    agent waits for input). ``stop_at``: the runner stops on its own once this many
    iterations in total have run (the last batch is shortened to land on it exactly).
    ``step_timeout``: seconds one ``step`` call may run (to within 10 ms) before it is
    interrupted (wasmtime epoch interruption) and fails with ``ExecutionFailedError``, so a
    runaway module cannot make :meth:`pause` wait forever (``None``: no limit). The same
    bound holds for every other run of the module's code: its start function when it is
    instantiated and the ``step(0)`` the constructor makes, which raise
    ``ExecutionFailedError`` from the constructor when they overrun it.

    Raises ``InvalidStateError`` when the module is empty, does not compile or instantiate (it
    may import nothing), lacks the ``memory``/``step`` exports or ``step`` has the wrong type,
    or has a mutable exported global of a kind that cannot be migrated (v128, references);
    ``ValueError`` for a ``batch`` below 1, a ``rate`` or ``step_timeout`` not above 0, or a
    negative ``stop_at``.

    >>> agent = WasmAgent()
    >>> agent.run(2000)
    2000
    >>> len(agent.state()) // WASM_PAGE_SIZE, sorted(agent.globals())
    (65, ['lcg', 'steps'])
    """

    def __init__(self, module: _ModuleSource = None, *, batch: int = 256, rate: Optional[float] = None,
                 stop_at: Optional[int] = None, step_timeout: Optional[float] = None) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be above 0 iterations per second, got {rate}")
        if stop_at is not None and stop_at < 0:
            raise ValueError(f"stop_at must not be negative, got {stop_at}")
        if step_timeout is not None and not step_timeout > 0:
            raise ValueError(f"step_timeout must be above 0 seconds, got {step_timeout}")
        self.wasm_binary = _module_binary(module)
        #: First 16 bytes of the module binary's BLAKE3 digest (identifies it in :meth:`extra`).
        self.module_digest = digest(self.wasm_binary, "blake3")[:16]
        self.batch = int(batch)
        self.rate = None if rate is None else float(rate)
        self.stop_at = None if stop_at is None else int(stop_at)
        self.step_timeout = None if step_timeout is None else float(step_timeout)
        engine = _shared_engine()
        self._store = wasmtime.Store(engine)
        # The engine interrupts at epoch deadlines (default: immediately); steps with a
        # timeout set their own before each call.
        self._store.set_epoch_deadline(_NO_DEADLINE)
        try:
            compiled = wasmtime.Module(engine, self.wasm_binary)
            # Instantiating runs the module's start function, if it has one.
            with self._deadline("wasm start function"):
                instance = wasmtime.Instance(self._store, compiled, [])
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            raise InvalidStateError(f"the wasm module does not instantiate: {_first_line(exc)}") from None
        exports = instance.exports(self._store)
        memory, step = exports.get("memory"), exports.get("step")
        if not isinstance(memory, wasmtime.Memory):
            raise InvalidStateError("the wasm module must export its linear memory as 'memory'")
        if not isinstance(step, wasmtime.Func):
            raise InvalidStateError("the wasm module must export a function 'step(n: i32) -> i64'")
        ftype = step.type(self._store)
        if [str(p) for p in ftype.params] != ["i32"] or [str(r) for r in ftype.results] != ["i64"]:
            raise InvalidStateError(f"'step' must have type (i32) -> i64, not {ftype.params} -> {ftype.results}")
        self._memory: wasmtime.Memory = memory
        self._step: wasmtime.Func = step
        #: The exported mutable globals, in export order: name -> (kind, Global).
        self._globals: Dict[str, Tuple[str, wasmtime.Global]] = {}
        for name, ext in exports.items():
            if isinstance(ext, wasmtime.Global):
                gtype = ext.type(self._store)
                if not gtype.mutable:
                    continue
                try:
                    # wasmtime's C API aborts the process when asked the kind of a v128;
                    # reading the value raises instead, so read it first.
                    ext.value(self._store)
                    kind = _kind(gtype.content)
                except wasmtime.WasmtimeError:
                    kind = None
                if kind is None:
                    raise InvalidStateError(f"mutable global {name!r} is not an i32, i64, f32 or f64: "
                                            "it cannot be migrated")
                self._globals[name] = (kind, ext)
        self._max_pages: Optional[int] = memory.type(self._store).limits.max
        # Serializes every call into the store (wasmtime's Store is not thread-safe).
        self._store_lock = threading.Lock()
        guard(self, "_store_lock")  # taken around fork(): see _forksafe
        # Guards the runner's flags below; the runner and pause() wait on it.
        self._cond = threading.Condition()
        self._paused = False
        self._in_step = False
        self._stopping = False
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._steps = 0
        #: :attr:`steps` right after the last :meth:`adopt` (where a migrated run continues), else None.
        self.adopted_at: Optional[int] = None
        self._ptr = 0
        self._len = 0
        with self._store_lock:
            try:
                with self._deadline("wasm step(0)"):
                    self._steps = int(self._step(self._store, 0))
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                raise InvalidStateError(f"the wasm module's step(0) must run no iteration, but it trapped: "
                                        f"{_first_line(exc)}") from None
            self._refresh()

    @contextlib.contextmanager
    def _deadline(self, what: str) -> Iterator[None]:
        """Bound a call into the module's code by ``step_timeout``. Store lock held (or the
        store not yet shared). An overrun becomes ``ExecutionFailedError`` naming ``what``;
        other traps pass through for the caller to describe."""
        if self.step_timeout is None:
            yield
            return
        self._store.set_epoch_deadline(1 + math.ceil(self.step_timeout / _TICK))
        try:
            with _ticker:
                yield
        except wasmtime.Trap as exc:
            if exc.trap_code == wasmtime.TrapCode.INTERRUPT:
                raise ExecutionFailedError(f"{what} interrupted: it ran longer than step_timeout "
                                           f"({self.step_timeout:g} s)") from exc
            raise

    # ------------------------------------------------------------------ memory
    def _refresh(self) -> None:
        """Re-read the memory's base and length (after a step may have grown it). Store lock held."""
        # A memory of 0 pages may have a null base: a 0-length view of address 0 is fine.
        ptr = ctypes.cast(self._memory.data_ptr(self._store), ctypes.c_void_p).value or 0
        size = self._memory.data_len(self._store)
        if self._len and ptr != self._ptr:
            # The engine is configured so this cannot happen; earlier views would dangle.
            raise RuntimeError("wasmtime moved a linear memory despite memory_may_move=False")
        with self._cond:
            self._ptr, self._len = ptr, size

    def state(self) -> memoryview:
        """The linear memory as a flat writable ``memoryview`` (format ``"B"``), zero-copy.

        Its length is the memory's size in bytes (a multiple of :data:`WASM_PAGE_SIZE`) as of
        the last completed step; call again after the agent grew its memory. Safe to read while
        the agent runs (bytes may change under the reader); the view keeps the agent alive.
        """
        with self._cond:
            ptr, size = self._ptr, self._len
        array = (ctypes.c_ubyte * size).from_address(ptr)
        array._cm_owner = self  # type: ignore[attr-defined]  # keeps the store (the memory) alive
        return memoryview(array).cast("B")

    def numpy(self) -> npt.NDArray[np.uint8]:
        """The linear memory as a writable 1-D ``uint8`` array, zero-copy (see :meth:`state`)."""
        return np.frombuffer(self.state(), dtype=np.uint8)

    @property
    def memory_size(self) -> int:
        """The memory's size in bytes as of the last completed step."""
        with self._cond:
            return self._len

    @property
    def max_memory_size(self) -> Optional[int]:
        """The module's declared maximum memory size in bytes, or ``None`` when it declares none."""
        return None if self._max_pages is None else self._max_pages * WASM_PAGE_SIZE

    def grow_to(self, nbytes: int) -> memoryview:
        """Grow the memory to ``nbytes`` (a multiple of :data:`WASM_PAGE_SIZE`) and return
        :meth:`state`. Only while no step runs (paused or not started).

        Raises ``InvalidStateError`` when ``nbytes`` is not a whole number of pages, is smaller
        than the memory (wasm memories cannot shrink) or above its maximum, or the agent is
        running.
        """
        self._require_idle("grow its memory")
        with self._store_lock:
            current = self._memory.data_len(self._store)
            self._check_size(nbytes, current)
            if nbytes > current:
                try:
                    self._memory.grow(self._store, (nbytes - current) // WASM_PAGE_SIZE)
                except wasmtime.WasmtimeError as exc:
                    raise InvalidStateError(f"cannot grow the wasm memory to {nbytes} bytes: {_first_line(exc)}") from None
            self._refresh()
        return self.state()

    def _check_size(self, nbytes: int, current: int) -> None:
        if nbytes % WASM_PAGE_SIZE:
            raise InvalidStateError(f"a wasm memory size must be a multiple of {WASM_PAGE_SIZE} bytes, got {nbytes}")
        if nbytes < current:
            raise InvalidStateError(f"cannot shrink the wasm memory from {current} to {nbytes} bytes")
        if self._max_pages is not None and nbytes > self._max_pages * WASM_PAGE_SIZE:
            raise InvalidStateError(f"{nbytes} bytes exceed the module's maximum memory of "
                                    f"{self._max_pages * WASM_PAGE_SIZE} bytes")

    # ------------------------------------------------------------------ globals
    def globals(self) -> Dict[str, Union[int, float]]:
        """The exported mutable globals' values by name (ints for i32/i64, floats for f32/f64).

        Read between steps; for a snapshot consistent with :meth:`state`, pause first.
        """
        with self._store_lock:
            return {name: g.value(self._store) for name, (_, g) in self._globals.items()}

    @property
    def global_kinds(self) -> Dict[str, str]:
        """The exported mutable globals' kinds by name (``"i32"``, ``"i64"``, ``"f32"``, ``"f64"``)."""
        return {name: kind for name, (kind, _) in self._globals.items()}

    def set_globals(self, values: Mapping[str, Union[int, float]]) -> None:
        """Set exported mutable globals by name. Only while no step runs.

        Raises ``InvalidStateError`` for a name that is not an exported mutable global, a
        value out of its range, or a running agent.
        """
        self._require_idle("set its globals")
        unknown = sorted(set(values) - set(self._globals))
        if unknown:
            raise InvalidStateError(f"not exported mutable globals of this module: {', '.join(unknown)}")
        with self._store_lock:
            for name, value in values.items():
                kind, g = self._globals[name]
                if kind in ("i32", "i64"):
                    try:
                        value = _check_int(int(value), 32 if kind == "i32" else 64)
                    except ValueError as exc:
                        raise InvalidStateError(f"global {name!r}: {exc}") from None
                    g.set_value(self._store, wasmtime.Val.i32(value) if kind == "i32" else wasmtime.Val.i64(value))
                else:
                    g.set_value(self._store, wasmtime.Val.f32(float(value)) if kind == "f32"
                                else wasmtime.Val.f64(float(value)))
            self._call_step(0)

    def extra(self) -> bytes:
        """The exported mutable globals serialized (:func:`encode_globals`, 23 + 10 bytes +
        the name per global), tied to this module by its digest. Pause first for a value
        consistent with the memory."""
        with self._store_lock:
            values = {name: (kind, g.value(self._store)) for name, (kind, g) in self._globals.items()}
        return encode_globals(self.module_digest, values)

    # ------------------------------------------------------------------ target side
    def adopt(self, state: BufferLike, extra: BufferLike) -> None:
        """Take a migrated memory and globals: grow to ``len(state)``, copy it in, set the globals.

        Only while no step runs; afterwards :meth:`resume` (or :meth:`run`) continues the
        migrated agent. Raises ``CorruptDataError`` for malformed ``extra``;
        ``InvalidStateError`` when ``extra`` belongs to another module or names globals this
        module does not have (or misses some), or the size is not adoptable (see
        :meth:`grow_to`). Nothing is changed when it raises.
        """
        decoded = decode_globals(extra)
        if decoded.module_digest != self.module_digest:
            raise InvalidStateError("the migrated globals belong to a different wasm module "
                                    f"({decoded.module_digest.hex()} != {self.module_digest.hex()})")
        mine = self.global_kinds
        theirs = {name: kind for name, (kind, _) in decoded.values.items()}
        if mine != theirs:
            raise InvalidStateError(f"the migrated globals {theirs} do not match this module's {mine}")
        source = as_bytes_view(state, "state")
        self._require_idle("adopt a migrated state")
        self._check_size(len(source), self.memory_size)
        view = self.grow_to(len(source))
        view[:] = source
        self.set_globals({name: value for name, (_, value) in decoded.values.items()})
        self.adopted_at = self.steps

    @classmethod
    def from_migrated(cls, state: BufferLike, extra: BufferLike, module: _ModuleSource = None,
                      **options: Any) -> "WasmAgent":
        """A new, not yet running instance of ``module`` holding a migrated state (see :meth:`adopt`)."""
        agent = cls(module, **options)
        agent.adopt(state, extra)
        return agent

    # ------------------------------------------------------------------ running
    @property
    def steps(self) -> int:
        """Iterations run so far, as the module's ``step`` last reported."""
        with self._cond:
            return self._steps

    @property
    def error(self) -> Optional[BaseException]:
        """The exception that stopped the runner (a trap), or ``None``."""
        with self._cond:
            return self._error

    @property
    def running(self) -> bool:
        """True while the background runner is alive (even if paused)."""
        return self._thread is not None and self._thread.is_alive()

    def _require_idle(self, what: str) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive() and (not self._paused or self._in_step):
                raise InvalidStateError(f"pause the wasm agent before trying to {what}")

    def _call_step(self, n: int) -> int:
        """One ``step(n)`` call; store lock held by the caller. Traps become ExecutionFailedError."""
        try:
            with self._deadline("wasm step"):
                total = int(self._step(self._store, n))
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            raise ExecutionFailedError(f"wasm step trapped: {_first_line(exc)}") from exc
        finally:
            self._refresh()
        with self._cond:
            self._steps = total
        return total

    def run(self, iterations: int) -> int:
        """Run ``iterations`` more iterations in the calling thread (in ``batch``-sized calls);
        return the total so far. Only while the background runner is not stepping.

        Raises ``ExecutionFailedError`` when the module traps, ``InvalidStateError`` when the
        agent is running, ``ValueError`` for a negative count.
        """
        if iterations < 0:
            raise ValueError(f"iterations must not be negative, got {iterations}")
        self._require_idle("run it in this thread")
        left = iterations
        total = self.steps
        while left > 0:
            n = min(left, self.batch, 0x7FFFFFFF)
            with self._store_lock:
                total = self._call_step(n)
            left -= n
        return total

    def start(self) -> None:
        """Start the background runner (steps of ``batch`` iterations at ``rate`` until ``stop_at``).

        Raises ``InvalidStateError`` when it is already running.
        """
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                raise InvalidStateError("the wasm agent is already running")
            self._paused = self._stopping = False
            self._error = None
            self._thread = threading.Thread(target=self._runner, name="cellmigrate-wasm-agent", daemon=True)
            self._thread.start()

    def _runner(self) -> None:
        origin, origin_steps = time.monotonic(), self.steps
        while True:
            with self._cond:
                if self._paused and not self._stopping:
                    while self._paused and not self._stopping:
                        self._cond.wait()
                    # Pace from here: no burst to "catch up" the paused time.
                    origin, origin_steps = time.monotonic(), self._steps
                if self._stopping:
                    return
                n = self.batch
                if self.stop_at is not None:
                    n = min(n, self.stop_at - self._steps)
                    if n <= 0:
                        return
                self._in_step = True
            try:
                with self._store_lock:
                    total = self._call_step(n)
            except BaseException as exc:  # noqa: BLE001 - a trap (or worse) ends the run; report it
                with self._cond:
                    self._error = exc
                    self._in_step = False
                    self._cond.notify_all()
                return
            with self._cond:
                self._in_step = False
                self._cond.notify_all()
                if self.rate is not None:
                    # Sleep until the pace allows the next batch; wakes early on pause/stop.
                    due = origin + (total - origin_steps) / self.rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        self._cond.wait(delay)

    def pause(self) -> None:
        """Stop stepping: returns once no step is running, and none starts until :meth:`resume`.

        A no-op when not running (or already paused). With several threads pausing and
        resuming at once the latest call wins: a :meth:`resume` from another thread while
        this one waits for the step in flight ends the wait (waiting on would never end:
        the runner, resumed, starts its next step before a waiter can see the last one
        finish). Raises ``ExecutionFailedError`` when the runner stopped on a trap (the
        memory is then mid-step, not a state to migrate).
        """
        with self._cond:
            self._paused = True
            self._cond.notify_all()
            while self._in_step and self._paused:
                self._cond.wait()
            error = self._error
        if error is not None:
            raise _failure(error) from error

    def resume(self) -> None:
        """Continue stepping after :meth:`pause`; starts the runner when it is not running,
        unless it ended on a trap: the memory is then mid-step, no state to run on, and
        the agent stays stopped (:meth:`pause` and :meth:`wait` keep reporting the trap;
        :meth:`start` runs it again deliberately). A migration resumes its source after a
        pause that failed, which is how a trapped agent's does."""
        with self._cond:
            alive = self._thread is not None and self._thread.is_alive()
            if alive:
                self._paused = False
                self._cond.notify_all()
                return
            if self._error is not None:
                self._paused = False
                return
        self.start()

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the runner to end (it reached ``stop_at``, or :meth:`stop`); return :attr:`steps`.

        Raises ``ExecutionFailedError`` when it ended on a trap, ``TimeoutError`` when it is
        still running after ``timeout`` seconds.
        """
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"the wasm agent is still running after {timeout} s (at {self.steps} iterations)")
        error = self.error
        if error is not None:
            raise _failure(error) from error
        return self.steps

    def stop(self, timeout: Optional[float] = 10.0) -> None:
        """End the background runner after its current step (idempotent)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> "WasmAgent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"WasmAgent(memory={self.memory_size} bytes, steps={self.steps}, "
                f"globals={list(self._globals)}, running={self.running})")
