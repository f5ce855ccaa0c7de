"""``cellmigrate demo``: an end-to-end migration of a synthetic agent, step by step.

Two migrations of the same agent from node A to node B, using only the public API:

1. **A normal incremental migration.** The target already holds a full copy of the
   state (the pre-copy). The compatibility check passes, a rollback point is captured,
   the agent keeps running and changes a few percent of its pages, and only those pages
   travel: the delta is built, serialized, decoded on the target, applied atomically,
   verified byte for byte against the source, and the migration is completed.
2. **A migration whose delta is damaged in transit.** One bit of the serialized delta
   flips on the way: decoding refuses it. Then a forged delta (a page altered and the
   wire format re-sealed around it, so it decodes) is refused by ``apply``, which checks
   the result before writing. The target is proved unchanged, and the rollback point
   restores the source.
3. **A running WebAssembly agent moved live** (needs ``cellmigrate[wasm]``; skipped with a
   note without wasmtime). The package's ``mutator.wat`` runs under wasmtime on node A,
   rewriting and growing its linear memory, while ``cellmigrate.live`` pre-copies it in
   rounds over the stream protocol on 127.0.0.1 TCP to node B (a receiver thread of this
   process; ``examples/wasm_live_migration.py`` runs node B as a second process). The
   agent pauses only for the final round; node B proves the digest, adopts the memory and
   the exported mutable globals and runs on, and its final memory and globals are then
   compared byte for byte with an unmigrated run of the same number of steps.

Every step prints what it did, with sizes, timings and throughput, and the audit trail
closes the run. The exit code is 0 only when every step behaved as expected (including
the refusals), so the demo doubles as a smoke test of an installation.

>>> run_demo(size=64 * 1024, quiet=True)
0
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import IO, Callable, List, Optional, TypeVar

import numpy as np

from . import (
    IMPLEMENTATION,
    PAGE_SIZE,
    Agent,
    AgentRequirements,
    AuditEntry,
    AuditEventType,
    DEFAULT_DIGEST,
    CollectingCallback,
    CorruptDataError,
    InvalidStateError,
    MigrationProgressTracker,
    MigrationValidator,
    NodeCapabilities,
    digest,
    first_difference,
    simple_checksum,
)
from ._stdout import StdoutError, print_out
from .delta import DeltaSnapshot, DirtyPage
from .statefile import format_size, plural

__all__ = ["run_demo", "synthetic_state", "mutate_pages", "DEFAULT_SIZE"]

DEFAULT_SIZE = 256 << 20
#: Fraction of pages the agent writes to between two migrations.
FIRST_DIRTY, SECOND_DIRTY = 0.03, 0.05
#: A minimal WebAssembly module header: the agent's "binary" in this demo.
WASM_HEADER = b"\x00asm\x01\x00\x00\x00"
#: Chunk size of the simulated network transfer (drives the progress events).
WIRE_CHUNK = 1 << 20
#: The live WebAssembly migration: iterations in total (node A, then node B), node A's
#: pace (iterations per second; one 8-byte write each) and how long it runs before the
#: migration starts (seconds), and the bound on every wait of that part (seconds).
WASM_TOTAL_STEPS, WASM_RATE, WASM_WARMUP, WASM_TIMEOUT = 250_000, 40_000, 0.3, 60.0
#: What the demo needs in RAM: about this many times ``size`` (node A, node B, the
#: rollback point, the delta's pages...) plus a fixed part (the interpreter, the modules,
#: the wasm agent). Measured peak RSS: 547 MiB at 128 MiB, 1,784 MiB at 512 MiB.
MEMORY_FACTOR = 3.5
MEMORY_BASE = 128 << 20
#: Where Linux says how much memory new allocations can get (MemAvailable).
_MEMINFO = "/proc/meminfo"
#: The size the refusal suggests when it fits.
_SUGGESTED_SIZE = 64 << 20

T = TypeVar("T")


def _gbps(nbytes: int, seconds: float) -> str:
    """Throughput text; GB/s is 10**9 bytes per second."""
    if seconds <= 0:
        return "n/a"
    return f"{nbytes / seconds / 1e9:.2f} GB/s"


def _timed(fn: Callable[[], T]) -> "tuple[T, float]":
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def synthetic_state(size: int, seed: int) -> bytearray:
    """A state that looks like a WebAssembly linear memory to a compressor.

    Pages are, at random, zero (half of them: untouched heap), random bytes (a quarter:
    compressed or encrypted data) or low-entropy "text" (a quarter). Deterministic in
    ``seed``.
    """
    rng = np.random.default_rng(seed)
    state = bytearray(size)  # zero-filled by the OS, lazily: zero pages cost nothing
    arr = np.frombuffer(state, dtype=np.uint8)
    full = size // PAGE_SIZE
    if full:
        pages = arr[: full * PAGE_SIZE].reshape(full, PAGE_SIZE)
        kinds = rng.integers(0, 4, size=full)
        filled = np.flatnonzero(kinds >= 2)
        # Random bytes only for the pages that are not zero; "text" pages are random
        # bytes folded into 16 lower-case letters.
        content = rng.integers(0, 256, size=(filled.size, PAGE_SIZE), dtype=np.uint8)
        text = kinds[filled] == 3
        content[text] = (content[text] & 0x0F) | 0x60
        pages[filled] = content
        del pages, content
    if size % PAGE_SIZE:
        arr[full * PAGE_SIZE:] = rng.integers(0, 256, size=size % PAGE_SIZE, dtype=np.uint8)
    del arr  # release the export so the bytearray stays resizable
    return state


def mutate_pages(state: bytearray, fraction: float, seed: int) -> List[int]:
    """Let the agent "run": change a run of bytes in ``fraction`` of the pages.

    Each chosen page gets 16 bytes to a whole page XORed with non-zero values, so every
    chosen page really changes. Returns the sorted indices of the changed pages.
    """
    rng = np.random.default_rng(seed)
    npages = (len(state) + PAGE_SIZE - 1) // PAGE_SIZE
    count = max(1, int(round(npages * fraction)))
    chosen = np.sort(rng.choice(npages, size=min(count, npages), replace=False))
    arr = np.frombuffer(state, dtype=np.uint8)
    for index in chosen.tolist():
        start = index * PAGE_SIZE
        page_len = min(PAGE_SIZE, len(state) - start)
        length = int(rng.integers(min(16, page_len), page_len + 1))
        offset = start + int(rng.integers(0, page_len - length + 1))
        arr[offset:offset + length] ^= rng.integers(1, 256, size=length, dtype=np.uint8)
    del arr
    return [int(i) for i in chosen]


def _available_memory() -> Optional[int]:
    """Bytes of RAM new allocations can get without swapping, or ``None`` when unknown.

    Linux: ``MemAvailable`` of ``/proc/meminfo`` (free memory plus the caches the kernel
    can drop). Elsewhere the free physical pages, where ``os.sysconf`` reports them.
    """
    try:
        with open(_MEMINFO, "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    fields = line.split()
                    unit = fields[2].lower() if len(fields) > 2 else b"b"
                    return int(fields[1]) * (1024 if unit == b"kb" else 1)
        return None  # a kernel before 3.14: no estimate, no check
    except FileNotFoundError:
        pass
    except (OSError, ValueError, IndexError):
        return None
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _memory_refusal(size: int) -> Optional[str]:
    """Why a demo of ``size`` bytes must not start here, or ``None`` when it may."""
    # Linux overcommits: the allocations succeed and the demo is killed part way (or
    # the machine swaps to a halt) instead of MemoryError, so look before allocating.
    available = _available_memory()
    if available is None or _memory_need(size) <= available:
        return None
    suggestion = _SUGGESTED_SIZE
    while suggestion > 1 << 20 and _memory_need(suggestion) > available:
        suggestion >>= 1
    hint = f"; try --size {suggestion >> 20}MiB" if _memory_need(suggestion) <= available else ""
    return (f"not enough memory for a {format_size(size)} state (it needs about {MEMORY_FACTOR:g}x that and "
            f"{format_size(MEMORY_BASE)} more, {format_size(_memory_need(size))}; "
            f"{format_size(available)} available){hint}")


def _memory_need(size: int) -> int:
    return int(MEMORY_FACTOR * size) + MEMORY_BASE


def _host_architecture() -> Optional[str]:
    """This machine's architecture in the crate's spelling, or None when unknown to it."""
    machine = platform.machine().lower()
    return {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine)


@dataclass
class _Report:
    """Prints the steps and remembers whether each behaved as expected."""

    quiet: bool
    stream: IO[str]
    failures: List[str] = field(default_factory=list)
    step_no: int = 0
    wasm_skipped: bool = False

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print_out(text, self.stream, flush=True)  # StdoutError: not a failed step

    def heading(self, text: str) -> None:
        self.step_no = 0
        self.say()
        self.say(text)
        self.say("-" * len(text))

    def step(self, title: str, result: str, *more: str) -> None:
        self.step_no += 1
        self.say(f"[{self.step_no:>2}] {title}")
        self.say(f"     {result}")
        for line in more:
            self.say(f"     {line}")

    def expect(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
            self.say(f"     !! UNEXPECTED: {what}")
        return ok


def _audit_table(validator: MigrationValidator, names: "dict[bytes, str]") -> List[str]:
    lines = [f"  {'time (UTC)':<10} {'migration':<10} {'event':<22} {'ok':<4} details"]
    for entry in validator.audit_log:
        when = time.strftime("%H:%M:%S", time.gmtime(entry.timestamp))
        mig = names.get(entry.migration_id, entry.migration_id.hex()[:8])
        ok = "ok" if entry.success else "FAIL"
        lines.append(f"  {when:<10} {mig:<10} {entry.event_type.name:<22} {ok:<4} {entry.details}")
    return lines


def _transfer(wire: bytes, tracker: MigrationProgressTracker) -> bytes:
    """Simulate the network: move ``wire`` in chunks, reporting progress, return what arrived."""
    received = bytearray()
    tracker.report_started()
    for pos in range(0, len(wire), WIRE_CHUNK):
        received += wire[pos:pos + WIRE_CHUNK]
        tracker.update_transfer_progress(len(received))
    if not wire:
        tracker.update_transfer_progress(0)
    return bytes(received)


def _run(size: int, seed: int, report: _Report) -> None:
    say, step, expect = report.say, report.step, report.expect
    node_a, node_b = uuid.UUID(int=0xA).bytes, uuid.UUID(int=0xB).bytes
    agent = Agent(WASM_HEADER, agent_id=uuid.UUID(int=seed + 1))
    aid = agent.id.bytes
    mid1, mid2 = uuid.uuid4().bytes, uuid.uuid4().bytes
    names = {mid1: "first", mid2: "second"}
    validator = MigrationValidator()
    npages = (size + PAGE_SIZE - 1) // PAGE_SIZE

    say(f"cellmigrate demo: migrating an agent with a {format_size(size)} memory state from node A to node B")
    say(f"(kernels: {IMPLEMENTATION}; {platform.machine()}; GB/s = 10^9 bytes per second)")
    say("First a normal migration that ships only the pages the agent changed; then one whose data")
    say("is damaged on the way, which must be refused without harm and rolled back; last, a running")
    say("WebAssembly agent moved live over TCP, which must finish exactly as if it had never moved.")

    # The target node: the crate's default node, widened only if the demo state is larger
    # than its 1 GiB limit (so --size 4GiB still demonstrates a migration, not a refusal).
    caps = NodeCapabilities.new()
    notes: List[str] = []
    if size > caps.max_state_size:
        caps.max_state_size = size
        caps.available_memory = max(caps.available_memory, 8 * size)
        notes.append(f"(target configured to accept {format_size(size)}; NodeCapabilities.new() allows 1 GiB)")
    requirements = AgentRequirements(
        architecture=_host_architecture(), required_memory=size, required_storage=0,
        required_wasm_features=["bulk-memory"], state_size=size, version="0.1.0",
    )

    # ---------------------------------------------------------------- migration 1
    report.heading("Migration 1: an incremental migration (only changed pages travel)")
    source, dt = _timed(lambda: synthetic_state(size, seed))
    step("Create the agent's state on node A",
         f"{format_size(size)} in {npages} pages of {PAGE_SIZE} bytes (half zero, a quarter random, a quarter text)",
         f"agent {agent.id}, built in {dt:.3f} s")

    validator.audit_log.log_start(mid1, aid, node_a, node_b)
    status = validator.validate_pre_migration(mid1, agent, requirements, caps)
    step("Compatibility check against node B",
         f"{status.kind.name.lower().replace('_', ' ')}: architecture {requirements.architecture or 'any'}, "
         f"state {format_size(size)} <= {format_size(caps.max_state_size)}, version {requirements.version}",
         *notes, *[f"warning: {w}" for w in status.warnings()])
    expect(status.can_proceed(), f"the compatibility check refused the migration: {status.reason}")

    target, dt = _timed(lambda: bytearray(source))
    step("Pre-copy: node B receives the full state (sequence 1)",
         f"{format_size(size)} copied in {dt:.3f} s ({_gbps(size, dt)}); the agent keeps running on node A")

    _, dt = _timed(lambda: validator.capture_rollback_info(mid1, agent, source))
    step("Capture a rollback point on node A",
         f"{format_size(size)} saved, checksum {simple_checksum(source)}, in {dt:.3f} s ({_gbps(size, dt)})")

    changed = mutate_pages(source, FIRST_DIRTY, seed + 100)
    step(f"The agent runs and writes to {FIRST_DIRTY:.0%} of its pages",
         f"{len(changed)} of {npages} pages changed since the pre-copy")

    delta, dt = _timed(lambda: DeltaSnapshot.create(aid, target, source, 1, 2))
    step("Build the incremental delta (sequence 1 -> 2)",
         f"scanned 2 x {format_size(size)} in {dt:.3f} s ({_gbps(size, dt)}): {delta.dirty_page_count()} dirty pages",
         f"page data {format_size(delta.uncompressed_size())} -> {format_size(delta.compressed_size())} with RLE "
         f"(ratio {delta.compression_ratio():.3f}); digest {delta.digest_algorithm}")
    expect(delta.dirty_page_count() == len(changed),
           f"the delta has {delta.dirty_page_count()} pages, the agent changed {len(changed)}")

    wire, dt = _timed(delta.serialize)
    step("Serialize for the network",
         f"{format_size(len(wire))} on the wire = {100.0 * len(wire) / size:.2f}% of the full state, in {dt:.3f} s")

    validator.audit_log.log(AuditEntry.new(mid1, aid, AuditEventType.TRANSFER_STARTED,
                                           f"Sending delta: {len(wire)} bytes", True).with_nodes(node_a, node_b))
    events = CollectingCallback()
    tracker = MigrationProgressTracker(aid, len(wire), events)
    received = _transfer(wire, tracker)
    incoming, dt = _timed(lambda: DeltaSnapshot.deserialize(received))
    validator.audit_log.log(AuditEntry.new(mid1, aid, AuditEventType.TRANSFER_COMPLETED,
                                           f"Delta received: {len(received)} bytes", True).with_nodes(node_a, node_b))
    step("Transfer to node B and decode",
         f"{format_size(len(received))} received ({events.event_count()} progress events, "
         f"{tracker.progress_percent()}%); every wire-format check passed in {dt:.3f} s")

    tracker.report_validating("apply")
    _, dt = _timed(lambda: incoming.apply(target))
    tracker.update_restoring_progress(100)
    step("Apply the delta on node B (atomic)",
         f"result checksum and {incoming.digest_algorithm} digest checked before writing, then "
         f"{incoming.dirty_page_count()} pages written, in {dt:.3f} s ({_gbps(size, dt)} over the state)")

    result, dt = _timed(lambda: validator.verify_post_migration(mid1, aid, source, target))
    diff = first_difference(source, target)
    step("Verify node B against node A",
         ("passed" if result.passed else "FAILED") + f": {'; '.join(result.details)}; byte-for-byte: "
         + ("identical" if diff is None else f"differs at offset {diff}"),
         f"in {dt:.3f} s ({_gbps(size, dt)})")
    expect(result.passed and diff is None, "the migrated state is not identical to the source")

    tracker.report_completed()
    validator.complete_migration(mid1, True, f"Incremental migration: {delta.dirty_page_count()} pages, "
                                             f"{len(wire)} bytes on the wire")
    step("Complete the migration", "rollback point released; the agent now runs on node B at sequence 2")

    # ---------------------------------------------------------------- migration 2
    report.heading("Migration 2: the delta is damaged in transit (refused, then rolled back)")
    validator.audit_log.log_start(mid2, aid, node_a, node_b)
    status = validator.validate_pre_migration(mid2, agent, requirements, caps)
    validator.capture_rollback_info(mid2, agent, source)
    step("Compatibility check and rollback point",
         f"{status.kind.name.lower().replace('_', ' ')}; {format_size(size)} saved on node A")
    expect(status.can_proceed(), f"the compatibility check refused the migration: {status.reason}")

    changed = mutate_pages(source, SECOND_DIRTY, seed + 200)
    delta = DeltaSnapshot.create(aid, target, source, 2, 3)
    wire = delta.serialize()
    step(f"The agent writes to {SECOND_DIRTY:.0%} of its pages; delta built (sequence 2 -> 3)",
         f"{delta.dirty_page_count()} dirty pages, {format_size(len(wire))} on the wire")

    target_digest = digest(target)
    validator.audit_log.log(AuditEntry.new(mid2, aid, AuditEventType.TRANSFER_STARTED,
                                           f"Sending delta: {len(wire)} bytes", True).with_nodes(node_a, node_b))
    damaged = bytearray(wire)
    flip_at = len(damaged) // 2
    damaged[flip_at] ^= 0x04
    step("One bit flips in transit",
         f"byte {flip_at} of {len(wire)}: 0x{wire[flip_at]:02x} -> 0x{damaged[flip_at]:02x}")

    try:
        DeltaSnapshot.deserialize(bytes(damaged))
    except CorruptDataError as exc:
        step("Node B decodes the delta", f"refused, as it must be: CorruptDataError: {exc}")
        refusal = str(exc)
    else:
        refusal = ""
        expect(False, "a delta with a flipped bit was accepted by deserialize")

    # A forger who also re-seals the wire format (so it decodes) is stopped by apply,
    # which computes the result's checksum and digest before writing anything.
    forged = DeltaSnapshot.deserialize(wire)
    page = forged.dirty_pages[0]
    start = page.index * PAGE_SIZE  # an XOR-encoded page decodes against its base page
    data = bytearray(page.get_data(base=target[start : start + PAGE_SIZE],
                                   length=min(PAGE_SIZE, forged.total_size - start)))
    data[0] ^= 0x01
    forged.dirty_pages[0] = DirtyPage(page.index, bytes(data))
    forged = DeltaSnapshot.deserialize(forged.serialize())
    try:
        forged.apply(target)
    except InvalidStateError as exc:
        step("A forged delta (one page altered, wire format re-sealed) is applied on node B",
             f"refused before writing: {exc}")
    else:
        expect(False, "apply accepted a delta whose page was altered")

    validator.audit_log.log(AuditEntry.new(mid2, aid, AuditEventType.TRANSFER_COMPLETED,
                                           f"Delta rejected: {refusal or 'forged page'}", False)
                            .with_nodes(node_a, node_b))
    unchanged = digest(target) == target_digest
    validator.audit_log.log_completion(mid2, aid, False, "Delta corrupted in transit; target unchanged")
    info = validator.execute_rollback(mid2)
    same_as_seq2 = first_difference(target, info.original_state) is None
    step("Node B's state is unchanged",
         f"{DEFAULT_DIGEST} digest before and after: {'equal' if unchanged else 'DIFFERENT'}; byte-for-byte equal to "
         f"sequence 2: {'yes' if same_as_seq2 else 'NO'}")
    expect(unchanged and same_as_seq2, "the refused deltas changed the target")

    restored, dt = _timed(lambda: info.restore_into(source))
    back = first_difference(source, target) is None
    step("Roll back node A to the rollback point",
         f"{format_size(restored)} restored and verified (checksum + {info.digest_algorithm}) in {dt:.3f} s; "
         f"node A and node B now hold the same state: {'yes' if back else 'NO'}",
         f"the {len(changed)} page writes of the failed attempt are undone; the agent resumes on node A")
    expect(back, "after rollback the source differs from the target")

    # ---------------------------------------------------------------- migration 3
    node_b_log = _run_wasm(report, validator, names, requirements, caps)

    # ---------------------------------------------------------------- audit trail
    report.heading(f"Audit trail ({len(validator.audit_log)} entries)")
    for line in _audit_table(validator, names):
        say(line)
    failures = validator.audit_log.get_failures()
    expect([e.migration_id for e in failures] == [mid2] * len(failures) and len(failures) >= 2,
           "the audit trail does not show the second migration as the only failure")
    if node_b_log is not None:
        report.heading(f"Audit trail of node B, live migration ({len(node_b_log.audit_log)} entries)")
        for line in _audit_table(node_b_log, names):
            say(line)
        expect(not node_b_log.audit_log.get_failures(), "node B's audit trail shows a failure")


def _run_wasm(report: _Report, validator: MigrationValidator, names: "dict[bytes, str]",
              requirements: AgentRequirements, caps: NodeCapabilities) -> Optional[MigrationValidator]:
    """Migration 3: a running wasmtime agent, live over TCP; returns node B's validator
    (None when wasmtime is not installed and the part is skipped)."""
    say, step, expect = report.say, report.step, report.expect
    try:
        from .wasm import WASM_PAGE_SIZE, WasmAgent
    except ImportError as exc:
        report.heading("Migration 3: a running WebAssembly agent, moved live (skipped)")
        hint = "" if "pip install" in str(exc) else "wasmtime is not available (pip install 'cellmigrate[wasm]'): "
        say(f"skipped: {hint}{exc}")  # wasm.py's own error names the package once
        report.wasm_skipped = True
        return None
    from .live import LiveMigration, MemoryStore, RoundStats
    from .live.receiver import LiveReceiver
    from .live.protocol import derive_key
    from .live.sender import StreamChannel
    from .live.transport import connect, listen

    report.heading("Migration 3: a running WebAssembly agent, moved live over TCP (wasmtime)")
    mid = uuid.uuid4().bytes
    names[mid] = "live wasm"
    # stop_at: even on a very slow machine node A never runs past the total.
    source = WasmAgent(batch=128, rate=WASM_RATE, stop_at=WASM_TOTAL_STEPS)
    aid = Agent(source.wasm_binary).id_bytes
    exports = ", ".join(f"{name} (mutable {kind})" for name, kind in source.global_kinds.items())
    source.start()
    step("Start the agent on node A: the package's mutator.wat, instantiated by wasmtime",
         f"{len(source.wasm_binary)} bytes of WebAssembly; linear memory {format_size(source.memory_size)} "
         f"({source.memory_size // WASM_PAGE_SIZE} pages of 64 KiB), growing to "
         f"{format_size(source.max_memory_size or 0)}; globals {exports}",
         f"running in a thread at {WASM_RATE} iterations/s (one 8-byte write each, a page grown every 1024)")

    node_b = MigrationValidator()
    target = WasmAgent(batch=4096, stop_at=WASM_TOTAL_STEPS)
    key = derive_key(os.urandom(32))  # a fresh shared key: both ends prove they hold it
    receiver = LiveReceiver(MemoryStore(), target, key=key, capabilities=caps, validator=node_b, timeout=WASM_TIMEOUT)
    listener = listen("127.0.0.1:0")
    port = listener.getsockname()[1]
    served: List[BaseException] = []

    def serve() -> None:
        try:
            receiver.serve(listener, idle_timeout=WASM_TIMEOUT, resume_timeout=WASM_TIMEOUT)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            served.append(exc)

    thread = threading.Thread(target=serve, name="cellmigrate-demo-node-b", daemon=True)
    thread.start()
    step(f"Node B listens on 127.0.0.1:{port}",
         "a fresh instance of the same module waits to adopt; the stream protocol, in a thread of this process",
         "a fresh shared key: both nodes prove they hold it (keyed BLAKE3) and every frame carries a MAC")

    time.sleep(WASM_WARMUP)

    # The migration calls on_round; an exception from it would fail the migration (and
    # its abort wait out the peer), so a report that cannot be written (a full disk, a
    # reader gone) is kept here, the migration left to finish, and raised after it.
    unwritten: List[BaseException] = []

    def on_round(stats: RoundStats) -> None:
        if unwritten:
            return
        title = ("Final round: the agent is paused" if stats.final
                 else f"Pre-copy round {stats.round} while the agent runs")
        more = []
        if stats.final:
            more.append("node B proved the state equal (xxh3_128_tree of 4 KiB pages), adopted the memory and globals and resumed; "
                        f"downtime {1e3 * (stats.actual_downtime_s or 0.0):.1f} ms")
        try:
            step(title, f"{plural(stats.dirty_pages, 'page')} ({format_size(stats.dirty_bytes)}) of a "
                        f"{format_size(stats.state_size)} memory, {format_size(stats.wire_bytes)} on the wire, "
                        f"in {1e3 * stats.duration_s:.1f} ms", *more)
        except (BrokenPipeError, StdoutError) as exc:
            unwritten.append(exc)

    try:
        channel = StreamChannel(lambda: connect(f"127.0.0.1:{port}", timeout=WASM_TIMEOUT), key=key,
                                timeout=WASM_TIMEOUT)
        wasm_req = AgentRequirements(
            architecture=requirements.architecture, required_memory=source.max_memory_size or source.memory_size,
            required_storage=0, required_wasm_features=["bulk-memory"], state_size=source.memory_size,
            version=requirements.version,
        )
        summary = LiveMigration(source, channel, agent_id=aid, migration_id=mid, requirements=wasm_req,
                                validator=validator, on_round=on_round).run()
        paused_at = source.steps
        if unwritten:
            raise unwritten[0]
    finally:
        source.stop()
        if thread.is_alive() and target.adopted_at is None:
            # The migration failed before node B adopted: wake its accept() instead of
            # letting it wait out its idle timeout (shutdown interrupts a blocked accept).
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        thread.join(WASM_TIMEOUT)
        listener.close()
    expect(not served, f"node B failed: {served[0] if served else ''}")
    step("The migration completes",
         f"{plural(len(summary.rounds), 'round')}, {format_size(summary.wire_bytes)} on the wire for a "
         f"{format_size(summary.state_size)} memory ({summary.transfer_ratio:.2f}x the memory), stopped on "
         f"{summary.stop_reason}; node A stays paused (stopped), node B runs the agent from iteration {target.adopted_at}")
    expect(target.adopted_at == paused_at,
           f"node B continued from iteration {target.adopted_at}, node A paused at {paused_at}")

    final = target.wait(WASM_TIMEOUT)
    reference = WasmAgent(batch=1 << 16)
    _, dt = _timed(lambda: reference.run(WASM_TOTAL_STEPS))
    diff = (first_difference(reference.state(), target.state())
            if reference.memory_size == target.memory_size else min(reference.memory_size, target.memory_size))
    same_globals = target.globals() == reference.globals()
    step(f"Node B runs on to {final} iterations; a reference instance runs {WASM_TOTAL_STEPS} without migrating",
         f"memory {format_size(target.memory_size)} vs {format_size(reference.memory_size)}: "
         + ("identical byte for byte" if diff is None else f"DIFFERS at offset {diff}")
         + f"; globals {target.globals()} " + ("equal" if same_globals else f"DIFFER from {reference.globals()}"),
         f"(reference run in {dt:.3f} s)")
    expect(diff is None and same_globals and final == WASM_TOTAL_STEPS,
           "the migrated WebAssembly agent does not match the unmigrated reference run")
    return node_b


def run_demo(size: int = DEFAULT_SIZE, *, seed: int = 2024, quiet: bool = False,
             stream: Optional[IO[str]] = None) -> int:
    """Run the demo; print to ``stream`` (stdout); return 0 when every step behaved as expected."""
    out = sys.stdout if stream is None else stream
    if size < PAGE_SIZE:
        print(f"cellmigrate demo: error: --size must be at least {PAGE_SIZE} bytes, got {size}", file=sys.stderr)
        return 2
    refusal = _memory_refusal(size)
    if refusal is not None:
        print(f"cellmigrate demo: error: {refusal}", file=sys.stderr)
        return 2
    report = _Report(quiet=quiet, stream=out)
    started = time.perf_counter()
    try:
        _run(size, seed, report)
    except (BrokenPipeError, StdoutError):
        raise  # the reader went away (`| head`) or stdout failed: the CLI says so, not a failed step
    except MemoryError:
        print(f"cellmigrate demo: error: not enough memory for a {format_size(size)} state "
              f"(it needs about {MEMORY_FACTOR:g}x that); try --size 64MiB", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - report any broken step as a failed demo
        report.failures.append(f"step raised {type(exc).__name__}: {exc}")
        print(f"cellmigrate demo: error: a step failed unexpectedly: {type(exc).__name__}: {exc}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    report.say()
    if report.failures:
        report.say(f"Result: {len(report.failures)} step(s) did NOT behave as expected ({elapsed:.1f} s):")
        for failure in report.failures:
            report.say(f"  - {failure}")
        if quiet:
            print(f"cellmigrate demo: error: {len(report.failures)} step(s) did not behave as expected: "
                  f"{report.failures[0]}", file=sys.stderr)
        return 1
    report.say(f"Result: every step behaved as expected ({elapsed:.2f} s).")
    report.say("  The first migration moved only the changed pages and proved the copy identical;")
    if report.wasm_skipped:
        report.say("  the damaged one was refused without touching node B, and the rollback restored node A.")
        report.say("  (The live WebAssembly migration was skipped: pip install 'cellmigrate[wasm]', "
                   "or '.[wasm]' from a checkout.)")
    else:
        report.say("  the damaged one was refused without touching node B, and the rollback restored node A;")
        report.say("  the running WebAssembly agent moved live and finished exactly as if it had never moved.")
    return 0
