"""Does a memory of the same prompt's earlier routing add to the wide tables? Fixed heuristics, linear models.

    python research/memory_features.py cur_all 3 knn     # layer_ahead h=1 tables + routing-similarity votes
    python research/memory_features.py cur_all 3 none    # the same model without them
    python research/memory_features.py prev_all 2 same   # token_ahead tables + same-token copies
    python research/memory_features.py prev_all 2 none

The linear model of research/wide_tables.py (masked L*E x L*E table, rank-64 token table, bias), plus
per-layer gains on two kinds of feature computed from earlier tokens s < t of the same prompt:

- knn (layer_ahead, h=1): votes for layer l's experts, sum_s softmax_s(beta * overlap_{<=l-1}(s, t)) * routing[s, l],
  where overlap counts the (layer, expert) pairs that s and t share at layers <= l-1 (beta 1 and 0.3);
- same (token_ahead): the mean routing of the earlier positions holding the same token.

Held-out recall@6 (1 thread; features take about 3.5 min, then 40 s per epoch):
cur_all 66.6 % (none, 3 epochs, wide_tables.py) -> 68.7 % with knn, 69.0 % with knn and same;
prev_all 58.2 % (none, 2 epochs) -> 60.3 % with same. This chose the learned routing memory
(predictor/memory.py), which replaces the fixed beta and overlap with learned queries and keys.
"""

import sys
import time

import torch
from wide_tables import LinearModel, fit, flat_tokens, load_split

from predictor.baselines import stack_rows


def memory_feats(ts, rows, E):
    """-> knn votes (N, L, 2, E) for beta 1 and 0.3, same-token means (N, L, E); rows never mix."""
    tokens, experts, lengths = stack_rows(ts.select(rows))
    N, L, k = experts.shape
    hot = torch.zeros(N, L, E)
    hot.scatter_(-1, torch.from_numpy(experts), 1.0)
    tok = torch.from_numpy(tokens)
    # layer_ahead h=1: votes by routing similarity at layers <= l-1 (beta 1 and 0.3)
    knn = torch.zeros(N, L, 2, E)
    same = torch.zeros(N, L, E)  # token_ahead: mean routing of earlier same-token positions
    s = 0
    for n in lengths.tolist():
        H = hot[s : s + n]  # (n, L, E)
        G = torch.einsum("sle,tle->lts", H, H).cumsum(0)  # (L, n_t, n_s): overlap at layers <= l
        causal = torch.ones(n, n).tril(-1).bool()
        for bi, beta in enumerate((1.0, 0.3)):
            sim = torch.cat([torch.zeros(1, n, n), G[:-1]], 0) * beta  # target l uses layers <= l-1
            sim = sim.masked_fill(~causal, -1e9)
            w = torch.softmax(sim, -1) * causal.any(-1, keepdim=True)  # (L, t, s), zero rows at t=0
            knn[s : s + n, :, bi] = torch.einsum("lts,sle->tle", w, H)
        eq = (tok[s : s + n, None] == tok[None, s : s + n]) & causal
        cnt = eq.sum(-1, keepdim=True).clamp_min(1)
        same[s : s + n] = torch.einsum("ts,sle->tle", eq.float() / cnt, H)
        s += n
    return knn, same


def main(variant, epochs, feats):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ts, train_rows, val_rows = load_split()
    m = ts.meta
    L, E = m.num_moe_layers, m.num_experts
    t0 = time.time()
    train, val = ((*flat_tokens(ts, rows), *memory_feats(ts, rows, E)) for rows in (train_rows, val_rows))
    print("features", round(time.time() - t0), "s", flush=True)
    model = LinearModel(variant, m.vocab_size, L, E)
    coef = torch.zeros(L, 6, requires_grad=True)  # per-layer gains: linear and log, per feature

    def logits(d, idx):
        out = model.logits(d, idx)
        fs = []
        if feats in ("knn", "both"):
            fs += [d[3][idx][:, :, 0], d[3][idx][:, :, 1]]
        if feats in ("same", "both"):
            fs += [d[4][idx]]
        for i, f in enumerate(fs):
            out = out + coef[:, 2 * i, None] * f * 4 + coef[:, 2 * i + 1, None] * torch.log(f + 0.02)
        return out

    fit(logits, [*model.params, coef], train, val, m.top_k, epochs, f"{variant} {feats}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[3] not in ("none", "knn", "same", "both"):
        sys.exit(
            "usage: python research/memory_features.py {cur_all|prev_all} EPOCHS {none|knn|same|both}"
        )
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
