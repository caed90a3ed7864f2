"""A bounded ring of fixed-width int64 records in shared memory: one writing and one reading process.

The predictor worker (predictor_worker.py) exchanges a few small messages per layer with the runtime's
host thread, which at batch 1 bounds decoding. Through a pipe each costs the host about 45 us (pickling,
a system call on each side, and a thread to read the replies, which takes the GIL from the host); here a
message is a few numpy stores and a semaphore post, some 5-15 us with the Python around it (`python -m
benchmarks.predictor_cost --worker` measures the host's side).

Two counting semaphores make it the classic bounded buffer: `free` counts the slots the writer may
fill, `used` the records the reader may take. Their post and wait also order the memory accesses, so a
reader never sees a record before its contents, on any CPU (not only on x86's ordered stores). Each
side keeps its own position; a ring crosses to the other process once, through `Process(args=...)`,
which shares the tensor's memory instead of copying it.
"""

from __future__ import annotations

import numpy as np
import torch

from integrate.runtime.interrupts import deferred_interrupt


class Ring:
    def __init__(self, ctx, slots: int, width: int):
        if slots < 1 or width < 1:
            raise ValueError(f"a ring needs slots >= 1 and width >= 1, got {slots} x {width}")
        self.table = torch.zeros((slots, 1 + width), dtype=torch.int64).share_memory_()  # (length, record)
        self.free = ctx.Semaphore(slots)
        self.used = ctx.Semaphore(0)
        self._pos = 0  # the next slot this side writes (or reads)
        self._rows = self.table.numpy()

    def __getstate__(self) -> dict:
        return {"table": self.table, "free": self.free, "used": self.used}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _pos=0, _rows=state["table"].numpy())

    @property
    def width(self) -> int:
        """The most ints a record holds."""
        return self._rows.shape[1] - 1

    def put(self, header: tuple, payload: tuple = (), timeout: float | None = 0.0) -> bool:
        """Write one record: the header's ints, then each payload array flattened. False when no slot is
        free within `timeout` seconds (0: do not wait; None: wait as long as it takes)."""
        # every check and conversion before taking a slot, which a failure could not give back
        parts = [np.asarray(header, dtype=np.int64), *(np.asarray(a, dtype=np.int64).reshape(-1) for a in payload)]
        n = sum(part.size for part in parts)
        if n > self.width:
            raise ValueError(f"a ring record holds {self.width} ints; got {len(header)} + {[a.size for a in parts[1:]]}")
        with deferred_interrupt():  # a slot taken is always filled and handed on
            if not _take(self.free, timeout):
                return False
            row = self._rows[self._pos % len(self._rows)]
            row[0], at = n, 1  # the record's length first: a reader copies no more than that
            for part in parts:
                row[at : at + part.size] = part
                at += part.size
            self._pos += 1
            self.used.release()
        return True

    def get(self, timeout: float | None = 0.0) -> np.ndarray | None:
        """The next record (a copy), or None when none arrives within `timeout` seconds (as in `put`)."""
        if timeout == 0 and self.used.get_value() == 0:  # nothing to read: no need to hold a Ctrl-C back
            return None
        with deferred_interrupt():  # a record taken is always read and its slot given back
            if not _take(self.used, timeout):
                return None
            row = self._rows[self._pos % len(self._rows)]
            rec = row[1 : 1 + row[0]].copy()
            self._pos += 1
            self.free.release()
        return rec


def _take(sem, timeout: float | None) -> bool:
    return sem.acquire(False) if timeout == 0 else sem.acquire(True, timeout)
