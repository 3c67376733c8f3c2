"""Unique ids for leases, requests and audit rows without a random syscall per request.

An id is 64 random bits drawn once per process (again in a forked child) followed by a 64-bit
counter that starts at a random point: unique within a process by construction, and across
replicas and restarts as long as two processes never draw the same 64 bits (about 1 in 10^19 for
a pair). 32 lowercase hex digits, the shape `uuid4().hex` had, so they also parse as UUIDs.
"""

from __future__ import annotations

import itertools
import os

_MASK = (1 << 64) - 1


class _IdSource:
    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        raw = int.from_bytes(os.urandom(16), "big")
        self.prefix = f"{raw >> 64:016x}"
        self.counter = itertools.count(raw & _MASK)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter) & _MASK:016x}"


_source = _IdSource()
# A forked worker must not repeat its parent's sequence.
os.register_at_fork(after_in_child=_source.reseed)


def new_id() -> str:
    """A fresh id, 32 hex digits."""
    return _source.next()
