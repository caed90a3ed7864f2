"""How well does an expert's own history in the sequence say whether the next token uses it? That is
what the learned eviction (predictor/simulate/policy.py) estimates for every expert the predictor says
nothing about, from the gap since its last use alone (`reuse_hazard`). Belady's lead over LRU at small
capacities comes from this question, so a sharper answer is what could bring learned eviction nearer.

    python research/next_token_reuse.py [TRACES] [--train-prompts N] [--window W]

Tables fitted on the train split (80/20, seed 0; the first N train prompts), scored on the held-out
prompts: P(used by token t + 1 | layer, gap since last use) and the same also given its uses among
the last W tokens. Prints log-loss, ROC-AUC (on a 5 % sample of (token, layer, expert) cells) and
recall@6 of the next token's experts per layer when each table's top 6 are taken.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import roc_auc_score

from predictor.splits import DEFAULT_SPLIT, DEFAULT_SPLIT_SEED, split_indices
from predictor.traces import load_traces

MAX_GAP, MAX_COUNT = 64, 9


def history(experts: np.ndarray, num_experts: int, window: int):
    """experts (T, L, k) -> per token t < T - 1 and (layer, expert): gap since last use (0 = never, capped),
    uses among tokens (t - window, t] (capped), and whether token t + 1 uses it; each (T - 1, L, E)."""
    T, L = experts.shape[:2]
    used = np.zeros((T, L, num_experts), bool)
    used[np.arange(T)[:, None, None], np.arange(L)[None, :, None], experts] = True
    counts = np.concatenate([np.zeros((1, L, num_experts), np.int32), np.cumsum(used, 0, dtype=np.int32)])
    last = np.full((L, num_experts), -1)
    gaps = np.empty((T - 1, L, num_experts), np.int64)
    for t in range(T - 1):
        last[used[t]] = t
        gaps[t] = np.where(last >= 0, np.minimum(t - last + 1, MAX_GAP - 1), 0)
    recent = counts[1:T] - counts[np.maximum(0, np.arange(1, T) - window)]
    return gaps, np.minimum(recent, MAX_COUNT - 1), used[1:]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="?", default="data/big/deepseek-v2-lite-puffin")
    ap.add_argument("--train-prompts", type=int, default=800)
    ap.add_argument("--window", type=int, default=32)
    args = ap.parse_args(argv)
    traces = load_traces(args.traces)
    records = list(traces)
    E = traces.meta.num_experts
    split = split_indices(np.array([r.prompt_id for r in records]), DEFAULT_SPLIT, DEFAULT_SPLIT_SEED)

    def stacked(indices):
        parts = [history(np.asarray(records[i].experts), E, args.window) for i in indices
                 if len(records[i].experts) > 1]
        return [np.concatenate([p[j] for p in parts]) for j in range(3)]

    train, held = stacked(split["train"][: args.train_prompts]), stacked(split["val"])
    L = train[0].shape[1]
    layer_of = lambda a: np.broadcast_to(np.arange(L)[None, :, None], a.shape)  # noqa: E731
    k_over_e = traces.meta.top_k / E
    sample = np.random.default_rng(0).random(held[2].shape) < 0.05
    print(f"{args.traces}: fitted on {len(train[0])} train tokens, scored on {len(held[0])} held-out tokens")
    for name, keys, shape in (("layer, gap", lambda g, c: (layer_of(g), g), (L, MAX_GAP)),
                              (f"layer, gap, uses in {args.window}", lambda g, c: (layer_of(g), g, c),
                               (L, MAX_GAP, MAX_COUNT))):
        n, s = np.zeros(shape), np.zeros(shape)
        np.add.at(n, keys(train[0], train[1]), 1)
        np.add.at(s, keys(train[0], train[1]), train[2])
        p = ((s + k_over_e) / (n + 1))[keys(held[0], held[1])]  # one pseudo-use at the mean rate
        y = held[2]
        q = np.clip(p, 1e-6, 1 - 1e-6)
        logloss = -np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))
        top = np.argsort(-p, -1)[..., : traces.meta.top_k]
        recall = np.take_along_axis(y, top, -1).sum() / y.sum()
        print(f"{name:24s} log-loss {logloss:.4f}  ROC-AUC {roc_auc_score(y[sample], p[sample]):.4f}  "
              f"next-token recall@{traces.meta.top_k} {100 * recall:.1f} %")


if __name__ == "__main__":
    main()
