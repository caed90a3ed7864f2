"""Can a layer_ahead h = 1 predictor be called every other layer? After layer l (l even) it would predict
layer l + 1 as trained and layer l + 2 from the routing of layers <= l only (layer l + 1 unknown, -1).

    python research/alternate_layers.py PREDICTOR [N_PROMPTS]

Prints held-out recall@6 (ExpertMetrics) with every target layer predicted as trained and with the even
ones from one layer less, per layer; then the scheduler on `h100_replay` and `h200_replay` with each,
the second with half the per-layer predictor cost (13 calls per token instead of 26). The simulator
takes an even target t as known once layer t - 1 has routed (lookahead 1); the scheme knows it a layer
earlier, so what it prints for that scheme is a lower bound.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed; run from anywhere
from benchmarks.sim_grid import preset  # noqa: E402
from predictor.evaluation import load_model  # noqa: E402
from predictor.metrics import ExpertMetrics  # noqa: E402
from predictor.simulate import Predictions, build_accesses, simulate  # noqa: E402
from predictor.simulate.policy import reuse_hazard  # noqa: E402
from predictor.splits import DEFAULT_SPLIT, DEFAULT_SPLIT_SEED, split_indices  # noqa: E402
from predictor.traces import load_traces  # noqa: E402


def scores(model, records, L: int):
    """Per record (T, L, E) logits: as trained, and with the even target layers >= 2 from one layer less."""
    normal, alternate = [], []
    with torch.inference_mode():
        for r in records:
            ids = torch.from_numpy(np.asarray(r.token_ids, np.int64))[None]
            ex = torch.from_numpy(np.asarray(r.experts, np.int64))[None]
            full = model(ids, ex)[0]  # (T, L, E)
            ctx = model.context(ids, torch.cat([torch.full_like(ex[:, :1], -1), ex[:, :-1]], 1))
            out = full.clone()
            for t in range(2, L, 2):  # routing <= t - 2 only: layer t - 1 not yet known
                masked = ex.clone()
                masked[:, :, t - 1 :] = -1
                ctx.memo.clear()
                out[:, t] = model.logits(ctx, masked, slice(t, t + 1))[0, :, 0]
            normal.append(full.numpy())
            alternate.append(out.numpy())
    return normal, alternate


def main(path: str, n: int = 100) -> None:
    torch.set_num_threads(1)
    ts = load_traces("data/big/deepseek-v2-lite-puffin")
    m = ts.meta
    split = split_indices(ts.prompt_ids, DEFAULT_SPLIT, seed=DEFAULT_SPLIT_SEED)
    val = [ts.record(int(i)) for i in split["val"][:n]]
    train = [ts.record(int(i)) for i in split["train"]]
    L, E, k = m.num_moe_layers, m.num_experts, m.top_k
    acc, hazard = build_accesses(val, L, E, k), reuse_hazard(build_accesses(train, L, E, k))
    normal, alternate = scores(load_model(path), val, L)
    for name, s in (("every layer", normal), ("every other", alternate)):
        metrics = ExpertMetrics(L, E, k)
        for x, r in zip(s, val):
            metrics.update(torch.from_numpy(x)[None], torch.from_numpy(np.asarray(r.experts, np.int64))[None])
        res = metrics.compute()
        print(f"{name}: recall@6 {res['recall@6']:.4f}; per layer {np.round(res['recall@6/layer'], 3).tolist()}")
    preds = [Predictions.from_scores(s, 12, "layer_ahead", 1) for s in (normal, alternate)]
    for sname in ("h100_replay", "h200_replay"):
        tm = preset(sname, 0.0)
        half = replace(tm, predict_layer_ms=tm.predict_layer_ms / 2)
        for cap in (0.1, 0.25, 0.5):
            lru = simulate(acc, tm, "lru", cap)
            best = simulate(acc, tm, "belady", cap, oracle=True).stall_ms_per_token
            cells = [f"LRU {lru.tokens_per_s:.1f} tokens/s"]
            for name, model_time, p in (("every layer", tm, preds[0]), ("every other", half, preds[1])):
                r = simulate(acc, model_time, "scheduler", cap, predictions=p, hazard=hazard)
                gap = (lru.stall_ms_per_token - r.stall_ms_per_token) / (lru.stall_ms_per_token - best)
                cells.append(f"{name} {r.tokens_per_s:.1f} tokens/s, gap closed {gap:.0%}")
            print(f"{sname} {cap:.0%}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100)
