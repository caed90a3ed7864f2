"""The generic trace format as Parquet: one row per sequence with the columns of the JSONL form
(predictor/importers/jsonl.py): prompt_id (int), token_ids (list<int>), experts (list<list<list<int>>>,
[T][L][k]) and num_prefill (int). Other columns are ignored. Read a row group at a time.

    python -m predictor.importers parquet rows.parquet OUT --tokenizer NAME --num-experts E [--moe-layers 1-26]
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from predictor.importers.common import FIELDS, Model, parse_row, read_generic
from predictor.traces import TraceFormatError, TraceMeta, TraceRecord


def _open(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise TraceFormatError(f"{path}: not a readable Parquet file ({e})") from None
    missing = [c for c in FIELDS if c not in pf.schema_arrow.names]
    if missing:
        raise TraceFormatError(f"{path}: missing columns {missing}; it has {pf.schema_arrow.names}")
    return pf


def _rows(path: Path) -> Iterator[tuple[int, TraceRecord]]:
    """(row number, record) of every row, one record batch at a time."""
    import pyarrow as pa

    pf, n = _open(path), 0
    try:
        for batch in pf.iter_batches(batch_size=256, columns=list(FIELDS)):
            for row in batch.to_pylist():
                yield n, parse_row(row, f"{path}: row {n}")
                n += 1
    except pa.ArrowException as e:
        raise TraceFormatError(f"{path}: unreadable after row {n} ({e})") from None


def read_parquet(path: str | Path, model: Model, limit: int | None = None) -> tuple[TraceMeta, Iterator[TraceRecord]]:
    """(meta, records) of a generic-format Parquet file; rows are read lazily and each is checked."""
    return read_generic(path, model, limit, _rows, "Parquet", "row")
