"""The routing a trace replay (benchmarks/bench_replay.py) forces: held-out sequences and train-split
co-occurrence counts, from a trace directory, a small `.npz` (to carry to a GPU machine without
`datasets`), or synthetic."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from predictor.atomic import atomic_path
from predictor.routing_stats import cooccurrence_counts


@dataclass
class ReplayData:
    """Held-out sequences to replay and co-occurrence counts fitted on the training split."""

    num_layers: int
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    tokens: list[np.ndarray]  # per sequence (T,)
    experts: list[np.ndarray]  # per sequence (T, L, k)
    cooc_train: np.ndarray  # (L-1, E, E)
    source: str = ""
    notes: dict = field(default_factory=dict)
    token_space: str | None = None  # what the token ids mean (predictor/token_space.py); None: unknown


def load_replay_data(path: str | Path) -> ReplayData:
    """From a trace directory (held-out = "val" of the DEFAULT_SPLIT) or a `.npz` made by `save_npz`."""
    path = Path(path)
    if path.suffix == ".npz":
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        offsets = z["offsets"]
        cut = lambda a: [a[s:e] for s, e in zip(offsets[:-1], offsets[1:])]
        return ReplayData(
            tokens=cut(z["tokens"].astype(np.int64)),
            experts=cut(z["experts"].astype(np.int64)),
            cooc_train=z["cooc_train"],
            **meta,
        )
    from predictor.splits import DEFAULT_SPLIT, DEFAULT_SPLIT_SEED, check_nonempty, split_indices
    from predictor.traces import load_traces

    ts = load_traces(path)
    m = ts.meta
    split = check_nonempty(split_indices(ts.prompt_ids, DEFAULT_SPLIT, seed=DEFAULT_SPLIT_SEED, keys=ts.prompt_keys), str(path))
    train = np.concatenate([ts.record(int(i)).experts for i in split["train"]])
    val = [ts.record(int(i)) for i in split["val"]]
    shape = m.expert_shape or {"hidden": 2048, "intermediate": 1408}
    return ReplayData(
        num_layers=m.num_moe_layers,
        num_experts=m.num_experts,
        top_k=m.top_k,
        hidden=int(shape["hidden"]),
        intermediate=int(shape["intermediate"]),
        tokens=[r.token_ids for r in val],
        experts=[r.experts for r in val],
        cooc_train=cooccurrence_counts(train, m.num_experts).astype(np.float32),
        source=f"{path} (val split, seed {DEFAULT_SPLIT_SEED})",
        token_space=m.token_space,
    )


def save_npz(data: ReplayData, path: str | Path, max_tokens: int | None = None) -> Path:
    """The replayed slice as one small file (e.g. to carry to a GPU machine without `datasets`)."""
    tokens, experts, n = [], [], 0
    for t, e in zip(data.tokens, data.experts):
        if max_tokens is not None and n >= max_tokens:
            break
        tokens.append(t)
        experts.append(e)
        n += len(t)
    meta = dict(
        num_layers=data.num_layers,
        num_experts=data.num_experts,
        top_k=data.top_k,
        hidden=data.hidden,
        intermediate=data.intermediate,
        source=data.source,
        token_space=data.token_space,
    )
    path = Path(path)
    if path.suffix != ".npz":  # what numpy would write (and the only name load_replay_data reads)
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez_compressed(
            tmp,
            meta=json.dumps(meta),
            tokens=np.concatenate(tokens).astype(np.int32),
            experts=np.concatenate(experts).astype(np.uint8 if data.num_experts <= 256 else np.int16),
            offsets=np.cumsum([0] + [len(t) for t in tokens]),
            cooc_train=data.cooc_train.astype(np.float32),
        )
    return path


def synthetic_data(
    num_layers=4, num_experts=16, top_k=2, hidden=64, intermediate=48, seqs=4, length=24, seed=0
):
    """Skewed, temporally correlated random routing (for smoke tests without traces)."""
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(num_experts, 0.3), size=num_layers)  # (L, E)

    def seq():
        out = np.empty((length, num_layers, top_k), dtype=np.int64)
        for t in range(length):
            for layer in range(num_layers):
                out[t, layer] = rng.choice(num_experts, size=top_k, replace=False, p=popularity[layer])
        return out

    train = np.concatenate([seq() for _ in range(seqs)])
    return ReplayData(
        num_layers,
        num_experts,
        top_k,
        hidden,
        intermediate,
        tokens=[rng.integers(0, 100, length) for _ in range(seqs)],
        experts=[seq() for _ in range(seqs)],
        cooc_train=cooccurrence_counts(train, num_experts).astype(np.float32),
        source="synthetic",
    )


def scale(data: ReplayData, layers=None, experts=None, hidden=None, intermediate=None) -> ReplayData:
    """A smaller problem from the same routing: the first `layers` MoE layers, expert ids folded
    modulo `experts` (sets may then hold fewer than k distinct experts), other matrix sizes."""
    L = min(layers or data.num_layers, data.num_layers)
    E = min(experts or data.num_experts, data.num_experts)
    if (L, E, hidden, intermediate) == (data.num_layers, data.num_experts, None, None):
        return data
    cooc = np.zeros((max(L - 1, 0), E, E), dtype=np.float32)
    src = data.cooc_train[: L - 1]
    i, j = np.meshgrid(np.arange(data.num_experts) % E, np.arange(data.num_experts) % E, indexing="ij")
    for layer in range(L - 1):
        np.add.at(cooc[layer], (i, j), src[layer])
    return ReplayData(
        L,
        E,
        data.top_k,
        hidden or data.hidden,
        intermediate or data.intermediate,
        tokens=data.tokens,
        experts=[e[:, :L] % E for e in data.experts],
        cooc_train=cooc,
        source=f"{data.source}, scaled to L={L} E={E}",
        notes=data.notes,
        token_space=data.token_space,  # the token ids are not scaled
    )
