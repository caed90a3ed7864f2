"""Trace rows in decode order: the expert accesses the simulator replays.

Sequences run one after another (one request at a time, the cache stays warm between them);
inside a sequence, token by token, and inside a token, MoE layer by MoE layer. Every token is
replayed as a decode step: routing of token t depends only on tokens <= t, so a teacher-forced
prefill trace routes exactly like decoding the same text. An access is one (layer, expert);
a row is one (token, layer) and holds its k accesses. Cache keys are `layer * E + expert`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from predictor.traces import TraceRecord


@dataclass
class Accesses:
    num_layers: int
    num_experts: int
    top_k: int
    keys: np.ndarray  # (R, k) int32, R = tokens * L rows in decode order; key = layer * E + expert
    seq_tokens: np.ndarray  # (S,) tokens per sequence, in replay order

    @property
    def num_tokens(self) -> int:
        return int(self.seq_tokens.sum())

    @property
    def num_accesses(self) -> int:
        return int(self.keys.size)

    def sequences(self) -> Iterable[np.ndarray]:
        """(T * L, k) key rows of each sequence."""
        start = 0
        for T in self.seq_tokens.tolist():
            stop = start + T * self.num_layers
            yield self.keys[start:stop]
            start = stop

    def next_uses(self) -> tuple[np.ndarray, int]:
        """((R, k) int64, base): the next row that accesses the same key and the row after that, packed
        as next * base + next_after (R + 1 for none; base = R + 2), so that one integer comparison
        orders keys by next use, ties by the use after it (Belady's ranking). With k > 1 a row holds
        several keys, so two can next be used in the same row: one then hits there and the other
        misses, and the one to keep is the one needed again sooner after it."""
        R = len(self.keys)
        flat = self.keys.ravel().astype(np.int64)
        rows = np.repeat(np.arange(R, dtype=np.int64), self.top_k)
        order = np.argsort(flat * (R + 1) + rows, kind="stable")  # by key, then by row
        nxt = np.full(flat.shape, R + 1, dtype=np.int64)
        after = np.full(flat.shape, R + 1, dtype=np.int64)
        same = flat[order[1:]] == flat[order[:-1]]
        nxt[order[:-1][same]] = rows[order[1:][same]]
        same2 = same[1:] & same[:-1]  # the same key two accesses on
        after[order[:-2][same2]] = rows[order[2:][same2]]
        base = R + 2
        return (nxt * base + after).reshape(R, self.top_k), base

    def layer_frequency(self) -> np.ndarray:
        """(L, E) access counts."""
        L, E = self.num_layers, self.num_experts
        return np.bincount(self.keys.ravel(), minlength=L * E).reshape(L, E)


def chunk_accesses(experts: np.ndarray, lengths: np.ndarray, num_experts: int) -> Accesses:
    """The replay of rows already concatenated (predictor/chunks.py's RowChunk): experts (N, L, k), lengths (S,)."""
    N, L, k = experts.shape
    offsets = (np.arange(L, dtype=np.int32) * num_experts)[None, :, None]
    keys = (experts.astype(np.int32) + offsets).reshape(-1, k)
    return Accesses(L, num_experts, k, keys, np.asarray(lengths, dtype=np.int64))


def build_accesses(records: Iterable[TraceRecord], num_layers: int, num_experts: int, top_k: int) -> Accesses:
    keys, lengths = [], []
    offsets = (np.arange(num_layers, dtype=np.int32) * num_experts)[None, :, None]
    for rec in records:
        ex = np.asarray(rec.experts)
        if ex.ndim != 3 or ex.shape[1:] != (num_layers, top_k):
            raise ValueError(
                f"prompt {rec.prompt_id}: experts shape {ex.shape}, expected (T, {num_layers}, {top_k})"
            )
        if ex.size and (ex.min() < 0 or ex.max() >= num_experts):
            raise ValueError(
                f"prompt {rec.prompt_id}: expert ids outside [0, {num_experts}) (padding is not replayable)"
            )
        keys.append((ex.astype(np.int32) + offsets).reshape(-1, top_k))
        lengths.append(len(ex))
    if not keys:
        raise ValueError("no sequences to replay")
    return Accesses(num_layers, num_experts, top_k, np.concatenate(keys), np.asarray(lengths, dtype=np.int64))
