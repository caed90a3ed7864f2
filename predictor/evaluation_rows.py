"""The rows an evaluation reads, without holding them (predictor/evaluation.py).

Evaluation and train rows are memory-mapped TraceSet views (`select_rows`), read a row at a time when
scored and a chunk of rows at a time when fitted (predictor/chunks.py). The simulator replays the
first `simulate.max_sequences` evaluation rows (all by default: its access stream and the kept top
predictions grow with them), and what it learns from the train split, the pinning frequencies and the
reuse hazard, is counted chunk by chunk (`train_replay_stats`) instead of replaying the whole split.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from predictor.chunks import row_chunks
from predictor.simulate.accesses import chunk_accesses
from predictor.simulate.policy import ReuseHazard, hazard_counts, hazard_from_counts
from predictor.splits import DEFAULT_SPLIT_SEED, recorded_splits, trace_fingerprint
from predictor.token_space import check_token_space
from predictor.traces import TraceMeta, TraceSet, split_indices


def paths(value) -> list[str]:
    """`data.path` / `train_data`: one trace directory or a list of them (read as one, trace_sets.py)."""
    return [str(value)] if isinstance(value, (str, Path)) else [str(v) for v in value]


def select_rows(ts: TraceSet, split: str, fractions: dict, seed: int, max_sequences: int | None) -> TraceSet:
    """The rows of `split` ("all": every row), the first `max_sequences` of them; a view, nothing read."""
    if split == "all":
        idx = np.arange(len(ts))
    else:
        parts = split_indices(ts.prompt_ids, dict(fractions), seed=seed, keys=ts.prompt_keys)
        if split not in parts:
            raise ValueError(f"split={split!r} is not one of {sorted(parts)} or 'all'")
        idx = parts[split]
    if max_sequences is not None:
        idx = idx[:max_sequences]
    if len(idx) == 0:
        raise ValueError(f"{ts.path}: split {split!r} has no rows")
    return ts.select(idx)


def check_predictor_shape(config, meta: TraceMeta, what: str) -> None:
    """Refuse a predictor (its PredictorConfig) of another routing shape than the traces' (L, E, k)."""
    if (config.num_layers, config.num_experts, config.top_k) != (meta.num_moe_layers, meta.num_experts, meta.top_k):
        raise ValueError(f"{what}: predictor has (L, E, k) = {(config.num_layers, config.num_experts, config.top_k)}, "
                         f"traces {(meta.num_moe_layers, meta.num_experts, meta.top_k)}")


def check_held_out(pmeta: dict, ts: TraceSet, rows: TraceSet, what: str, all_rows: bool = False) -> None:
    """Refuse to score a predictor on prompts it trained on. When its file says it was trained on the
    trace set `ts` (its `traces_fingerprint`; files from before it: `traces`, the same directory) and how
    it split it (`split`, `split_seed`, `train_split`, `calib_fraction`, `max_rows`), none of `rows` may
    come from its train prompts; with `all_rows` (evaluation's split=all, asked for on purpose) a warning
    says so instead."""
    fractions, fingerprint = pmeta.get("split"), pmeta.get("traces_fingerprint")
    if not fractions:
        return
    whole = ts  # the set the run split
    if fingerprint is not None:
        if fingerprint != trace_fingerprint(ts):
            found = _as_member(pmeta, ts, what)  # one of several sets the run trained on together
            if found is None:
                if isinstance(pmeta.get("traces"), str) and _same_dir(pmeta["traces"], ts.path):
                    warnings.warn(f"{what} was trained on {ts.path} before its rows changed (another trace "
                                  "fingerprint): which of these prompts it trained on is not known", stacklevel=2)
                return
            whole = found[0]
    elif not isinstance(pmeta.get("traces"), str) or not _same_dir(pmeta["traces"], ts.path):
        return
    split, train = recorded_splits(whole.prompt_ids, pmeta)  # as the run split it
    # by prompt tokens, not prompt ids: a copy of a trained prompt under another id (or in another of the
    # sets it trained on together) is no held-out prompt either
    trained = np.unique(whole.prompt_keys[split[train]])
    seed, calib = pmeta.get("split_seed", DEFAULT_SPLIT_SEED), pmeta.get("calib_fraction") or 0.0
    evaluated = np.unique(rows.prompt_keys)
    seen = np.intersect1d(evaluated, trained)
    if not len(seen):
        return
    msg = (f"{what} was trained on {len(seen)} of the {len(evaluated)} prompts evaluated here ({ts.path}: its "
           f"split {dict(fractions)}, seed {seed}, train split {train!r}" + (f", calib_fraction {calib}" if calib else "")
           + ")")  # fmt: skip
    if all_rows:
        warnings.warn(msg + ": its figures on them are not held out", stacklevel=2)
        return
    raise ValueError(msg + ": evaluate it on its own held-out split (evaluate.py: data.split=… data.seed=… as it "
                     "was trained) or on other traces")  # fmt: skip


def _as_member(pmeta: dict, ts: TraceSet, what: str) -> tuple[TraceSet, int] | None:
    """(the merged set, the row where ts begins in it) when ts is one of the sets a run trained on together
    (its file's `traces_members`), read from the paths it records; a set it cannot read is a warning."""
    from predictor.trace_sets import load_trace_sets

    members = pmeta.get("traces_members") or []
    mine = trace_fingerprint(ts)
    j = next((i for i, m in enumerate(members) if m["fingerprint"] == mine), None)
    if j is None:
        return None
    try:
        whole = load_trace_sets(paths(pmeta["traces"]), "the predictor file's traces")
    except (OSError, ValueError) as e:
        warnings.warn(f"{what} was trained on {ts.path} together with other trace sets that cannot be read here "
                      f"({e}): its train prompts among these rows are not known", stacklevel=3)  # fmt: skip
        return None
    if trace_fingerprint(whole) != pmeta["traces_fingerprint"]:
        warnings.warn(f"{what} was trained on {ts.path} with other trace sets that have changed since "
                      f"({pmeta['traces']}): its train prompts among these rows are not known", stacklevel=3)
        return None
    return whole, sum(int(m["rows"]) for m in members[:j])


def _same_dir(a: str, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # a Hub name, or a directory not here
        return False


def head(rows: TraceSet, n: int | None) -> TraceSet:
    """The first `n` rows of a view (all when `n` is None)."""
    if n is None or n >= len(rows):
        return rows
    if n < 1:
        raise ValueError(f"simulate.max_sequences={n}: must be >= 1 (or null: every evaluation row)")
    return rows.select(np.arange(n))


def check_same_model(meta: TraceMeta, other: TraceMeta, what: str) -> None:
    a = (meta.num_moe_layers, meta.num_experts, meta.top_k)
    b = (other.num_moe_layers, other.num_experts, other.top_k)
    if a != b:
        raise ValueError(f"{what} has (L, E, k) = {b}, the evaluation traces {a}: not the same MoE model")
    check_token_space(meta.token_space, "the evaluation traces (data.path)", other.token_space, what)


def train_replay_stats(rows: TraceSet, max_gap: int = 64) -> tuple[np.ndarray, ReuseHazard]:
    """What the simulator learns from the train rows, counted a chunk of rows at a time: (L, E) access
    counts (pinning) and the reuse hazard (learned eviction), equal to
    `build_accesses(rows).layer_frequency()` and `reuse_hazard(build_accesses(rows))`."""
    m = rows.meta
    freq, reused, at_risk = 0, 0.0, 0.0
    for chunk in row_chunks(rows):
        acc = chunk_accesses(chunk.experts, chunk.lengths, m.num_experts)
        freq = freq + acc.layer_frequency()
        r, a = hazard_counts(acc, max_gap)
        reused, at_risk = reused + r, at_risk + a
    return freq, hazard_from_counts(reused, at_risk, m.num_experts, m.top_k)
