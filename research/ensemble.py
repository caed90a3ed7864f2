"""Do the two trained predictors disagree usefully? The layer_ahead h = 1 predictor's logits plus w times
the token_ahead predictor's (known earlier, from less), on held-out Puffin prompts.

    python research/ensemble.py LAYER_AHEAD.safetensors TOKEN_AHEAD.safetensors [N_PROMPTS] [--w 0 0.25 0.5 1]

Prints recall@6, recall@12 and PR-AUC (ExpertMetrics) for each w, then the scheduler on `h100_replay`
at 10 / 25 / 50 % capacity: gap closed and tokens/s, every w (0 included) timed as layer_ahead h = 1
with the token_ahead step's cost spread over the layers (serving both runs both; more host time also
hides more copies, so only rows under the same timing compare).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed; run from anywhere
from benchmarks.sim_grid import preset  # noqa: E402
from predictor.evaluation import load_model  # noqa: E402
from predictor.metrics import ExpertMetrics  # noqa: E402
from predictor.simulate import Predictions, PredictorScorer, build_accesses, simulate  # noqa: E402
from predictor.simulate.policy import reuse_hazard  # noqa: E402
from predictor.splits import DEFAULT_SPLIT, DEFAULT_SPLIT_SEED, split_indices  # noqa: E402
from predictor.traces import load_traces  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layer_ahead")
    ap.add_argument("token_ahead")
    ap.add_argument("n", type=int, nargs="?", default=100)
    ap.add_argument("--w", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ts = load_traces("data/big/deepseek-v2-lite-puffin")
    m = ts.meta
    split = split_indices(ts.prompt_ids, DEFAULT_SPLIT, seed=DEFAULT_SPLIT_SEED)
    val = [ts.record(int(i)) for i in split["val"][: args.n]]
    train = [ts.record(int(i)) for i in split["train"]]
    L, E, k = m.num_moe_layers, m.num_experts, m.top_k
    acc, hazard = build_accesses(val, L, E, k), reuse_hazard(build_accesses(train, L, E, k))
    lay, tok = PredictorScorer(load_model(args.layer_ahead)), PredictorScorer(load_model(args.token_ahead))
    if (lay.mode, lay.lookahead, tok.mode) != ("layer_ahead", 1, "token_ahead"):
        raise SystemExit("expected a layer_ahead h = 1 predictor, then a token_ahead one")
    s_lay, s_tok = [lay.scores(r) for r in val], [tok.scores(r) for r in val]
    tm = preset("h100_replay", 0.0)
    both = replace(tm, predict_layer_ms=tm.predict_layer_ms + tm.predict_step_ms / L)
    caps = (0.1, 0.25, 0.5)
    base = {cap: (simulate(acc, both, "lru", cap).stall_ms_per_token,
                  simulate(acc, both, "belady", cap, oracle=True).stall_ms_per_token) for cap in caps}  # fmt: skip
    for w in args.w:
        s = [a + w * b for a, b in zip(s_lay, s_tok)]
        metrics = ExpertMetrics(L, E, k, ks=[k, 2 * k])
        for x, r in zip(s, val):
            metrics.update(torch.from_numpy(x)[None], torch.from_numpy(np.asarray(r.experts, np.int64))[None])
        res = metrics.compute()
        preds = Predictions.from_scores(s, 12, "layer_ahead", 1)
        gaps = []
        for cap in caps:
            lru, best = base[cap]
            r = simulate(acc, both, "scheduler", cap, predictions=preds, hazard=hazard)
            gaps.append(f"{(lru - r.stall_ms_per_token) / (lru - best):.0%} ({r.tokens_per_s:.1f} tokens/s)")
        print(f"w = {w}: recall@6 {res['recall@6']:.4f}, recall@12 {res['recall@12']:.4f}, PR-AUC {res['pr_auc']:.4f}; "
              f"h100_replay gap closed at 10 / 25 / 50 %: {' / '.join(gaps)}", flush=True)


if __name__ == "__main__":
    main()
