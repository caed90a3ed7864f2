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

from collections.abc import Iterator
from pathlib import Path

from predictor.importers.common import Model, json_lines, parse_row, read_generic
from predictor.traces import TraceMeta, TraceRecord


def _rows(path: Path) -> Iterator[tuple[int, TraceRecord]]:
    """(line number, record) of every non-blank line, each parsed and shape-checked."""
    for n, row in json_lines(path):
        yield n, parse_row(row, f"{path}: line {n}")


def read_jsonl(path: str | Path, model: Model, limit: int | None = None) -> tuple[TraceMeta, Iterator[TraceRecord]]:
    """(meta, records) of a generic-format JSONL file; rows are read lazily and each is checked."""
    return read_generic(path, model, limit, _rows, "JSONL", "line")
