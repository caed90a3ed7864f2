"""Which routing-bank vote is best? (plain torch; the exploration behind `bank_recent`)

    python research/vote_variants.py [PREDICTOR.safetensors]      # PREDICTOR: a layer_ahead h=1 bank predictor

Held-out Puffin (80/20 prompt split, seed 0), layer_ahead h=1, bank built from the train split. For each
variant, recall@6 of the vote alone (layer frequency breaks ties) and, given PREDICTOR, of the predictor
with its own bank vote replaced by the variant's (no retraining). Row weights: softmax over

    beta * s_cur[r, l]  +  gamma * s_prev[r]

s_cur: decayed overlap of the current token's routing at layers <= l - h with row r's (predictor/bank.py);
s_prev: overlap of the previous token's routing with row r's previous token's, all layers summed;
own = M: the prompt's own earlier tokens t - M <= t' < t of the same id are rows too (`bank_recent`).
Session 7, with the 74.4 % predictor of session 6 (74.3 % here, on whole prompts); 16 min in all,
275 s of it for the votes, with a training run sharing the 2 cores:

    beta 2, decay 0.7 (the bank as trained)     vote 62.9 %   predictor 74.3 %
    ... + own rows, all earlier tokens          vote 66.7 %   predictor 75.2 %
    ... + own rows, 512 back                    vote 66.5 %   predictor 75.2 %
    ... + own rows, 256 back                    vote 66.2 %   predictor 75.1 %
    ... + own rows (all) + gamma 0.05           vote 67.5 %   predictor 75.5 %
    beta 1 + own rows (all) + gamma 0.05        vote 68.0 %   predictor 75.6 %
"""

import sys
import time

import numpy as np
import torch

from predictor.baselines import stack_rows
from predictor.embeddings import expert_multi_hot
from predictor.traces import load_traces, split_indices

TRACES = "data/big/deepseek-v2-lite-puffin"
H = 1
# (beta, decay, gamma, own rows M: 0 = none)
VARIANTS = [(2.0, 0.7, 0.0, 0), (2.0, 0.7, 0.0, 10**9), (2.0, 0.7, 0.0, 512), (2.0, 0.7, 0.0, 256),
            (2.0, 0.7, 0.05, 10**9), (1.0, 0.7, 0.05, 10**9)]


def previous(ids: np.ndarray, experts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each token's previous token's experts within its row (-1 at a row's first token)."""
    out = np.concatenate([np.full_like(experts[:1], -1), experts[:-1]])
    out[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = -1
    return out


def recall(scores: torch.Tensor, experts: torch.Tensor, k: int) -> float:
    top = scores.topk(k, -1).indices  # (N, L, k)
    return (top[..., None] == experts[..., None, :]).any(-1).float().mean().item()


def variant_votes(tt, te, tprev, vt, ve, vprev, vl, L, E, vocab_size) -> dict:
    order = np.argsort(tt, kind="stable")
    offs = np.concatenate([[0], np.cumsum(np.bincount(tt, minlength=vocab_size))])
    bank = expert_multi_hot(torch.from_numpy(te[order]), E).transpose(0, 1).contiguous()  # (L, N, E)
    bank_prev = expert_multi_hot(torch.from_numpy(tprev[order]), E).flatten(1)  # (N, L*E)
    hot = expert_multi_hot(torch.from_numpy(ve), E)  # (Nv, L, E)
    hot_prev = expert_multi_hot(torch.from_numpy(vprev), E).flatten(1)
    src, tgt = torch.arange(L)[:, None], torch.arange(L)[None, :]
    gap = (tgt - H - src).float()
    seq = torch.from_numpy(np.repeat(np.arange(len(vl)), vl))
    votes = {v: torch.zeros(len(vt), L, E, dtype=torch.float16) for v in VARIANTS}
    vorder = np.argsort(vt, kind="stable")
    uniq, first = np.unique(vt[vorder], return_index=True)
    bounds = np.append(first, len(vt))
    for i, v in enumerate(uniq):
        q = torch.from_numpy(vorder[bounds[i] : bounds[i + 1]])
        a, b = offs[v], offs[v + 1]
        rows, own = bank[:, a:b], hot[q].transpose(0, 1)  # (L, r, E), (L, q, E)
        ov = torch.bmm(own, rows.transpose(1, 2))  # (L, q, r)
        own_ov = torch.bmm(own, own.transpose(1, 2))  # (L, q, q)
        pov, own_pov = hot_prev[q] @ bank_prev[a:b].T, hot_prev[q] @ hot_prev[q].T
        for var in VARIANTS:
            beta, decay, gamma, m = var
            dw = beta * torch.where(gap >= 0, decay**gap, 0.0).T  # (L_tgt, L_src)
            s = (dw @ ov.flatten(1)).view(ov.shape) + gamma * pov  # (L, q, r)
            R = rows
            if m:
                earlier = (seq[q][:, None] == seq[q][None]) & (q[None] < q[:, None]) & (q[None] >= q[:, None] - m)
                s2 = ((dw @ own_ov.flatten(1)).view(own_ov.shape) + gamma * own_pov).masked_fill(~earlier, -torch.inf)
                s, R = torch.cat([s, s2], -1), torch.cat([rows, own], 1)
            if R.shape[1]:
                votes[var][q] = torch.nan_to_num(torch.bmm(s.softmax(-1), R)).transpose(0, 1).half()
    return votes, bank.mean(1)


def main(model_path: str | None) -> None:
    torch.set_num_threads(2)
    ts = load_traces(TRACES)
    m = ts.meta
    L, E, k = m.num_moe_layers, m.num_experts, m.top_k
    split = split_indices(ts.prompt_ids, {"train": 0.8, "val": 0.2}, seed=0)
    tt, te, tl = stack_rows(ts.select(split["train"]))
    vt, ve, vl = stack_rows(ts.select(split["val"]))
    t0 = time.time()
    votes, prior = variant_votes(tt, te, previous(tt, te, tl), vt, ve, previous(vt, ve, vl), vl, L, E, m.vocab_size)
    print(f"votes: {time.time() - t0:.0f} s", flush=True)
    experts = torch.from_numpy(ve)
    model = None
    if model_path:
        from predictor.evaluation import load_model

        model = load_model(model_path)
    for var, vote in votes.items():
        line = f"beta {var[0]} decay {var[1]} gamma {var[2]} own {var[3]}: vote {recall(vote.float() + 1e-4 * prior, experts, k):.4f}"
        if model is not None:
            out, s = [], 0
            with torch.inference_mode():
                for n in vl:  # whole prompts, the variant's vote in place of the bank's
                    model.bank.votes = lambda ctx, routed, stop, ring, v=vote[None, s : s + n]: v[:, :, :stop].float()
                    out.append(model(torch.from_numpy(vt[s : s + n])[None], torch.from_numpy(ve[s : s + n])[None])[0])
                    s += n
            line += f", predictor {recall(torch.cat(out), experts, k):.4f}"
        print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
