"""Import SGLang's per-token expert distribution records.

Start SGLang with `--expert-distribution-recorder-mode per_token` (and `--disable-radix-cache`, so that
every prompt's prefill is recorded from its first token), POST /start_expert_distribution_record,
send requests, POST /stop_expert_distribution_record and /dump_expert_distribution_record. Each rank
writes `expert_distribution_recorder_<time>_<rank>.pt` into SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR.

What the files hold, read in sgl-project/sglang python/sglang/srt/eplb/expert_distribution.py
(`_DetailSinglePassGatherer`, `_DetailAccumulator.dump`), a torch-saved dict:

    records: one dict per forward pass: forward_pass_id, rank, input_ids [tokens], positions [tokens],
        extend_seq_lens [requests] (None in decode passes: one token per request), forward_mode
        (1 extend, 2 decode, 3 mixed, 4 idle; ForwardMode in forward_batch_info.py), and
        topk_ids_of_layer [layers, tokens, 8]: physical expert ids. Its layers are the model's decoder
        layers (ExpertLocationMetadata.num_layers), dense ones left at -1, and its last dimension is
        always 8 (`_TOP_K_NUM`, "DeepSeek V3 has this value"): a model with top_k < 8 leaves -1 padding.
    last_physical_to_logical_map [layers, physical experts]: logical id of each physical slot ("last":
        it may change while recording when EPLB rebalances; the importer maps with it).

Passes are split into sequences by sglang_link.Linker. In mixed passes (chunked prefill with
--enable-mixed-chunk) one-token segments that continue a sequence are taken as decode tokens.
One rank is imported at a time (`rank`): tensor- and expert-parallel ranks record the same passes, so
records of several ranks together are refused rather than imported as repeated sequences.
Files are read with torch.load(weights_only=True): tensors and plain data only.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from predictor.importers.common import Model, checked, choose_layers, select, trace_meta
from predictor.importers.sglang_link import Linker
from predictor.traces import TraceFormatError, TraceMeta, TraceRecord

EXTEND, DECODE, MIXED, IDLE = 1, 2, 3, 4
PADDING = -1  # dense layers and unused top-k slots


def load_dump(path: Path) -> dict:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TraceFormatError(f"{path}: refused: not a plain torch file of tensors and data ({e})") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails anywhere in torch's reader
        raise TraceFormatError(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not {"records", "last_physical_to_logical_map"} <= set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise TraceFormatError(f"{path}: expected a per_token dump with 'records' and "
                               f"'last_physical_to_logical_map', got {keys}")
    return data


def _arrays(rec, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids (n,), positions (n,), topk (n, layers, 8)) of one record, checked."""
    if not isinstance(rec, dict):
        raise TraceFormatError(f"{where}: expected a dict, got {type(rec).__name__}")
    missing = [k for k in ("input_ids", "positions", "topk_ids_of_layer", "forward_mode") if k not in rec]
    if missing:
        raise TraceFormatError(f"{where}: missing keys {missing}")
    ids, pos = np.asarray(rec["input_ids"], dtype=np.int64), np.asarray(rec["positions"], dtype=np.int64)
    topk = np.asarray(rec["topk_ids_of_layer"]).astype(np.int64)
    if ids.ndim != 1 or pos.shape != ids.shape or topk.ndim != 3 or topk.shape[1] != len(ids):
        raise TraceFormatError(f"{where}: input_ids {ids.shape}, positions {pos.shape}, topk_ids_of_layer "
                               f"{topk.shape}: expected (n,), (n,), (layers, n, k)")
    return ids, pos, topk.transpose(1, 0, 2)


def _forward_mode(rec, where: str) -> int:
    """The pass's ForwardMode, as SGLang records it: its integer value."""
    try:
        return int(rec["forward_mode"])
    except (TypeError, ValueError):
        raise TraceFormatError(f"{where}: forward_mode {rec['forward_mode']!r} is not SGLang's integer mode") from None


def _segments(rec, pos: np.ndarray, where: str) -> tuple[list[int], np.ndarray]:
    """Tokens per request and which requests are decode tokens, from forward_mode and extend_seq_lens (in a
    mixed pass, a one-token request at position 0 is a new one-token prompt, not a decode token; one at a
    later position is read as a decode token, so a chunked prompt whose last chunk is one token, chunk x n + 1
    tokens under --enable-mixed-chunk, gets num_prefill one short: the pass does not say which it is)."""
    n = len(pos)
    mode, lens = _forward_mode(rec, where), rec.get("extend_seq_lens")
    try:
        lens = None if lens is None else [int(x) for x in lens]
    except (TypeError, ValueError):
        raise TraceFormatError(f"{where}: extend_seq_lens {lens!r} are not integers") from None
    if mode == DECODE:
        return [1] * n, np.ones(n, dtype=bool)
    if mode not in (EXTEND, MIXED):
        raise TraceFormatError(f"{where}: forward_mode {mode} (speculative decoding?) is not supported; "
                               "record without --speculative-algorithm")
    if lens is None or sum(lens) != n or min(lens, default=0) < 1:
        raise TraceFormatError(f"{where}: extend_seq_lens {lens} are not request lengths >= 1 adding up to the "
                               f"pass's {n} tokens")  # fmt: skip
    starts = np.cumsum([0, *lens[:-1]])
    return lens, np.array([mode == MIXED and x == 1 and pos[s] > 0 for x, s in zip(lens, starts)])


def _logical(topk: np.ndarray, p2l: np.ndarray, where: str) -> np.ndarray:
    """Physical -> logical expert ids per layer; -1 stays -1."""
    if topk.shape[1] != p2l.shape[0] or topk.max(initial=-1) >= p2l.shape[1]:
        raise TraceFormatError(f"{where}: physical ids of {topk.shape[1]} layers up to {topk.max()} do not fit "
                               f"last_physical_to_logical_map {tuple(p2l.shape)}")
    layer = np.arange(topk.shape[1])[None, :, None]
    return np.where(topk >= 0, p2l[layer, np.maximum(topk, 0)], PADDING)


def _unpad(ex: np.ndarray, k: int, where: str) -> np.ndarray:
    """(n, L, 8) with -1 padding -> (n, L, k); every (token, layer) must have exactly k ids."""
    valid = (ex[..., :k] >= 0).all(-1) & (ex[..., k:] == PADDING).all(-1)
    if not valid.all():
        t, layer = np.argwhere(~valid)[0]
        raise TraceFormatError(f"{where}: token {t}, MoE layer {layer}: {ex[t, layer].tolist()} is not {k} ids "
                               "then -1 padding (shared-expert fusion on? launch with --disable-shared-experts-fusion)")
    return ex[..., :k]


def _in_pass_order(passes: list[tuple]) -> list[tuple]:
    """One rank's passes in the order they ran: by forward_pass_id when every record has one, else by
    file (in the order given, a directory's sorted by name) and record. One id in two files means two
    server runs whose ids both start at 0: ordering by id would interleave them, so it is refused."""
    if any(x[1] is None for x in passes):
        return sorted(passes, key=lambda x: (x[2], x[3]))
    first: dict = {}
    for _, fid, _, i, _, _, f in passes:
        seen = first.setdefault(fid, (f, i))
        if seen[0] != f:
            raise TraceFormatError(f"{f}: record {i}: forward_pass_id {fid} also in {seen[0]} (record {seen[1]}); "
                                   "dumps of different server runs: import them separately")
    return sorted(passes, key=lambda x: (x[1], x[2], x[3]))


def read_sglang(paths: list[str | Path], model: Model, limit: int | None = None, rank: int | None = None,
                by_order: bool = False) -> tuple[TraceMeta, Iterator[TraceRecord]]:
    """(meta, records) from one or more dump files (or directories of them), one rank at a time."""
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.pt")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no SGLang dump (.pt) files in {[str(p) for p in paths]}")
    passes = []  # (rank, forward_pass_id or None, file number, record number, record, map, file)
    for n, f in enumerate(files):
        if not f.is_file():
            raise FileNotFoundError(f"no SGLang dump file at {f}")
        data = load_dump(f)
        p2l = np.asarray(data["last_physical_to_logical_map"]).astype(np.int64)
        for i, rec in enumerate(data["records"]):
            r = rec.get("rank", 0) if isinstance(rec, dict) else 0
            if rank is None or r == rank:
                passes.append((r, rec.get("forward_pass_id") if isinstance(rec, dict) else None, n, i, rec, p2l, f))
    ranks = sorted({x[0] for x in passes})
    if len(ranks) > 1:  # tensor-parallel ranks record the same passes: taking all would repeat every sequence
        raise TraceFormatError(f"{', '.join(map(str, files))}: records from ranks {ranks}; import one rank at a time "
                               "(--rank 0; under tensor or expert parallelism every rank records the same passes)")
    passes = _in_pass_order(passes)
    linker = Linker(by_order)
    model_k: list = []
    for pass_no, (_, _, _, i, rec, p2l, f) in enumerate(passes):
        where = f"{f}: record {i}"
        ids, pos, topk = _arrays(rec, where)
        if len(ids) == 0 or _forward_mode(rec, where) == IDLE:
            continue
        ex = _logical(topk, p2l, where)
        if not model_k:  # the first pass with tokens decides the MoE layers and k
            moe = choose_layers(model, ex.shape[1], ex, PADDING, where)
            p2l_moe = p2l[moe.moe_layers] if p2l.shape[0] == ex.shape[1] else p2l
            moe = moe.filled(num_experts=int(p2l_moe.max()) + 1)
            model_k += [moe, int((select(ex, moe, PADDING, where)[0, 0] >= 0).sum())]
        moe, k = model_k
        ex = _unpad(select(ex, moe, PADDING, where), k, where)
        lens, decode = _segments(rec, pos, where)
        rids = rec.get("rids")
        if rids is not None and len(rids) != len(lens):
            raise TraceFormatError(f"{where}: {len(rids)} rids for {len(lens)} requests")
        linker.add_pass(pass_no, rids, lens, pos, ids, ex, decode, where, full_batch=int(rec["forward_mode"]) == DECODE)
    if not model_k:
        raise TraceFormatError(f"{files[0]}: no forward pass with tokens" + (f" on rank {rank}" if rank is not None else ""))
    moe, k = model_k
    src = ", ".join(map(str, files))
    meta = trace_meta(moe, k, src, {"engine": "sglang", "source": src, "rank": rank, "link_by_order": by_order})
    out = list(linker.records())

    def records() -> Iterator[TraceRecord]:
        for rec in out[:limit]:
            yield checked(rec, meta, f"{src}: sequence {rec.prompt_id}")

    return meta, records()
