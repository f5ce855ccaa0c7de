"""Locks and thread pools that survive ``fork()``.

``fork()`` copies a process with only the calling thread. A lock another thread held at
that moment is copied held, by a thread the child does not have: the child's first call
that takes it stops for ever. So each object whose methods run under a lock registers it
here (:func:`guard`); around ``fork()`` every registered lock is taken, so no method is
half-way through in the child, and released again in both processes. This is what
``pthread_atfork`` does for the compiled kernels' arena pool, and what the standard
library's ``logging`` does for its handlers' locks.

A lock that cannot be taken within :data:`WAIT_SECONDS` (held across the fork by the
forking thread itself, say, from a progress callback) is not waited for: the child gets
it fresh and unlocked (``_at_fork_reinit``), so it never hangs; the object may then be as
that method left it.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Dict, List, Tuple

__all__ = ["WAIT_SECONDS", "guard"]

#: The longest ``fork()`` waits for one registered lock.
WAIT_SECONDS = 10.0

# id(owner) -> (a weak reference to it, the names of its lock attributes). Keyed by id,
# not by the owner: guarded objects need not be hashable (dataclasses with eq). The weak
# reference's callback drops the entry when the owner dies, before its id can be reused.
# No lock of its own: each store, pop and copy of the dict is one step under the GIL (a
# lock here could be wanted again by a garbage collection inside guard()).
_owners: Dict[int, Tuple["weakref.ref[Any]", Tuple[str, ...]]] = {}
_held: List[Any] = []  # the locks taken before this fork, released after it
_missed: List[Any] = []  # the locks that could not be taken: made anew in the child


def guard(owner: Any, *names: str) -> None:
    """Have ``owner``'s lock attributes ``names`` (``threading.Lock``/``RLock``) taken
    around every ``fork()`` from now on (see the module's notes)."""
    key = id(owner)

    def forget(_: "weakref.ref[Any]") -> None:
        _owners.pop(key, None)

    _owners[key] = (weakref.ref(owner, forget), tuple(names))


def _locks() -> List[Any]:
    locks: List[Any] = []
    for ref, names in list(_owners.values()):
        owner = ref()
        if owner is not None:
            locks.extend(getattr(owner, name) for name in names)
    return locks


def _before_fork() -> None:
    _held.clear()
    _missed.clear()
    for lock in _locks():
        (_held if lock.acquire(timeout=WAIT_SECONDS) else _missed).append(lock)


def _after_fork_in_parent() -> None:
    for lock in reversed(_held):
        lock.release()
    _held.clear()
    _missed.clear()


def _after_fork_in_child() -> None:
    for lock in reversed(_held):
        lock.release()  # the child's only thread is the one that took them
    for lock in _missed:
        lock._at_fork_reinit()  # CPython 3.9+: the lock made anew, unlocked
    _held.clear()
    _missed.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
