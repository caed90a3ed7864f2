"""Which earlier routing should the wide skip tables read? Linear models only, no context (plain torch, 1 thread).

    python research/wide_tables.py cur_all 3      # layer_ahead h=1: token t's layers l' <= l-1 -> layer l
    python research/wide_tables.py cur_last 3     # layer_ahead h=1: token t's layer l-1 only -> layer l
    python research/wide_tables.py prev_all 2     # token_ahead: token t-1's layers (all) -> layer l
    python research/wide_tables.py prev_same 2    # token_ahead: token t-1's layer l only -> layer l

Each model is a masked (L*E x L*E) table over the multi-hot routing of the chosen source, plus a
rank-64 token table, trained with the listwise softmax loss for N epochs over the Puffin train split
and scored (recall@6) on the held-out prompts. These runs chose the predictor's tables
(`predictor/model.py`). Held-out recall@6 (1 thread, about 30 s per epoch):
cur_all 66.6 % against cur_last 59.0 % after 3 epochs; prev_all 58.2 % against prev_same 52.6 % after 2.
"""

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from predictor.baselines import stack_rows
from predictor.embeddings import expert_multi_hot
from predictor.metrics import ExpertMetrics
from predictor.traces import load_traces, split_indices

TRACES = "data/big/deepseek-v2-lite-puffin"
VARIANTS = ("cur_all", "cur_last", "prev_all", "prev_same")


def flat_tokens(ts, rows):
    """-> token ids (N,), this token's multi-hot (N, L, E), previous token's (N, L, E) (zeros at row starts)."""
    tokens, experts, lengths = stack_rows(ts.select(rows))
    hot = expert_multi_hot(torch.from_numpy(experts.astype(np.int64)), ts.meta.num_experts)
    prev = torch.roll(hot, 1, 0)
    prev[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = 0
    return torch.from_numpy(tokens.astype(np.int64)), hot, prev


def source_mask(variant: str, L: int) -> torch.Tensor:
    """(L_target, L_source) 1 where the table may read source layer for target layer."""
    tgt, src = torch.arange(L)[:, None], torch.arange(L)[None, :]
    return {
        "cur_all": src <= tgt - 1,
        "cur_last": src == tgt - 1,
        "prev_all": torch.ones(L, L, dtype=torch.bool),
        "prev_same": src == tgt,
    }[variant].float()


class LinearModel:
    """Masked (L*E x L*E) table over the chosen source's multi-hot, rank-64 token table, bias."""

    def __init__(self, variant: str, vocab_size: int, L: int, E: int):
        self.L, self.E = L, E
        self.mask = source_mask(variant, L)[:, :, None, None]  # (L_tgt, L_src, 1, 1)
        self.table = torch.zeros(L, L, E, E, requires_grad=True)  # (target, source, source expert, target expert)
        self.tok_a = (0.02 * torch.randn(vocab_size, 64)).requires_grad_()
        self.tok_b = (0.02 * torch.randn(64, L * E)).requires_grad_()
        self.bias = torch.zeros(L, E, requires_grad=True)
        self.params = [self.table, self.tok_a, self.tok_b, self.bias]
        self.source = 1 if variant.startswith("cur") else 2  # index into (tokens, hot, prev)

    def logits(self, data, idx):
        routing = data[self.source][idx]  # (n, L, E)
        wide = torch.einsum("nse,tsef->ntf", routing, self.table * self.mask)
        return wide + (self.tok_a[data[0][idx]] @ self.tok_b).view(-1, self.L, self.E) + self.bias  # (n, L, E)


def fit(logits, params, train, val, k: int, epochs: int, label: str) -> None:
    """Adam on the listwise softmax loss; prints held-out recall@k after every epoch."""
    L, E = train[1].shape[1:]
    opt = torch.optim.Adam(params, lr=3e-3)
    start = time.time()
    for epoch in range(epochs):
        for idx in torch.randperm(len(train[0])).split(1024):
            target = train[1][idx]
            loss = -(target / k * F.log_softmax(logits(train, idx), -1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        metrics = ExpertMetrics(L, E, k)
        with torch.no_grad():
            for idx in torch.arange(len(val[0])).split(4096):
                experts = val[1][idx].topk(k, -1).indices  # the k routed ids back from the multi-hot
                metrics.update(logits(val, idx), experts, torch.zeros(len(idx), dtype=torch.long))
        recall = metrics.compute()[f"recall@{k}"]
        print(f"{label}: epoch {epoch + 1}, held-out recall@{k} {recall:.4f}, {time.time() - start:.0f} s", flush=True)


def load_split():
    """-> trace meta, Puffin train and held-out rows (the 80/20 prompt split, seed 0)."""
    ts = load_traces(TRACES)
    split = split_indices(ts.prompt_ids, {"train": 0.8, "val": 0.2}, seed=0)
    return ts, split["train"], split["val"]


def main(variant: str, epochs: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ts, train_rows, val_rows = load_split()
    m = ts.meta
    train, val = flat_tokens(ts, train_rows), flat_tokens(ts, val_rows)
    model = LinearModel(variant, m.vocab_size, m.num_moe_layers, m.num_experts)
    fit(model.logits, model.params, train, val, m.top_k, epochs, variant)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: python research/wide_tables.py {{{'|'.join(VARIANTS)}}} EPOCHS")
    main(sys.argv[1], int(sys.argv[2]))
