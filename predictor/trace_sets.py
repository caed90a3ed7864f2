"""Several trace sets read as one (`data.path: [A, B, ...]` in training).

They must come from the same MoE model (L, E, k) and share one token space (predictor/token_space.py):
token ids of different vocabularies would mean different tokens to one embedding table. The rows are
concatenated without copying (still memory-mapped); prompt ids of each later set are shifted past
those of the sets before it, since splits and the routing bank go by prompt id.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np

from predictor.hub_traces import resolve_trace_path
from predictor.token_space import check_token_space
from predictor.trace_rows import TraceFormatError
from predictor.traces import TraceMeta, TraceSet, load_traces


def check_compatible(metas: list[TraceMeta], paths: list[Path], what: str = "data.path") -> None:
    """Refuse trace sets of different MoE models (shape, layers, architecture) or token spaces; warn where
    only the model's name differs (a base model and its chat tune route alike in shape, not in fact); the
    messages name both sets."""
    first = metas[0]
    shape = (first.num_moe_layers, first.num_experts, first.top_k)
    for meta, path in zip(metas[1:], paths[1:]):
        other = (meta.num_moe_layers, meta.num_experts, meta.top_k)
        if other != shape:
            raise ValueError(f"{what}: {path} has (L, E, k) = {other}, {paths[0]} has {shape}: not the same MoE model")
        for key in ("architecture", "num_layers", "moe_layers"):
            a, b = getattr(first, key), getattr(meta, key)
            if a and b and a != b:
                raise ValueError(f"{what}: {path} has {key} {b!r}, {paths[0]} has {a!r}: not the same MoE model")
        if first.source_model and meta.source_model and first.source_model != meta.source_model:
            warnings.warn(f"{what}: {path} was recorded from {meta.source_model!r}, {paths[0]} from "
                          f"{first.source_model!r}: merged as one model's routing", stacklevel=3)  # fmt: skip
        check_token_space(first.token_space, f"{what} {paths[0]}", meta.token_space, f"{what} {path}")


def merged_meta(metas: list[TraceMeta]) -> TraceMeta:
    """The first set's meta, with the row and token counts of all and the largest vocabulary; the
    optional columns (gate weights, the gate's picks) only where every set has them alike."""
    meta = copy.deepcopy(metas[0])
    meta.has_weights = all(m.has_weights for m in metas)
    meta.gate_ahead = metas[0].gate_ahead if len({m.gate_ahead for m in metas}) == 1 else 0
    meta.num_sequences = sum(m.num_sequences for m in metas)
    meta.num_tokens = sum(m.num_tokens for m in metas)
    sizes = [m.vocab_size for m in metas]
    meta.vocab_size = None if None in sizes else max(sizes)
    return meta


def load_trace_sets(paths: list[str | Path], what: str = "data.path") -> TraceSet:
    """One TraceSet over the rows of every set in `paths` (a single path loads as it is)."""
    import datasets

    try:  # the error names the setting as well as the path: data.path and train_data look alike
        paths = [resolve_trace_path(p) for p in paths]  # hf://datasets/... -> its HF cache snapshot
        sets = [load_traces(p) for p in paths]
    except (FileNotFoundError, TraceFormatError) as e:
        raise type(e)(f"{what}: {e}") from None
    if len(sets) == 1:
        return sets[0]
    check_compatible([ts.meta for ts in sets], paths, what)
    meta = merged_meta([ts.meta for ts in sets])
    parts, offset = [], 0
    for ts in sets:
        pid = ts.prompt_ids.astype(np.int64)
        dropped = [c for c, keep in (("weights", meta.has_weights), ("gate_ahead", meta.gate_ahead)) if not keep]
        ds = ts.dataset.remove_columns([c for c in dropped if c in ts.dataset.column_names])
        # the same column order for every part, so that the features line up
        parts.append(ds.remove_columns("prompt_id").add_column("prompt_id", pid - pid.min() + offset))
        offset += int(pid.max() - pid.min()) + 1
    return TraceSet(paths[0], meta, datasets.concatenate_datasets(parts))
