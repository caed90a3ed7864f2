"""Is there signal in a training-set routing bank beyond a trained layer_ahead predictor? (plain torch)

    python research/bank_signal.py outputs/.../predictor.safetensors        # a layer_ahead h=1 predictor

Scores the predictor's held-out Puffin logits (80/20 prompt split, seed 0), the routing bank's vote alone
(predictor/bank.py, built from the train split, beta 2, decay 0.7, keeping all occurrences or a random
64 / 128 per token), and the fixed blend logits + 0.5 * log(vote + 0.02), by recall@6. With the 71.2 %
predictor of session 4 (no bank; README) this gave:

    all occurrences: vote alone 62.9 %, blend 74.1 %;  128 per token: 72.9 %;  64 per token: 72.7 %

which is why the bank keeps every occurrence and why the predictor got one.
"""

import sys
import time

import numpy as np
import torch

from predictor.bank import RoutingBank
from predictor.baselines import stack_rows
from predictor.evaluation import load_model
from predictor.traces import load_traces, split_indices

TRACES = "data/big/deepseek-v2-lite-puffin"


def recall(scores: torch.Tensor, experts: torch.Tensor, k: int) -> float:
    """scores (N, L, E), experts (N, L, k) -> mean recall@k."""
    top = scores.topk(k, -1).indices  # (N, L, k)
    return (top[..., :, None] == experts[..., None, :]).any(-1).float().mean().item()


def main(path: str) -> None:
    torch.set_num_threads(2)
    ts = load_traces(TRACES)
    m = ts.meta
    split = split_indices(ts.prompt_ids, {"train": 0.8, "val": 0.2}, seed=0)
    tt, te, tl = stack_rows(ts.select(split["train"]))
    vt, ve, vl = stack_rows(ts.select(split["val"]))
    model = load_model(path)
    h = model.config.lookahead
    logits, s = [], 0
    with torch.inference_mode():
        for n in vl:
            ids, ex = torch.from_numpy(vt[s : s + n])[None], torch.from_numpy(ve[s : s + n])[None]
            logits.append(model(ids, ex)[0])
            s += n
    logits, experts = torch.cat(logits), torch.from_numpy(ve)
    print(f"predictor: held-out recall@{m.top_k} {recall(logits, experts, m.top_k):.4f}", flush=True)
    sequences = np.repeat(ts.prompt_ids[split["train"]], tl)
    for size in (10**9, 128, 64):
        t0 = time.time()
        bank = RoutingBank(m.vocab_size, m.num_moe_layers, m.num_experts, m.top_k, h, 2.0, 0.7, 1, size=size)
        bank.fill_from_rows(tt, te, sequences)
        # each held-out token alone (a one-token sequence): the bank's rows only, no recent rows
        vote = torch.cat(
            [bank.sequence_votes(torch.from_numpy(vt[i : i + 2048])[:, None], experts[i : i + 2048, None])[:, 0]
             for i in range(0, len(vt), 2048)]
        )
        alone = recall(vote + 1e-4 * vote.mean((0,), keepdim=True), experts, m.top_k)
        blend = recall(logits + 0.5 * torch.log(vote + 0.02), experts, m.top_k)
        label = "all" if size > len(tt) else str(size)
        print(f"bank {label} per token ({bank.rows} rows): vote alone {alone:.4f}, blend {blend:.4f}, "
              f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python research/bank_signal.py PREDICTOR(.safetensors|.ckpt)")
    main(sys.argv[1])
