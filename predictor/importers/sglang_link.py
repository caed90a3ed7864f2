"""Which sequence each piece of an SGLang forward pass belongs to.

A pass is cut into segments: one per request (`extend_seq_lens` tokens each in extend passes, one
token each in decode passes), in the batch's order. A segment whose first position is 0 starts a
sequence; any other continues the sequence it belongs to:

- with `rids` in the records (SGLang versions whose recorder stores `forward_batch.rids`), by request id;
- without them (the recorder in python/sglang/srt/eplb/expert_distribution.py leaves `rids` as a TODO),
  by position: the open sequence whose length equals the segment's first position. When several
  have that length, the choice is ambiguous and refused, unless `by_order`: then the batch's order
  decides, as SGLang keeps it (running requests first, in the order their prefill completed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from predictor.traces import TraceFormatError, TraceRecord


@dataclass
class _Seq:
    prompt_id: int
    ids: list = field(default_factory=list)
    experts: list = field(default_factory=list)
    length: int = 0
    num_prefill: int | None = None  # set at the first decode token
    order: tuple = (0, 0)  # (pass, index in it) of its last prefill segment: the batch order
    done: bool = False  # left the running batch: missing from a decode pass after it began generating


class Linker:
    def __init__(self, by_order: bool = False):
        self.by_order = by_order
        self.seqs: list[_Seq] = []
        self.by_rid: dict = {}

    def _find(self, rid, start: int, used: set, where: str) -> _Seq:
        if rid is not None:
            if rid not in self.by_rid:
                raise TraceFormatError(f"{where}: request {rid!r} starts at position {start}, not 0 (a prefix-cache "
                                       "hit, or recording started mid-request; launch SGLang with --disable-radix-cache)")
            seq = self.by_rid[rid]
            if seq.length != start:
                raise TraceFormatError(f"{where}: request {rid!r} continues at position {start}, its length is {seq.length}")
            return seq
        found = [s for s in self.seqs if s.length == start and not s.done and id(s) not in used]
        if not found:
            raise TraceFormatError(f"{where}: no open sequence of length {start} to continue (a prefix-cache hit, or "
                                   "recording started mid-request; launch SGLang with --disable-radix-cache)")
        if len(found) > 1 and not self.by_order:
            raise TraceFormatError(f"{where}: {len(found)} sequences have length {start} and the records carry no "
                                   "request ids: which one continues is ambiguous. Record one request at a time, "
                                   "or pass --link-by-order to follow SGLang's batch order")
        return min(found, key=lambda s: s.order)

    def add_pass(self, pass_no: int, rids, lens: list[int], positions: np.ndarray, ids: np.ndarray,
                 experts: np.ndarray, decode: np.ndarray, where: str, full_batch: bool = False) -> None:
        """One forward pass: segments of `lens` tokens (per request, batch order); `decode` (segments,)
        marks segments of generated tokens; experts (tokens, L, k). `full_batch`: a decode pass, which
        holds every running request, so a generating sequence missing from it has finished."""
        used: set = set()
        cut = np.cumsum([0, *lens])
        for j, (a, b) in enumerate(zip(cut[:-1], cut[1:])):
            here = f"{where}, request {j} of the batch"
            pos = positions[a:b]
            if not np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))):
                raise TraceFormatError(f"{here}: positions {pos.tolist()} are not consecutive")
            rid = None if rids is None else rids[j]
            if pos[0] == 0 and not decode[j]:
                seq = _Seq(prompt_id=len(self.seqs))
                self.seqs.append(seq)
                if rid is not None:
                    self.by_rid[rid] = seq  # a reused request id starts a new sequence
            else:
                seq = self._find(rid, int(pos[0]), used, here)
            used.add(id(seq))
            if decode[j] and seq.num_prefill is None:
                seq.num_prefill = seq.length
            elif not decode[j]:
                if seq.num_prefill is not None:
                    raise TraceFormatError(f"{here}: prefill tokens after generated ones (a retracted request "
                                           "prefilled again?)")
                seq.order = (pass_no, j)
            seq.ids.append(ids[a:b])
            seq.experts.append(experts[a:b])
            seq.length += b - a
        if full_batch:
            for seq in self.seqs:
                seq.done = seq.done or (seq.num_prefill is not None and id(seq) not in used)

    def records(self) -> list[TraceRecord]:
        out = []
        for s in self.seqs:
            ids = np.concatenate(s.ids)
            out.append(TraceRecord(s.prompt_id, ids, np.concatenate(s.experts),
                                   len(ids) if s.num_prefill is None else s.num_prefill))
        return out
