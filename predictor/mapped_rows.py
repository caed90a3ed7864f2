"""Single trace rows straight from the memory-mapped Arrow table, for the training loader (data.py).

`MappedRows(ts).read(row)` -> (token_ids (T,) int32, experts (T, L, k) as stored, prompt_id): one Arrow
slice of the table, without the HF formatting a `dataset[row]` goes through (which reads more).

Pages of a mapped file that reads touch count as the process's resident memory. With large page-cache
folios (recent Linux kernels; 8 MB readahead here) one row read maps about 1.4 MB, so over an epoch RSS
climbs towards the size of the whole trace set (5.4 GB for 2 x 10^7 DeepSeek-V2-Lite tokens). Those are
clean file pages the kernel may drop at any time, but they count against RSS limits; so every
`release_every` reads the mapped ranges of the set's Arrow files are unmapped with
madvise(MADV_DONTNEED) (Linux; elsewhere a no-op). The data stay valid: the next read faults its pages
back in from the page cache.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

from .traces import TraceSet

MADV_DONTNEED = 4


class MappedRows:
    def __init__(self, ts: TraceSet, release_every: int = 64):
        self.ts, self.release_every, self._reads = ts, release_every, 0
        self._table = ts.dataset.data if ts.dataset._indices is None else None  # rows of a view: HF reads
        self._files = {os.path.realpath(entry["filename"]) for entry in ts.dataset.cache_files}
        self._L, self._k = ts.meta.num_moe_layers, ts.meta.top_k
        self._last = (-1, None)  # the last row read, and its slice

    def read_gate(self, row: int) -> np.ndarray:
        """The `gate_ahead` picks (T, L, B) of table row `row` (traces recorded with them), read after
        `read(row)`: its slice of the table is reused."""
        if self._table is None:
            return self.ts.dataset[row]["gate_ahead"]
        t = self._last[1] if self._last[0] == row else self._table.fast_slice(row, 1)
        g = t.column("gate_ahead").combine_chunks().storage.flatten().flatten().flatten()
        return g.to_numpy().reshape(-1, self._L, self.ts.meta.gate_ahead)

    def read(self, row: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(token ids (T,), experts (T, L, k), prompt id) of table row `row`."""
        self._reads += 1
        if self.release_every and self._reads % self.release_every == 0:
            release_mapped(self._files)
        if self._table is None:
            rec = self.ts.dataset[row]
            return rec["token_ids"], rec["experts"], int(rec["prompt_id"])
        t = self._table.fast_slice(row, 1)
        self._last = (row, t)
        tokens = t.column("token_ids").combine_chunks().flatten().to_numpy()
        ex = t.column("experts").combine_chunks().storage.flatten().flatten().flatten().to_numpy()
        return tokens, ex.reshape(len(tokens), self._L, self._k), int(t.column("prompt_id")[0].as_py())

    def __getstate__(self):  # DataLoader workers get their own mapping of the files
        return {**self.__dict__, "_table": None, "_last": (-1, None), "_reopen": self._table is not None}

    def __setstate__(self, state):
        reopen = state.pop("_reopen")
        self.__dict__.update(state)
        self._table = self.ts.dataset.data if reopen else None


def release_mapped(files: set[str]) -> int:
    """Unmap (MADV_DONTNEED) this process's resident pages of read-only mappings of `files`; -> bytes advised."""
    if sys.platform != "linux" or not files:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        done = 0
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") in files and "w" not in parts[1]:
                    start, stop = (int(x, 16) for x in parts[0].split("-"))
                    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), MADV_DONTNEED) == 0:
                        done += stop - start
        return done
    except OSError:  # no /proc, no libc: the pages stay until the kernel drops them
        return 0
