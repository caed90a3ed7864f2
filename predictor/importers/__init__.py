"""Trace importers: routing recorded by serving engines, or by anything else, into the trace format.

    python -m predictor.importers vllm    routed.jsonl        OUT --tokenizer NAME   (tools/vllm_client.py)
    python -m predictor.importers sglang  DUMP.pt|DIR [...]   OUT --tokenizer NAME   (per_token recorder)
    python -m predictor.importers jsonl   rows.jsonl          OUT --tokenizer NAME --num-experts E
    python -m predictor.importers parquet rows.parquet        OUT --tokenizer NAME --num-experts E

JSONL / Parquet rows of {prompt_id, token_ids, experts[T][L][k], num_prefill} (jsonl.py) are the format
to convert any other source into. Every importer records `--tokenizer` as the trace set's token space
(`tokenizer:<name>`, predictor/token_space.py), as collect.py does for the tokenizer it ran: traces of
one model from an engine and from collect.py share ids when both name the tokenizer alike. Rows are
checked as the trace format checks them (expert ids in range, k distinct ids, lengths, ...); errors
name the file and the line, row or record. Writes go through predictor.traces.write_traces (atomic).
"""

from __future__ import annotations

from pathlib import Path

from predictor.importers.common import Model, parse_layers  # noqa: F401  (the API)
from predictor.traces import TraceSet, check_target, write_traces

FORMATS = ("vllm", "sglang", "jsonl", "parquet")


def read(fmt: str, inputs: list[str | Path], model: Model, limit: int | None = None, **options):
    """(meta, records) of `inputs` in format `fmt` (one file, except sglang: files or directories)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose from {FORMATS}")
    if fmt != "sglang" and len(inputs) != 1:
        raise ValueError(f"{fmt}: give one input file, got {len(inputs)}")
    if fmt == "vllm":
        from predictor.importers.vllm import read_vllm

        return read_vllm(inputs[0], model, limit)
    if fmt == "sglang":
        from predictor.importers.sglang import read_sglang

        return read_sglang(inputs, model, limit, **options)
    if fmt == "jsonl":
        from predictor.importers.jsonl import read_jsonl

        return read_jsonl(inputs[0], model, limit)
    from predictor.importers.parquet import read_parquet

    return read_parquet(inputs[0], model, limit)


def import_traces(fmt: str, inputs: list[str | Path], out: str | Path, model: Model, *, overwrite: bool = False,
                  limit: int | None = None, **options) -> TraceSet:
    """Read `inputs` and write the trace set `out` (refused before reading when `out` may not be written)."""
    check_target(out, overwrite, "--overwrite (overwrite=True from Python)")
    meta, records = read(fmt, inputs, model, limit, **options)
    if limit is not None:
        meta.recording["limit"] = limit
    return write_traces(out, meta, records, overwrite=overwrite, source=", ".join(map(str, inputs)))
