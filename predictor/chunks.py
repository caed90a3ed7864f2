"""Trace rows a bounded chunk at a time: the streaming counterpart of `baselines.stack_rows`.

Statistics, baseline fits and the simulator's train-split counts read a trace set in chunks of whole
rows (at most `max_tokens` tokens each; a longer row comes alone), so their memory follows the chunk,
not the trace set: 10^8 tokens of DeepSeek-V2-Lite (26 x 6 experts) stacked as int64 take 125 GB, a
chunk of 2^17 tokens 164 MB. Counts summed over chunks equal counts over the stacked rows exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .traces import TraceRecord, TraceSet

DEFAULT_CHUNK_TOKENS = 1 << 17


@dataclass
class RowChunk:
    tokens: np.ndarray  # (n,) int64 token ids of the chunk's rows, concatenated
    experts: np.ndarray  # (n, L, k) int64
    lengths: np.ndarray  # (r,) int64 tokens per row (a statistic must not cross a row boundary)


def arrow_arrays(table, num_layers: int, top_k: int) -> RowChunk:
    """An Arrow table of trace rows -> its arrays, in one pass over the buffers (no per-row conversion)."""
    tok = table.column("token_ids").combine_chunks()
    ex = table.column("experts").combine_chunks().storage  # Array3D: an extension type over list<list<list>>
    experts = ex.flatten().flatten().flatten().to_numpy().astype(np.int64).reshape(-1, num_layers, top_k)
    tokens = tok.flatten().to_numpy().astype(np.int64)
    return RowChunk(tokens, experts, tok.value_lengths().to_numpy().astype(np.int64))


def chunk_bounds(lengths: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `max_tokens` tokens each (a longer row alone), in row order."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    bounds, start, total = [], 0, 0
    for i, n in enumerate(np.asarray(lengths).tolist()):
        if i > start and total + n > max_tokens:
            bounds.append((start, i))
            start, total = i, 0
        total += n
    if len(lengths):
        bounds.append((start, len(lengths)))
    return bounds


def row_chunks(data: TraceSet | Iterable[TraceRecord], max_tokens: int = DEFAULT_CHUNK_TOKENS) -> Iterator[RowChunk]:
    """The rows of `data` (a TraceSet, `select`ed or not, or TraceRecords), in order, a chunk at a time."""
    if isinstance(data, TraceSet):
        table = data.dataset.with_format("arrow")
        L, k = data.meta.num_moe_layers, data.meta.top_k
        for start, stop in chunk_bounds(data.lengths, max_tokens):
            yield arrow_arrays(table[start:stop], L, k)  # `[a:b]` applies a select()
        return
    tokens, experts, total = [], [], 0
    for rec in data:
        if tokens and total + rec.num_tokens > max_tokens:
            yield _joined(tokens, experts)
            tokens, experts, total = [], [], 0
        tokens.append(np.asarray(rec.token_ids, dtype=np.int64))
        experts.append(np.asarray(rec.experts, dtype=np.int64))
        total += rec.num_tokens
    if tokens:
        yield _joined(tokens, experts)


def _joined(tokens: list[np.ndarray], experts: list[np.ndarray]) -> RowChunk:
    return RowChunk(np.concatenate(tokens), np.concatenate(experts), np.array([len(t) for t in tokens], dtype=np.int64))
