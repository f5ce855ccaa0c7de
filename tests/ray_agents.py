"""Agents for the Ray tests and bench (imported by the Ray workers too, by module name).

:class:`Writer` is an agent whose every write is a pure function of its step counter, so
a test can replay the steps on the initial state and demand that the migrated agent's
memory is exactly that: nothing lost, nothing written twice, nothing invented.
Step ``k`` writes the 8 bytes of ``k + 1`` at :func:`step_offset` ``(k, size)``.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import ray

from cellmigrate.live.pages import Chunk
from cellmigrate.ray import MigratableActor, RayChannel


def step_offset(k: int, size: int) -> int:
    """Where step ``k`` writes (8-byte aligned, scattered over the whole state)."""
    return (k * 2654435761 % (size // 8)) * 8


def initial_state(size: int, seed: int) -> np.ndarray:
    """The agent's memory before any step: random bytes with a run of zero pages."""
    state = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    state[size // 4 : size // 2] = 0  # round 0 sends no zero page
    return state


def replay(size: int, seed: int, steps: int) -> np.ndarray:
    """The state after ``steps`` steps, computed here without any agent."""
    state = initial_state(size, seed)
    words = state.view(np.uint64)
    for k in range(steps):
        words[step_offset(k, size) // 8] = k + 1
    return state


class _WriterBase(MigratableActor):
    """The agent: a state, a step counter, and a thread that takes steps while running."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.state = initial_state(size, seed)
        self.steps = 0
        self._running = False
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # the agent's own work -----------------------------------------------------------

    def _loop(self, rate: float) -> None:
        period = 1.0 / rate
        while not self._stop.is_set():
            with self.cellmigrate_writing():
                if self._stop.is_set():
                    break
                k = self.steps
                self.state.view(np.uint64)[step_offset(k, self.state.nbytes) // 8] = k + 1
                self.steps = k + 1
            time.sleep(period)

    def run(self, rate: float = 2000.0) -> None:
        """Start taking ``rate`` steps a second in a thread."""
        self._running = True
        self._rate = rate
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(rate,), daemon=True)
        self._thread.start()

    def stop(self) -> Tuple[int, bytes]:
        """Stop the thread; the step count and the state's bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._running = False
        return self.steps, self.state.tobytes()

    def step_count(self) -> int:
        return self.steps

    def node(self) -> str:
        return str(ray.get_runtime_context().get_node_id())

    # the protocol ---------------------------------------------------------------------

    def cellmigrate_state(self) -> np.ndarray:
        return self.state

    def cellmigrate_extra(self) -> bytes:
        rate = getattr(self, "_rate", 0.0) if self._running else 0.0
        return np.array([self.steps], dtype=np.uint64).tobytes() + np.array([rate], dtype=np.float64).tobytes()

    def cellmigrate_adopt(self, state: np.ndarray, extra: bytes) -> None:
        self.state = state
        self.steps = int(np.frombuffer(extra[:8], dtype=np.uint64)[0])
        rate = float(np.frombuffer(extra[8:16], dtype=np.float64)[0])
        if rate:
            self.run(rate)  # its first write waits for cellmigrate_resume


@ray.remote(num_cpus=0, max_concurrency=4)
class Writer(_WriterBase):
    """A plain migratable agent."""


class SlowChannel(RayChannel):
    """A channel that waits ``delay`` seconds before each chunk (a slow link)."""

    delay = 0.15

    def send_chunk(self, chunk: Chunk) -> None:
        time.sleep(self.delay)
        super().send_chunk(chunk)


@ray.remote(num_cpus=0, max_concurrency=4)
class SlowWriter(_WriterBase):
    """An agent whose migrations crawl, so that a test can act in the middle of one."""

    def cellmigrate_channel(self, target: Any, **settings: Any) -> RayChannel:
        return SlowChannel(target, **settings)


class CorruptingChannel(RayChannel):
    """Damages one chunk *in the object store*, after ``ray.put`` and before the target reads it.

    The object's bytes in the source node's shared-memory store are flipped in place
    (``ray.get`` of a numpy array is a view of that memory), so the target pulls the
    damaged pages exactly as Ray stores them.
    """

    corrupt_seq = 1
    corrupted: Dict[str, int] = {}

    def put(self, chunk: Chunk) -> Any:
        ref = super().put(chunk)
        if chunk.seq == self.corrupt_seq:
            stored = ray.get(ref)
            where = len(stored) // 2
            flipped = bytes([int(stored[where]) ^ 0x5A])
            ctypes.memmove(stored.ctypes.data + where, flipped, 1)
            CorruptingChannel.corrupted = {"seq": chunk.seq, "offset": where, "now": int(ray.get(ref)[where])}
        return ref


@ray.remote(num_cpus=0, max_concurrency=4)
class CorruptedWriter(_WriterBase):
    """An agent whose migration's first chunk is damaged in the object store."""

    def cellmigrate_channel(self, target: Any, **settings: Any) -> RayChannel:
        return CorruptingChannel(target, **settings)

    def corruption(self) -> Dict[str, int]:
        return dict(CorruptingChannel.corrupted)


@ray.remote(num_cpus=0, max_concurrency=4)
class RefusingWriter(_WriterBase):
    """An agent whose new actor cannot take the migrated state."""

    def cellmigrate_adopt(self, state: np.ndarray, extra: bytes) -> None:
        raise ValueError("nope")
