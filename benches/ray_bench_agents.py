"""The agent of the Ray drain benchmark (imported by the Ray workers by module name).

A :class:`Dirtier` holds ``size`` bytes of random state and, while running, rewrites 8
bytes in each of ``fraction`` of its pages (chosen at random) every ``period`` seconds.
It serves both ways of moving it: cellmigrate's protocol (:class:`MigratableActor`), and
the naive one a Ray user writes today (``get_state`` pauses it and returns the whole
array; ``set_state`` + ``resume`` on the new actor).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import ray
import xxhash

from cellmigrate.ray import MigratableActor

PAGE = 4096


class _Dirtier(MigratableActor):
    def __init__(self, size: int) -> None:
        self.state = np.zeros(size, dtype=np.uint8)  # calloc: a new actor costs nothing yet
        self._stop = threading.Event()
        self._thread: "threading.Thread | None" = None

    def fill(self, seed: int) -> None:
        """Random bytes everywhere (incompressible: the worst case for page deltas)."""
        rng = np.random.default_rng(seed)
        self.state[:] = rng.integers(0, 256, self.state.nbytes, dtype=np.uint8)

    def run(self, fraction: float, period: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        pages = self.state.nbytes // PAGE
        count = max(1, int(pages * fraction))

        def loop() -> None:
            while not self._stop.is_set():
                with self.cellmigrate_writing():
                    words = self.state.view(np.uint64)
                    idx = rng.choice(pages, count, replace=False) * (PAGE // 8)
                    words[idx] += np.uint64(1)
                time.sleep(period)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def digest(self) -> bytes:
        return xxhash.xxh3_128_digest(self.state)

    # cellmigrate's protocol
    def cellmigrate_state(self) -> np.ndarray:
        return self.state

    def cellmigrate_adopt(self, state: np.ndarray, extra: bytes) -> None:
        self.state = state

    # the naive way
    def get_state(self) -> np.ndarray:
        self.cellmigrate_pause()
        return self.state

    def set_state(self, state: np.ndarray) -> None:
        self.state = np.array(state)  # the object store's copy is read-only

    def resume(self) -> None:
        self.cellmigrate_resume()


@ray.remote(num_cpus=0, max_concurrency=4)
class Dirtier(_Dirtier):
    pass
