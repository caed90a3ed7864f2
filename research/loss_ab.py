"""Loss A/B for the token_ahead predictor: equal optimizer steps, held-out recall@6 (plain torch, 1 thread).

    python research/loss_ab.py bce 300
    python research/loss_ab.py softmax 300
    python research/loss_ab.py softmax_bce 300

Trains the Puffin predictor (d_model 128, 2 blocks) for N steps of 8 windows of <= 256 tokens with the
given loss and prints recall@6 on the first 150 held-out windows. It produced the figures quoted in
the README (BCE 32.7 %, softmax 52.9 %, softmax + BCE 52.3 % after 300 steps).
"""

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from predictor.baselines import stack_rows
from predictor.lit_module import masked_multilabel_loss
from predictor.metrics import ExpertMetrics, targets_multi_hot
from predictor.model import ExpertPredictor, PredictorConfig
from predictor.traces import load_traces, split_indices

TRACES = "data/big/deepseek-v2-lite-puffin"


def windows(ts, rows, length=256):
    tokens, experts, lengths = stack_rows(ts.select(rows))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return [(tokens[s : min(s + length, end)], experts[s : min(s + length, end)])
            for begin, end in zip(starts[:-1], starts[1:]) for s in range(begin, end, length)]


def batch(ws):
    B, T = len(ws), max(len(w[0]) for w in ws)
    token_ids = torch.full((B, T), -1, dtype=torch.long)
    experts = torch.full((B, T, *ws[0][1].shape[1:]), -1, dtype=torch.long)
    for i, (t, e) in enumerate(ws):
        token_ids[i, : len(t)], experts[i, : len(t)] = torch.from_numpy(t.astype(np.int64)), torch.from_numpy(e.astype(np.int64))
    return token_ids, experts


def main(loss_name: str, steps: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ts = load_traces(TRACES)
    split = split_indices(ts.prompt_ids, {"train": 0.8, "val": 0.2}, seed=0)
    train, val = windows(ts, split["train"]), windows(ts, split["val"])[:150]
    m = ts.meta
    cfg = PredictorConfig(vocab_size=m.vocab_size, num_layers=m.num_moe_layers, num_experts=m.num_experts,
                          top_k=m.top_k, d_model=128, n_blocks=2, dropout=0.1)
    model = ExpertPredictor(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.98))
    rng, start = np.random.default_rng(0), time.time()
    for step in range(steps):  # warmup 20 steps, cosine to 10 %
        lr = 2e-3 * min(1, (step + 1) / 20) * (0.1 + 0.45 * (1 + np.cos(np.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        token_ids, experts = batch([train[i] for i in rng.choice(len(train), 8, replace=False)])
        logits = model(token_ids, experts)  # (B, T, L, E)
        target = targets_multi_hot(experts, m.num_experts)
        mask = token_ids >= 0
        if loss_name == "softmax":
            x, y = logits[mask], target[mask].float()
            loss = (-(F.log_softmax(x, -1) * y).sum(-1) / y.sum(-1).clamp_min(1)).mean()
        else:
            loss = masked_multilabel_loss(logits, target, mask, loss_name)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    metrics = ExpertMetrics(m.num_moe_layers, m.num_experts, m.top_k)
    with torch.no_grad():
        for i in range(0, len(val), 16):
            token_ids, experts = batch(val[i : i + 16])
            mask = token_ids >= 0
            metrics.update(model(token_ids, experts)[mask], experts[mask], torch.nonzero(mask)[:, 1])
    recall = metrics.compute()[f"recall@{m.top_k}"]
    print(f"{loss_name}: {steps} steps, held-out recall@{m.top_k} {recall:.4f}, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
