"""Trace rows a bounded chunk at a time: the streaming counterpart of `baselines.stack_rows`.

Statistics, baseline fits and the simulator's train-split counts read a trace set in chunks of whole
rows (at most `max_tokens` tokens each; a longer row comes alone), so their memory follows the chunk,
not the trace set: 10^8 tokens of DeepSeek-V2-Lite (26 x 6 experts) stacked as int64 take 125 GB, a
chunk of 2^16 tokens 10 MB (expert ids keep their stored dtype, uint8 or int16; 82 MB where counting
widens them to int64). Counts summed over chunks equal counts over the stacked rows exactly.

Passes over every row read the Arrow files with plain reads (`file_batches`), not through the memory
map the dataset holds: pages of a mapped file count as the process's resident memory once touched, so
a pass through the map would leave the whole trace set resident (5.4 GB for 2 x 10^7 tokens; the kernel
can drop them, but RSS and `ru_maxrss` show them). Read this way, a pass holds one record batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .traces import TraceRecord, TraceSet

DEFAULT_CHUNK_TOKENS = 1 << 16


@dataclass
class RowChunk:
    tokens: np.ndarray  # (n,) int64 token ids of the chunk's rows, concatenated
    experts: np.ndarray  # (n, L, k) expert ids: int64 from records, the stored uint8 / int16 from a TraceSet
    lengths: np.ndarray  # (r,) int64 tokens per row (a statistic must not cross a row boundary)


def arrow_arrays(table, num_layers: int, top_k: int, expert_dtype=np.int64) -> RowChunk:
    """An Arrow table of trace rows -> its arrays, in one pass over the buffers (no per-row conversion);
    expert ids as `expert_dtype` (None: as stored)."""
    tok = table.column("token_ids").combine_chunks()
    ex = table.column("experts").combine_chunks().storage  # Array3D: an extension type over list<list<list>>
    experts = ex.flatten().flatten().flatten().to_numpy()
    experts = (experts if expert_dtype is None else experts.astype(expert_dtype)).reshape(-1, num_layers, top_k)
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


def file_batches(dataset, columns: list[str] | None = None) -> Iterator | None:
    """Record batches of the whole table of an HF `dataset` loaded from Arrow files (a `select` is not
    applied), read from the files with plain reads; None when the table is not just its files (columns
    added or removed in memory): then read it through `dataset.data`."""
    import pyarrow as pa
    from datasets.table import ConcatenationTable, MemoryMappedTable

    table = dataset.data
    blocks = [[table]] if isinstance(table, MemoryMappedTable) else getattr(table, "blocks", None)
    if not isinstance(table, (MemoryMappedTable, ConcatenationTable)) or not blocks:
        return None
    def plain(block) -> bool:  # the file's columns as they are (a new schema metadata changes no value)
        return isinstance(block, MemoryMappedTable) and all(op[0] == "replace_schema_metadata" for op in block.replays)

    if any(len(row) != 1 or not plain(row[0]) for row in blocks):
        return None
    names = table.column_names if columns is None else columns

    def batches():
        for (block,) in blocks:
            with pa.OSFile(block.path) as f:
                for batch in pa.ipc.open_stream(f):
                    yield batch.select(names)

    return batches()


def _selected_tables(data: TraceSet, max_tokens: int) -> Iterator:
    """Arrow tables of the view's rows, at most `max_tokens` tokens each (a longer row alone), in order."""
    import pyarrow as pa

    indices = data.dataset._indices  # view row -> table row, set by select()
    rows = None if indices is None else indices.column(0).to_numpy().astype(np.int64)  # uint64 in the mapping
    batches = file_batches(data.dataset, ["token_ids", "experts"])
    if batches is None or (rows is not None and len(rows) > 1 and not (np.diff(rows) > 0).all()):
        table = data.dataset.with_format("arrow")  # through the map: in-memory columns, or rows out of order
        for start, stop in chunk_bounds(data.lengths, max_tokens):
            yield table[start:stop]  # `[a:b]` applies a select()
        return
    parts, tokens, first = [], 0, 0  # first: table row of the batch's first row
    for batch in batches:
        if rows is not None:
            lo, hi = np.searchsorted(rows, [first, first + batch.num_rows])
            first += batch.num_rows
            if lo == hi:
                continue
            batch = batch.take(pa.array(rows[lo:hi] - (first - batch.num_rows)))
        lengths = np.diff(batch.column("token_ids").offsets.to_numpy())
        for start, stop in chunk_bounds(lengths, max_tokens):
            n = int(lengths[start:stop].sum())
            if parts and tokens + n > max_tokens:
                yield pa.Table.from_batches(parts)
                parts, tokens = [], 0
            parts.append(batch.slice(start, stop - start))
            tokens += n
    if parts:
        yield pa.Table.from_batches(parts)


def row_chunks(data: TraceSet | Iterable[TraceRecord], max_tokens: int = DEFAULT_CHUNK_TOKENS) -> Iterator[RowChunk]:
    """The rows of `data` (a TraceSet, `select`ed or not, or TraceRecords), in order, a chunk at a time."""
    if isinstance(data, TraceSet):
        L, k = data.meta.num_moe_layers, data.meta.top_k
        for table in _selected_tables(data, max_tokens):
            yield arrow_arrays(table, L, k, expert_dtype=None)
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
