"""cellmigrate.wasm: a wasmtime instance as a migration source and target.

The memory view must alias the instance's memory (no copy either way), survive
``memory.grow``, the globals must round-trip exactly, ``pause`` must mean "no step is
running and none starts", and the shipped agent must be deterministic so that a migrated
run can be compared with a reference run byte for byte.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

wasmtime = pytest.importorskip("wasmtime")  # in the test extra; the import names the need

from cellmigrate import CellError, CorruptDataError, ExecutionFailedError, InvalidStateError  # noqa: E402
from cellmigrate.wasm import (  # noqa: E402
    WASM_PAGE_SIZE,
    WasmAgent,
    decode_globals,
    encode_globals,
    mutator_wat,
)

#: A module with a global of every migratable kind; step(n) adds n to each of them and
#: writes the low byte of $i at offset $i % 65536.
KINDS_WAT = """
(module
  (memory (export "memory") 1 4)
  (global $i (export "i") (mut i32) (i32.const -7))
  (global $l (export "l") (mut i64) (i64.const 0x7fffffffffffffff))
  (global $f (export "f") (mut f32) (f32.const 1.5))
  (global $d (export "d") (mut f64) (f64.const -2.25))
  (global (export "constant") i32 (i32.const 3))
  (func (export "step") (param $n i32) (result i64)
    (global.set $i (i32.add (global.get $i) (local.get $n)))
    (global.set $l (i64.add (global.get $l) (i64.extend_i32_s (local.get $n))))
    (global.set $f (f32.add (global.get $f) (f32.convert_i32_s (local.get $n))))
    (global.set $d (f64.add (global.get $d) (f64.convert_i32_s (local.get $n))))
    (i32.store8 (i32.rem_u (global.get $i) (i32.const 65536)) (global.get $i))
    (i64.extend_i32_s (global.get $i))))
"""

#: step(n) spins ~n * 20000 loop turns, then writes the step count at offset 0 (trap at 5).
SLOW_WAT = """
(module
  (memory (export "memory") 1)
  (global $steps (export "steps") (mut i64) (i64.const 0))
  (func (export "step") (param $n i32) (result i64)
    (local $k i32)
    (if (i64.eq (global.get $steps) (i64.const {trap_at})) (then unreachable))
    (local.set $k (i32.mul (local.get $n) (i32.const 20000)))
    (block $b (loop $l
      (br_if $b (i32.eqz (local.get $k)))
      ;; volatile-ish work: the store keeps the loop from being optimized away
      (i32.store (i32.const 8) (local.get $k))
      (local.set $k (i32.sub (local.get $k) (i32.const 1)))
      (br $l)))
    (global.set $steps (i64.add (global.get $steps) (i64.extend_i32_u (local.get $n))))
    (i64.store (i32.const 0) (global.get $steps))
    (global.get $steps)))
"""


def _sha(buf: object) -> str:
    return hashlib.sha256(memoryview(buf)).hexdigest()  # type: ignore[arg-type]


def _raw_memory(agent: WasmAgent) -> bytes:
    """The memory as wasmtime itself reads it (an independent path from the view)."""
    return bytes(agent._memory.read(agent._store))


# ---------------------------------------------------------------- zero-copy memory

def test_state_view_aliases_the_instance_memory_both_ways() -> None:
    agent = WasmAgent(KINDS_WAT)
    view = agent.state()
    assert view.format == "B" and not view.readonly and len(view) == WASM_PAGE_SIZE
    base = ctypes.cast(agent._memory.data_ptr(agent._store), ctypes.c_void_p).value
    assert np.frombuffer(view, dtype=np.uint8).ctypes.data == base  # same address, no copy
    # Host writes are seen by wasmtime and by the module.
    view[100:104] = b"\x01\x02\x03\x04"
    agent.numpy()[200] = 0xAB
    raw = _raw_memory(agent)
    assert raw[100:104] == b"\x01\x02\x03\x04" and raw[200] == 0xAB
    # Module writes are seen through the view taken before the step.
    agent.run(10)  # $i = -7 + 10 = 3: writes byte 3 at offset 3
    assert view[3] == 3 and _raw_memory(agent)[3] == 3


def test_view_survives_grow_and_new_view_covers_it() -> None:
    agent = WasmAgent()  # the mutator: 64 pages, +1 page every 1024 iterations
    old = agent.state()
    assert len(old) == 64 * WASM_PAGE_SIZE
    agent.run(5 * 1024)
    new = agent.state()
    assert len(new) == 69 * WASM_PAGE_SIZE == agent.memory_size
    # The memory did not move: the old view still shows the live prefix.
    assert bytes(old) == bytes(new[: len(old)]) == _raw_memory(agent)[: len(old)]
    assert bytes(new) == _raw_memory(agent)


def test_view_keeps_the_agent_alive() -> None:
    view = WasmAgent(KINDS_WAT).state()  # the agent has no other reference
    import gc

    gc.collect()
    view[0] = 42  # would be a use after free if the store had been dropped
    assert view[0] == 42


def test_grow_to_and_its_refusals() -> None:
    agent = WasmAgent(KINDS_WAT)
    assert agent.max_memory_size == 4 * WASM_PAGE_SIZE
    view = agent.grow_to(3 * WASM_PAGE_SIZE)
    assert len(view) == 3 * WASM_PAGE_SIZE and agent._memory.size(agent._store) == 3
    assert bytes(view[WASM_PAGE_SIZE:]) == bytes(2 * WASM_PAGE_SIZE)  # new pages are zero
    with pytest.raises(InvalidStateError, match="multiple of 65536"):
        agent.grow_to(3 * WASM_PAGE_SIZE + 1)
    with pytest.raises(InvalidStateError, match="cannot shrink"):
        agent.grow_to(WASM_PAGE_SIZE)
    with pytest.raises(InvalidStateError, match="exceed the module's maximum"):
        agent.grow_to(5 * WASM_PAGE_SIZE)
    assert agent.memory_size == 3 * WASM_PAGE_SIZE  # refusals changed nothing


# ---------------------------------------------------------------- globals

def test_globals_of_every_kind_round_trip_through_extra() -> None:
    a = WasmAgent(KINDS_WAT)
    assert a.globals() == {"i": -7, "l": 2**63 - 1, "f": 1.5, "d": -2.25}  # the constant is not state
    a.run(3)
    extra = a.extra()
    decoded = decode_globals(extra)
    assert decoded.module_digest == a.module_digest
    assert decoded.values == {"i": ("i32", -4), "l": ("i64", -(2**63) + 2), "f": ("f32", 4.5), "d": ("f64", 0.75)}
    b = WasmAgent(KINDS_WAT)
    b.adopt(a.state(), extra)
    assert b.globals() == a.globals() and b.steps == a.steps == -4
    b.set_globals({"i": 2**32 - 1, "f": 0.25})  # unsigned spelling of -1
    assert b.globals()["i"] == -1 and b.globals()["f"] == 0.25
    with pytest.raises(InvalidStateError, match="not exported mutable globals"):
        b.set_globals({"constant": 1})
    with pytest.raises(InvalidStateError, match="does not fit in 32 bits"):
        b.set_globals({"i": 2**32})


@given(i=st.integers(-(2**31), 2**31 - 1), l=st.integers(-(2**63), 2**63 - 1),
       f=st.floats(width=32, allow_nan=False), d=st.floats(allow_nan=False),
       digest=st.binary(min_size=16, max_size=16))
@settings(max_examples=200, deadline=None)
def test_encode_decode_globals_round_trip(i: int, l: int, f: float, d: float, digest: bytes) -> None:
    values = {"i": ("i32", i), "l": ("i64", l), "f": ("f32", f), "d": ("f64", d)}
    blob = encode_globals(digest, values)
    assert len(blob) == 23 + 4 * 11
    out = decode_globals(blob)
    assert out.module_digest == digest and out.values == values


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decode_globals_refuses_garbage_cleanly(data: bytes) -> None:
    try:
        decode_globals(data)
    except CorruptDataError:
        pass


def test_decode_globals_refuses_every_truncation_and_corruption() -> None:
    blob = WasmAgent().extra()
    for n in range(len(blob)):
        with pytest.raises(CorruptDataError):
            decode_globals(blob[:n])
    with pytest.raises(CorruptDataError, match="trailing"):
        decode_globals(blob + b"\0")
    with pytest.raises(CorruptDataError, match="magic"):
        decode_globals(b"XXXX" + blob[4:])
    with pytest.raises(CorruptDataError, match="version"):
        decode_globals(blob[:4] + b"\x09" + blob[5:])
    name_at = 23 + 1 + len("lcg")
    with pytest.raises(CorruptDataError, match="unknown kind"):
        decode_globals(blob[:name_at] + b"\x07" + blob[name_at + 1:])
    one = encode_globals(bytes(16), {"x": ("i64", 2**40)})
    with pytest.raises(CorruptDataError, match="i32 global"):
        decode_globals(one[:23 + 2] + b"\x00" + one[23 + 3:])  # kind i64 -> i32 with a 2**40 value
    with pytest.raises(CorruptDataError, match="twice"):
        decode_globals(encode_globals(bytes(16), {"x": ("i32", 1)})[:21] + b"\x02\x00" + (b"\x01x\x00" + bytes(8)) * 2)


def test_adopt_refuses_foreign_or_mismatched_globals_and_changes_nothing() -> None:
    source = WasmAgent()
    source.run(2000)
    target = WasmAgent()
    before = (bytes(target.state()), target.globals())
    with pytest.raises(InvalidStateError, match="different wasm module"):
        target.adopt(source.state(), WasmAgent(KINDS_WAT).extra())
    forged = encode_globals(source.module_digest, {"lcg": ("i64", 1)})
    with pytest.raises(InvalidStateError, match="do not match"):
        target.adopt(source.state(), forged)
    with pytest.raises(InvalidStateError, match="multiple of 65536"):
        target.adopt(bytes(source.state())[:-1], source.extra())
    with pytest.raises(InvalidStateError, match="exceed"):
        target.adopt(bytes(257 * WASM_PAGE_SIZE), source.extra())
    with pytest.raises(CorruptDataError):
        target.adopt(source.state(), b"nonsense")
    assert (bytes(target.state()), target.globals()) == before


# ---------------------------------------------------------------- modules

@pytest.mark.parametrize("module, message", [
    ("(module (func (export \"step\") (param i32) (result i64) (i64.const 0)))", "export its linear memory"),
    ("(module (memory (export \"memory\") 1))", "must export a function 'step"),
    ("(module (memory (export \"memory\") 1) (func (export \"step\") (param i64) (result i64) (i64.const 0)))",
     "must have type"),
    ("(module (memory (export \"memory\") 1) (global (export \"v\") (mut v128) (v128.const i64x2 0 0))"
     " (func (export \"step\") (param i32) (result i64) (i64.const 0)))", "cannot be migrated"),
    ("(module (import \"env\" \"f\" (func)) (memory (export \"memory\") 1))", "does not instantiate"),
    ("(module (memory", "does not compile"),
    ("(module (memory (export \"memory\") 1) (func (export \"step\") (param i32) (result i64) unreachable))",
     "step\\(0\\) must run no iteration, but it trapped"),
    (b"\0asm\x01\0\0\0\xff", "does not instantiate"),
    (b"\xff\xfe", "neither a binary"),
])
def test_bad_modules_are_refused_clearly(module: object, message: str) -> None:
    with pytest.raises(InvalidStateError, match=message):
        WasmAgent(module)  # type: ignore[arg-type]


def test_module_from_path_and_binary(tmp_path: "pytest.TempPathFactory") -> None:
    wat = tmp_path / "m.wat"  # type: ignore[operator]
    wat.write_text(mutator_wat())
    a, b = WasmAgent(wat), WasmAgent(wasmtime.wat2wasm(mutator_wat()))
    assert a.wasm_binary == b.wasm_binary == WasmAgent().wasm_binary
    assert a.module_digest == b.module_digest
    with pytest.raises(InvalidStateError, match="cannot read"):
        WasmAgent(tmp_path / "missing.wasm")  # type: ignore[operator]
    # A path given as a str is a path (it was compiled as WAT text: "expected '('"), for
    # WAT and binary files alike; WAT text, comments first or not, stays text.
    binary = tmp_path / "m.wasm"  # type: ignore[operator]
    binary.write_bytes(wasmtime.wat2wasm(mutator_wat()))
    assert WasmAgent(str(wat)).wasm_binary == WasmAgent(str(binary)).wasm_binary == a.wasm_binary
    assert WasmAgent(";; a comment\n" + mutator_wat()).wasm_binary == a.wasm_binary
    with pytest.raises(InvalidStateError, match="cannot read the wasm module"):
        WasmAgent(str(tmp_path / "missing.wat"))  # type: ignore[operator]


def test_option_checks() -> None:
    for kwargs in ({"batch": 0}, {"rate": 0}, {"stop_at": -1}):
        with pytest.raises(ValueError):
            WasmAgent(KINDS_WAT, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        WasmAgent(KINDS_WAT).run(-1)


# ---------------------------------------------------------------- determinism

def test_mutator_is_deterministic_and_split_invariant() -> None:
    reference = WasmAgent()
    reference.run(10_000)
    ref = (_sha(reference.state()), reference.globals())
    for batch, splits in ((7, [10_000]), (4096, [1, 2, 3, 9_994]), (1000, [5_000, 0, 5_000])):
        agent = WasmAgent(batch=batch)
        for n in splits:
            agent.run(n)
        assert (_sha(agent.state()), agent.globals()) == ref
    assert ref[1]["steps"] == 10_000
    assert reference.memory_size == (64 + 10_000 // 1024) * WASM_PAGE_SIZE


def test_mutator_memory_is_mixed_and_capped() -> None:
    agent = WasmAgent(batch=1 << 16)
    agent.run(1)  # the first iteration fills the initial memory
    pages = agent.numpy().reshape(-1, 4096)
    zero = int((~pages.any(axis=1)).sum())
    assert 0.3 < zero / len(pages) < 0.7  # about half the 4 KiB pages untouched heap
    assert len(np.unique(pages[pages.any(axis=1)][:, :8], axis=0)) > 0.9 * (len(pages) - zero)  # all different
    agent.run(250_000)  # 244 grows requested, capped at 256 pages
    assert agent.memory_size == 256 * WASM_PAGE_SIZE == agent.max_memory_size


@given(st.lists(st.integers(0, 3000), min_size=1, max_size=5))
@settings(max_examples=15, deadline=None)
def test_any_split_matches_one_run(splits: List[int]) -> None:
    one, parts = WasmAgent(), WasmAgent(batch=97)
    one.run(sum(splits))
    for n in splits:
        parts.run(n)
    assert bytes(one.state()) == bytes(parts.state()) and one.globals() == parts.globals()


# ---------------------------------------------------------------- running, pause

def test_background_runner_stops_at_exactly_stop_at() -> None:
    agent = WasmAgent(batch=300, stop_at=5_000)
    agent.start()
    assert agent.wait(30) == 5_000
    reference = WasmAgent()
    reference.run(5_000)
    assert bytes(agent.state()) == bytes(reference.state()) and agent.globals() == reference.globals()


def test_pause_returns_only_between_steps_and_holds() -> None:
    agent = WasmAgent(SLOW_WAT.format(trap_at=-1), batch=50)  # one step spins ~1e6 turns
    agent.start()
    time.sleep(0.05)
    agent.pause()
    steps = agent.steps
    snapshot = bytes(agent.state())
    # No half-done step: the memory holds the count of the last finished step.
    assert struct.unpack_from("<q", snapshot, 0)[0] == steps and steps % 50 == 0
    assert agent.globals()["steps"] == steps
    time.sleep(0.1)
    assert agent.steps == steps and bytes(agent.state()) == snapshot  # nothing ran meanwhile
    with pytest.raises(InvalidStateError, match="already running"):
        agent.start()
    agent.resume()
    deadline = time.monotonic() + 10
    while agent.steps == steps and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agent.steps > steps
    with pytest.raises(InvalidStateError, match="pause the wasm agent"):
        agent.set_globals({"steps": 0})
    agent.stop()
    assert not agent.running


def test_pause_from_many_threads_is_safe() -> None:
    agent = WasmAgent(batch=64)
    agent.start()
    errors: List[BaseException] = []

    def flap() -> None:
        try:
            for _ in range(50):
                agent.pause()
                agent.resume()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=flap) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # Every flapper is done before the last pause: one still running could resume the agent
    # after it and make the state run ahead of ``steps`` (seen once on a loaded machine).
    assert not any(t.is_alive() for t in threads)
    agent.pause()
    steps = agent.steps
    reference = WasmAgent()
    reference.run(steps)
    assert errors == []
    assert bytes(agent.state()) == bytes(reference.state())  # no step ran twice or half
    agent.stop()


def test_rate_paces_the_runner() -> None:
    agent = WasmAgent(batch=10, rate=1000)
    agent.start()
    time.sleep(0.3)
    agent.pause()
    elapsed_bound = 1000 * (0.3 + 0.2) + 10  # pace upper bound with slack for a slow sleep
    assert 0 < agent.steps <= elapsed_bound
    agent.stop()


def test_trap_stops_the_runner_and_is_reported() -> None:
    agent = WasmAgent(SLOW_WAT.format(trap_at=5), batch=1)
    agent.start()
    with pytest.raises(ExecutionFailedError, match="trapped"):
        agent.wait(30)
    assert agent.steps == 5 and isinstance(agent.error, ExecutionFailedError)
    with pytest.raises(ExecutionFailedError, match="failed"):
        agent.pause()
    with pytest.raises(ExecutionFailedError):
        agent.run(1)
    # resume() (what a migration does after a pause that failed) leaves it trapped: it
    # restarted the runner from mid-step memory and wiped the trap.
    agent.resume()
    time.sleep(0.1)
    assert agent.steps == 5 and isinstance(agent.error, ExecutionFailedError)
    with pytest.raises(ExecutionFailedError, match="trapped"):
        agent.wait(1)


#: Traps once, at step 5 (counted before the check): run again, it would go on.
TRAP_ONCE_WAT = """
(module
  (memory (export "memory") 1)
  (global $steps (export "steps") (mut i64) (i64.const 0))
  (func (export "step") (param $n i32) (result i64)
    (global.set $steps (i64.add (global.get $steps) (i64.extend_i32_u (local.get $n))))
    (if (i64.eq (global.get $steps) (i64.const 5)) (then unreachable))
    (global.get $steps)))
"""


def test_a_migration_of_a_trapped_agent_leaves_it_trapped() -> None:
    """The driver resumes a source whose pause() failed (it may have paused part of
    it); a trapped WasmAgent's pause() fails, and it must not run on after that (its
    resume() restarted the runner from mid-step memory and wiped the trap)."""
    import socket

    from cellmigrate.live import BufferTarget, LiveMigration, MemoryStore
    from cellmigrate.live.receiver import LiveReceiver
    from cellmigrate.live.sender import StreamChannel
    from cellmigrate.live.transport import SocketStream

    agent = WasmAgent(TRAP_ONCE_WAT, batch=1, rate=1000)
    agent.start()
    with pytest.raises(ExecutionFailedError):
        agent.wait(30)
    assert agent.steps == 4  # the trapping step's count is not taken
    receiver = LiveReceiver(MemoryStore(), BufferTarget(), timeout=10)

    def connect() -> SocketStream:
        a, b = socket.socketpair()
        threading.Thread(target=receiver.handle, args=(SocketStream(a),), daemon=True).start()
        return SocketStream(b)

    with pytest.raises(ExecutionFailedError, match="trapped"):
        LiveMigration(agent, StreamChannel(connect, retries=0, timeout=10), max_rounds=0).run()
    time.sleep(0.2)
    assert agent.steps == 4 and isinstance(agent.error, ExecutionFailedError)


#: step(n > 0) never returns.
SPIN_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "step") (param $n i32) (result i64)
    (if (i32.gt_s (local.get $n) (i32.const 0)) (then (loop $forever (br $forever))))
    (i64.const 0)))
"""


def test_step_timeout_interrupts_a_runaway_step_and_spares_the_others() -> None:
    with pytest.raises(ExecutionFailedError, match=r"interrupted: it ran longer than step_timeout \(0.2 s\)"):
        WasmAgent(SPIN_WAT, step_timeout=0.2).run(1)
    runaway = WasmAgent(SPIN_WAT, step_timeout=0.5)
    runaway.start()  # its step spins; the epoch ticker runs meanwhile
    other, reference = WasmAgent(), WasmAgent(step_timeout=30)
    other.run(20_000)  # no timeout: never interrupted, whatever the epoch does
    reference.run(20_000)  # a generous timeout: not hit
    assert bytes(other.state()) == bytes(reference.state())
    with pytest.raises(ExecutionFailedError, match="interrupted"):
        runaway.pause()  # returns (raising) once the runaway step was stopped
    assert not runaway.running
    with pytest.raises(ValueError, match="step_timeout"):
        WasmAgent(SPIN_WAT, step_timeout=0)


#: Every way a module's code runs while WasmAgent() constructs it, each spinning forever.
RUNAWAY_AT_CONSTRUCTION = {
    "step(0)": ("(module (memory (export \"memory\") 1)"
                " (func (export \"step\") (param i32) (result i64) (loop (br 0)) i64.const 0))"),
    "start function": ("(module (memory (export \"memory\") 1) (func $spin (loop (br 0))) (start $spin)"
                       " (func (export \"step\") (param i32) (result i64) i64.const 0))"),
}


@pytest.mark.parametrize("where", sorted(RUNAWAY_AT_CONSTRUCTION))
def test_step_timeout_bounds_the_module_code_the_constructor_runs(where: str) -> None:
    """The constructor ran step(0) (and instantiation the start function) without the
    deadline, so a runaway module hung WasmAgent() forever. Run in a child process: a
    regression is a timeout here, not a hung test session."""
    code = (
        "import sys, time\n"
        "from cellmigrate import ExecutionFailedError\n"
        "from cellmigrate.wasm import WasmAgent\n"
        "began = time.monotonic()\n"
        "try:\n"
        "    WasmAgent(sys.argv[1], step_timeout=0.2)\n"
        "except ExecutionFailedError as exc:\n"
        "    print(f'{time.monotonic() - began:.3f}', exc)\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, RUNAWAY_AT_CONSTRUCTION[where]],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"WasmAgent() hung in the module's {where} despite step_timeout=0.2")
    assert proc.returncode == 0, proc.stderr
    took, message = proc.stdout.strip().split(" ", 1)
    assert float(took) < 20, took
    assert message.startswith("Agent execution failed: wasm ") and message.count("Agent execution failed") == 1
    assert "interrupted: it ran longer than step_timeout (0.2 s)" in message, message


def test_a_runner_failure_is_reported_once_prefixed() -> None:
    """pause() and wait() wrapped the runner's ExecutionFailedError in another one and
    the class's prefix read twice ("Agent execution failed: the wasm agent failed:
    Agent execution failed: wasm step interrupted ...")."""
    runaway = WasmAgent(SPIN_WAT, step_timeout=0.2)
    runaway.start()
    with pytest.raises(ExecutionFailedError) as waited:
        runaway.wait(30)
    with pytest.raises(ExecutionFailedError) as paused:
        runaway.pause()
    expected = "Agent execution failed: wasm step interrupted: it ran longer than step_timeout (0.2 s)"
    assert str(paused.value) == str(waited.value) == expected
    trapped = WasmAgent(SLOW_WAT.format(trap_at=1), batch=1)
    trapped.start()
    with pytest.raises(ExecutionFailedError) as waited:
        trapped.wait(30)
    assert str(waited.value).startswith("Agent execution failed: wasm step trapped: ")
    assert str(waited.value).count("Agent execution failed") == 1


@pytest.mark.parametrize("module", ["", "   ", " \n\t", b"", b" \n", bytearray(), memoryview(b"")])
def test_an_empty_module_is_refused_plainly(module: object) -> None:
    """"" was taken for the path "." ("cannot read the wasm module '.': Is a directory")."""
    with pytest.raises(InvalidStateError) as refused:
        WasmAgent(module)  # type: ignore[arg-type]
    assert str(refused.value) == "Invalid state: the wasm module is empty"


def test_an_empty_module_file_is_refused_plainly(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wat"
    empty.write_bytes(b"\n")
    for source in (empty, str(empty)):
        with pytest.raises(InvalidStateError, match=r"^Invalid state: the wasm module file '.*empty\.wat' is empty$"):
            WasmAgent(source)  # type: ignore[arg-type]


# ---------------------------------------------------------------- migration by hand

def test_migration_while_running_matches_a_reference_run() -> None:
    """Pre-copy by hand (a full copy while running, then the final copy while paused),
    the target continues to the total: equal to an unmigrated run. The live driver's own
    test of the same agent lives with the example (tests/test_examples.py)."""
    total = 40_000
    source = WasmAgent(batch=128, rate=40_000)
    source.start()
    time.sleep(0.05)
    staged = bytearray(source.state())  # round 0 while it runs (torn, as a real one is)
    time.sleep(0.05)
    source.pause()
    final = source.state()
    assert len(final) >= len(staged)
    staged[:] = final  # the final round (grown meanwhile: the copy takes the new size)
    extra = source.extra()
    at = source.steps
    source.stop()
    assert 0 < at < total
    target = WasmAgent.from_migrated(staged, extra, batch=500, stop_at=total)
    assert target.steps == at
    target.resume()
    assert target.wait(60) == total
    reference = WasmAgent()
    reference.run(total)
    assert bytes(target.state()) == bytes(reference.state())
    assert target.globals() == reference.globals()


def test_wasm_agent_is_a_live_source_and_target() -> None:
    from cellmigrate.live import SourceAgent, TargetAgent

    agent = WasmAgent(KINDS_WAT)
    assert isinstance(agent, SourceAgent) and isinstance(agent, TargetAgent)
    agent.run(1)
    assert agent.adopted_at is None
    other = WasmAgent(KINDS_WAT)
    other.adopt(memoryview(bytes(agent.state())).toreadonly(), agent.extra())  # as the receiver hands it
    assert other.adopted_at == other.steps == agent.steps
    assert other.global_kinds == {"i": "i32", "l": "i64", "f": "f32", "d": "f64"}


# ---------------------------------------------------------------- with the live driver

def test_live_migration_in_process_while_running_matches_a_reference_run() -> None:
    """The real pre-copy driver over the in-process channel: rounds while the agent runs
    and grows, the final round paused, then node B continues to the total."""
    from cellmigrate.live import InProcessChannel, LiveMigration, MemoryStore, ReceiverSession

    # At 40 000 iterations/s the source would need 10 s to reach the total: the migration
    # happens mid-run even on a loaded machine (stop_at keeps it from overshooting anyway).
    total = 400_000
    source = WasmAgent(batch=128, rate=40_000, stop_at=total)
    source.start()
    deadline = time.monotonic() + 10
    while source.steps < 2000 and time.monotonic() < deadline:
        time.sleep(0.01)
    started_at = source.steps
    target = WasmAgent(batch=4096, stop_at=total)
    summary = LiveMigration(source, InProcessChannel(ReceiverSession(MemoryStore(), target))).run()
    paused_at = source.steps
    source.stop()
    assert 0 < started_at <= paused_at < total
    assert summary.rounds[0].round == 0 and summary.rounds[-1].final and len(summary.rounds) >= 2
    assert summary.state_size == source.memory_size
    assert target.adopted_at == paused_at  # node B continues exactly where node A paused
    assert target.wait(60) == total
    reference = WasmAgent(batch=1 << 16)
    reference.run(total)
    assert bytes(target.state()) == bytes(reference.state())
    assert target.globals() == reference.globals()


def test_live_migration_refused_by_the_target_resumes_the_source() -> None:
    """A target instance of another module refuses to adopt: the migration fails, the
    source runs on, the target's memory and globals are untouched."""
    from cellmigrate.live import InProcessChannel, LiveMigration, MemoryStore, ReceiverSession

    source = WasmAgent(batch=128, rate=40_000)
    source.start()
    target = WasmAgent(KINDS_WAT)
    before = (bytes(target.state()), target.globals())
    with pytest.raises(CellError, match="different wasm module"):
        LiveMigration(source, InProcessChannel(ReceiverSession(MemoryStore(), target))).run()
    steps = source.steps
    deadline = time.monotonic() + 10
    while source.steps == steps and time.monotonic() < deadline:
        time.sleep(0.01)
    assert source.steps > steps  # resumed: the agent runs again on node A
    source.stop()
    assert (bytes(target.state()), target.globals()) == before and target.adopted_at is None


# ---------------------------------------------------------------- node B killed mid-migration

#: Node B in a second process: one migration into a fresh mutator instance (port on stdout).
_NODE_B = """
from cellmigrate.live import MemoryStore
from cellmigrate.live.receiver import LiveReceiver
from cellmigrate.live.transport import listen
from cellmigrate.wasm import WasmAgent
listener = listen("127.0.0.1:0")
print(listener.getsockname()[1], flush=True)
LiveReceiver(MemoryStore(), WasmAgent(), timeout=30).serve(listener, idle_timeout=30, resume_timeout=30)
"""


class _KillAtFinalRound:
    """A source that kills node B when the final round's extra is read (agent paused)."""

    def __init__(self, agent: WasmAgent, node_b: "subprocess.Popen[str]") -> None:
        self.agent, self.node_b = agent, node_b

    def state(self) -> memoryview:
        return self.agent.state()

    def pause(self) -> None:
        self.agent.pause()

    def resume(self) -> None:
        self.agent.resume()

    def extra(self) -> bytes:
        self.node_b.kill()
        self.node_b.wait(30)
        return self.agent.extra()


def _running(agent: WasmAgent, within: float = 10.0) -> bool:
    steps, deadline = agent.steps, time.monotonic() + within
    while agent.steps == steps and time.monotonic() < deadline:
        time.sleep(0.01)
    return agent.steps > steps


@pytest.mark.parametrize("when", ["pre-copy", "final round"])
def test_node_b_killed_mid_migration(when: str) -> None:
    """SIGKILL node B during pre-copy (the source never paused: it just keeps running) or
    while the agent is paused for the final round (the commit cannot be delivered: the
    source either resumes, or stays paused when the outcome cannot be known; it never
    runs while node B might)."""
    from cellmigrate import MigrationValidator
    from cellmigrate.live import LiveMigration, OutcomeUnknownError, RoundStats
    from cellmigrate.live.sender import StreamChannel
    from cellmigrate.live.transport import connect

    node_b = subprocess.Popen([sys.executable, "-c", _NODE_B], stdout=subprocess.PIPE, text=True)
    source = WasmAgent(batch=128, rate=40_000)
    try:
        assert node_b.stdout is not None
        port = int(node_b.stdout.readline())
        source.start()
        assert _running(source)

        def on_round(stats: RoundStats) -> None:
            if when == "pre-copy" and stats.round == 0:
                node_b.kill()
                node_b.wait(30)

        channel = StreamChannel(lambda: connect(f"127.0.0.1:{port}", timeout=5), timeout=5, retries=1,
                                retry_delay=0.05)
        validator = MigrationValidator()
        agent = source if when == "pre-copy" else _KillAtFinalRound(source, node_b)
        with pytest.raises(CellError) as raised:
            LiveMigration(agent, channel, validator=validator, on_round=on_round).run()
        events = [e.event_type.name for e in validator.audit_log]
        assert events[-1] == "MIGRATION_FAILED"
        if isinstance(raised.value, OutcomeUnknownError):
            assert when == "final round"
            assert not _running(source, 0.3)  # left paused: node B might have resumed it
            assert "ROLLBACK_STARTED" not in events
        else:
            assert _running(source)  # resumed (or never paused): the agent runs on node A
            assert when == "pre-copy" or "ROLLBACK_COMPLETED" in events
    finally:
        source.stop()
        if node_b.poll() is None:
            node_b.kill()
            node_b.wait(30)


# ---------------------------------------------------------------- connection cuts

#: Node B for the cut trials: one migration (keyed) into a mutator that runs on to argv[2]
#: iterations; its final memory goes to argv[1], a JSON line reports, "FAILED ..." otherwise.
_NODE_B_REPORTING = """
import json, sys
from cellmigrate import CellError
from cellmigrate.live import MemoryStore
from cellmigrate.live.protocol import derive_key
from cellmigrate.live.receiver import LiveReceiver
from cellmigrate.live.transport import listen
from cellmigrate.wasm import WasmAgent
out, total = sys.argv[1], int(sys.argv[2])
target = WasmAgent(batch=4096, stop_at=total)
listener = listen("127.0.0.1:0")
print(listener.getsockname()[1], flush=True)
receiver = LiveReceiver(MemoryStore(), target, key=derive_key(b"cut trials"), timeout=10)
try:
    receiver.serve(listener, idle_timeout=30, resume_timeout=5)
except CellError as exc:
    print("FAILED", exc, flush=True)
    sys.exit(1)
if target.adopted_at is None:
    print("FAILED nothing adopted:", receiver.last_error, flush=True)
    sys.exit(1)
steps = target.wait(60)
open(out, "wb").write(target.state())
print(json.dumps({"adopted_at": target.adopted_at, "steps": steps, "globals": target.globals()}), flush=True)
"""


def _cut_trial(tmp_path: Path, cut_after: int, total: int = 300_000) -> "tuple[str, int]":
    """Migrate a running agent through a proxy that cuts the connection once, after
    ``cut_after`` client bytes. Returns the outcome and the bytes node A sent; asserts the agent never runs on both
    nodes and that a completed migration ends equal to a reference run."""
    import json

    from cellmigrate.live import LiveMigration, OutcomeUnknownError
    from cellmigrate.live.protocol import derive_key
    from cellmigrate.live.sender import StreamChannel
    from cellmigrate.live.transport import connect
    from live_net import CuttingProxy

    out = tmp_path / "memory.bin"
    node_b = subprocess.Popen([sys.executable, "-c", _NODE_B_REPORTING, str(out), str(total)],
                              stdout=subprocess.PIPE, text=True)
    source = WasmAgent(batch=128, rate=40_000, stop_at=total)
    proxy: Optional[CuttingProxy] = None
    try:
        assert node_b.stdout is not None
        proxy = CuttingProxy(f"127.0.0.1:{int(node_b.stdout.readline())}", [cut_after])
        source.start()
        assert _running(source)
        address = proxy.address
        channel = StreamChannel(lambda: connect(address, timeout=10), key=derive_key(b"cut trials"), timeout=10,
                                retries=5, retry_delay=0.05)
        error: Optional[BaseException] = None
        try:
            LiveMigration(source, channel).run()
        except CellError as exc:
            error = exc
        report_line = node_b.stdout.readline()
        node_b.wait(60)
        node_b_ran = not report_line.startswith("FAILED")
        if error is None or isinstance(error, OutcomeUnknownError):
            assert not _running(source, 0.2)  # paused for good: node B may run it now
        else:
            assert _running(source) and not node_b_ran  # resumed on node A, so never adopted on node B
        if not node_b_ran:
            return (f"failed: {type(error).__name__}" if error else "failed?"), proxy.forwarded
        assert error is None or isinstance(error, OutcomeUnknownError), error
        report = json.loads(report_line)
        assert report["adopted_at"] == source.steps and report["steps"] == total
        reference = WasmAgent(batch=1 << 16)
        reference.run(total)
        assert out.read_bytes() == bytes(reference.state()) and report["globals"] == reference.globals()
        cut = " after a cut" if proxy.connections > 1 else " (no cut: the offset was past the end)"
        return "completed" + cut + (" (outcome unknown to node A)" if error else ""), proxy.forwarded
    finally:
        source.stop()
        if proxy is not None:
            proxy.close()
        if node_b.poll() is None:
            node_b.kill()
            node_b.wait(30)


def test_connection_cut_at_random_points_resumes_the_migration(tmp_path: Path) -> None:
    import random

    rng = random.Random(7)
    for trial in range(2):
        (tmp_path / str(trial)).mkdir()
        # Round 0 alone sends about 2.5 MB from node A (LZ4): a cut below 2 MB always happens.
        outcome, _ = _cut_trial(tmp_path / str(trial), rng.randrange(1, 2_000_000))
        assert outcome.startswith("completed after a cut"), outcome  # resumed from


@pytest.mark.live_cuts
def test_connection_cuts_many_trials(tmp_path: Path) -> None:
    """20 trials, each cut at a random point of what an uncut migration sends."""
    import random

    seed = int(os.environ.get("CELLMIGRATE_CUT_SEED", "2026"))
    rng = random.Random(seed)
    (tmp_path / "uncut").mkdir()
    outcome, sent = _cut_trial(tmp_path / "uncut", 1 << 40)
    assert outcome == "completed (no cut: the offset was past the end)"
    outcomes = []
    offset = 0
    for trial in range(20):
        offset = rng.randrange(1, sent)
        # A running agent's migration varies in size (its rounds follow the agent's pace):
        # an offset past the end of this run is drawn again inside the size it had, at most
        # twice, so (nearly) every trial really cuts.
        for attempt in range(3):
            where = tmp_path / f"{trial}-{attempt}"
            where.mkdir()
            outcome, forwarded = _cut_trial(where, offset)
            if "after a cut" in outcome or not outcome.startswith("completed"):
                break
            offset = rng.randrange(1, max(2, forwarded))
        outcomes.append(outcome)
    print(f"seed {seed}, {sent} bytes uncut: {outcomes}")
    assert all(o.startswith("completed") for o in outcomes), outcomes
    assert sum("after a cut" in o for o in outcomes) >= 18, outcomes
