"""Import what `tools/vllm_client.py` saves from vLLM's routed-expert capture.

vLLM (started with `--enable-return-routed-experts`, or `LLM(enable_return_routed_experts=True)`)
returns per completion an int array `routed_experts` [tokens, layers, top_k]. What its code does,
where it differs from the description "[tokens, num_moe_layers, top_k] for the prompt and the
generated tokens" (read in vllm-project/vllm):
  - tokens: prompt + generated - 1. vllm/v1/core/sched/scheduler.py `_get_routed_experts` reads
    `request.num_tokens - 1` KV slots: the last sampled token never ran through the model. The rows
    therefore align with the prompt and the generated tokens but the last (collect.py routes that one
    too, with an extra decode step; it stops before end-of-sequence, which vLLM's rows never reach).
  - layers: `hf_config.num_hidden_layers`, not the MoE layers: vllm/model_executor/layers/fused_moe/
    routed_experts_capturer.py sizes its buffer (tokens, num_hidden_layers, num_experts_per_tok) and
    each FusedMoE layer writes the row of its decoder-layer index; rows of dense layers stay 0 (the
    buffer is zeroed before every step). Dense layers are found and dropped (common.choose_layers).
  - the server's /v1/completions choice carries it as base64 of `.npy` bytes
    (vllm/entrypoints/openai/completion/protocol.py, CompletionResponseChoice.routed_experts), with
    `prompt_token_ids` and `token_ids` when the request sets `return_token_ids`; the request field
    `routed_experts_prompt_start` skips that many prompt tokens (recorded in the file's header).

The file: JSON Lines; line 1 a header {"format": FORMAT, "version": 1, "model", "tokenizer",
"geometry": {num_layers, num_experts, top_k, architecture, vocab_size}, "routed_experts_prompt_start",
"sampling", ...}, then one line per completion {"prompt_id", "prompt_token_ids", "output_token_ids",
"routed_experts": base64 .npy or nested lists}. Arrays are read with `np.load(allow_pickle=False)`.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from predictor.importers.common import (
    Model,
    checked,
    choose_layers,
    int_array,
    json_lines,
    select,
    trace_meta,
)
from predictor.traces import TraceFormatError, TraceMeta, TraceRecord

FORMAT = "moe-prefetch/vllm-routed-experts"  # tools/vllm_client.py writes it
VERSION = 1
DENSE_FILLER = 0  # what vLLM leaves in the rows of dense layers


def decode_routed(value, where: str) -> np.ndarray:
    """`routed_experts` as vLLM returns it (base64 `.npy`) or as nested lists -> (T, layers, k) int64."""
    if value is None:
        raise TraceFormatError(f"{where}: routed_experts is null: start vLLM with --enable-return-routed-experts")
    if isinstance(value, str):
        try:
            arr = np.load(io.BytesIO(base64.b64decode(value, validate=True)), allow_pickle=False)
        except (binascii.Error, ValueError, OSError, EOFError) as e:
            raise TraceFormatError(f"{where}: routed_experts is not base64 of an .npy array ({e})") from None
        return int_array(arr, 3, "routed_experts", where)
    return int_array(value, 3, "routed_experts", where)


def _record(row: dict, start: int, where: str) -> TraceRecord:
    """One completion -> a record over the tokens vLLM routed (experts still of every file layer)."""
    missing = [k for k in ("prompt_id", "prompt_token_ids", "output_token_ids", "routed_experts") if k not in row]
    if missing:
        raise TraceFormatError(f"{where}: missing keys {missing}")
    if not isinstance(row["prompt_id"], int) or isinstance(row["prompt_id"], bool):
        raise TraceFormatError(f"{where}: prompt_id = {row['prompt_id']!r} is not an integer")
    prompt = int_array(row["prompt_token_ids"], 1, "prompt_token_ids", where)
    tokens = np.concatenate([prompt, int_array(row["output_token_ids"], 1, "output_token_ids", where)])[start:]
    experts = decode_routed(row["routed_experts"], where)
    T = len(experts)
    if T not in (len(tokens) - 1, len(tokens)):
        raise TraceFormatError(f"{where}: routed_experts covers {T} tokens; the prompt (from token {start}) and "
                               f"output have {len(tokens)}, and vLLM routes all of them but the last")
    return TraceRecord(int(row["prompt_id"]), tokens[:T], experts, min(max(len(prompt) - start, 0), T))


def read_vllm(path: str | Path, model: Model, limit: int | None = None) -> tuple[TraceMeta, Iterator[TraceRecord]]:
    """(meta, records) of a `tools/vllm_client.py` file; the geometry its header gives fills what the
    command line left unset."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no vLLM output file at {path}")
    lines = json_lines(path)
    n, head = next(lines, (1, None))
    if head is None or head.get("format") != FORMAT:
        raise TraceFormatError(f"{path}: line {n}: expected a header with format {FORMAT!r} "
                               "(files written by tools/vllm_client.py)")
    if head.get("version") != VERSION:
        raise TraceFormatError(f"{path}: line {n}: header version {head.get('version')!r}, this code reads {VERSION}")
    geo, start = head.get("geometry") or {}, head.get("routed_experts_prompt_start") or 0
    if not isinstance(geo, dict) or any(not isinstance(geo.get(key), (int, type(None))) or isinstance(geo.get(key), bool)
                                        for key in ("num_experts", "num_layers", "vocab_size", "top_k")):  # fmt: skip
        raise TraceFormatError(f"{path}: line {n}: geometry {geo!r} is not an object of integer sizes")
    if type(start) is not int or start < 0:
        raise TraceFormatError(f"{path}: line {n}: routed_experts_prompt_start = {start!r} is not a token index >= 0")
    model = model.filled(source_model=head.get("model"), architecture=geo.get("architecture"),
                         num_experts=geo.get("num_experts"), num_layers=geo.get("num_layers"),
                         vocab_size=geo.get("vocab_size"))
    first = next(lines, None)
    if first is None:
        raise TraceFormatError(f"{path}: no completions after the header")
    rec = _record(first[1], start, f"{path}: line {first[0]}")
    model = choose_layers(model, rec.experts.shape[1], rec.experts, DENSE_FILLER, f"{path}: line {first[0]}")
    if geo.get("top_k") not in (None, rec.experts.shape[2]):
        raise TraceFormatError(f"{path}: line {first[0]}: {rec.experts.shape[2]} experts per token, header top_k "
                               f"= {geo['top_k']}")
    recording = {"engine": "vllm", "source": str(path), "routed_experts_prompt_start": start,
                 **{k: head[k] for k in ("sampling", "vllm_version", "client") if k in head}}
    meta = trace_meta(model, rec.experts.shape[2], str(head.get("prompts", path)), recording)

    def records() -> Iterator[TraceRecord]:
        for i, (line, row) in enumerate(json_lines(path)):
            if i == 0:
                continue  # the header
            if limit is not None and i > limit:
                return
            where = f"{path}: line {line}"
            rec = _record(row, start, where)
            rec.experts = select(rec.experts, model, DENSE_FILLER, where)
            yield checked(rec, meta, f"{where} (prompt_id={rec.prompt_id})")

    return meta, records()
