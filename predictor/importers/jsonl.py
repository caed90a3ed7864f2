"""The generic trace format as JSON Lines: the format to convert any other source into.

One JSON object per line (blank lines are skipped; other keys are ignored):

    {"prompt_id": 0, "token_ids": [1, 15043, 29892], "experts": [[[3, 7], [0, 5]], ...], "num_prefill": 3}

    prompt_id    int                   the prompt the row came from (splits are by prompt)
    token_ids    [T] ints              ids of the tokenizer named by --tokenizer
    experts      [T][L][k] ints        routed expert ids per token and MoE layer (MoE layers only, in order)
    num_prefill  int                   tokens [0, num_prefill) are prefill, the rest generated (decode)

    python -m predictor.importers jsonl rows.jsonl OUT --tokenizer NAME --num-experts E [--moe-layers 1-26]
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from predictor.importers.common import Model, checked, generic_meta, parse_row
from predictor.traces import TraceFormatError, TraceMeta, TraceRecord


def _rows(path: Path) -> Iterator[tuple[int, TraceRecord]]:
    """(line number, record) of every non-blank line, each parsed and shape-checked."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}: line {n}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TraceFormatError(f"{where}: not UTF-8 ({e})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceFormatError(f"{where}: not valid JSON ({e})") from None
            yield n, parse_row(row, where)


def read_jsonl(path: str | Path, model: Model, limit: int | None = None) -> tuple[TraceMeta, Iterator[TraceRecord]]:
    """(meta, records) of a generic-format JSONL file; rows are read lazily and each is checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSONL file at {path}")
    first = next(_rows(path), None)
    if first is None:
        raise TraceFormatError(f"{path}: no rows")
    meta = generic_meta(model, first[1], str(path), "jsonl")

    def records() -> Iterator[TraceRecord]:
        for i, (n, rec) in enumerate(_rows(path)):
            if limit is not None and i >= limit:
                return
            yield checked(rec, meta, f"{path}: line {n} (prompt_id={rec.prompt_id})")

    return meta, records()
