"""Is the demo model's routing learned? Compare it with a random-weight twin on the same prompts.

    python -m integrate.demo_report --model data/demo/model --prompts data/demo/prompts.jsonl

Per MoE layer, for the trained model and for a freshly initialised model of the same config:
router entropy (bits, mean over tokens of H(softmax(router logits)); log2 E = no preference),
load balance (entropy of expert usage / log2 E; 1 = perfectly even), previous-token overlap
(|S_t ∩ S_t-1| / k), and recall@k of two simple predictors fitted on the train split of the prompts
and scored on the held-out split: `predictor.baselines`' global frequency and token table (experts
seen with the current token id, smoothed towards frequency; frequency for unseen ids). Routing is read through the public
`output_router_logits` API (top-k of the softmax is exactly what OLMoE dispatches).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from predictor.atomic import write_text_atomic
from predictor.baselines import Frequency, TokenTable
from predictor.metrics import ExpertMetrics
from predictor.routing_stats import multi_hot, previous_token_overlap
from predictor.splits import DEFAULT_SPLIT, DEFAULT_SPLIT_SEED, split_indices, token_key
from predictor.traces import TraceRecord

BASELINES = {"frequency": Frequency, "token_table": TokenTable}  # predictor.baselines, as `predictor.stats` uses


@torch.no_grad()
def route(model, tokenizer, texts: list[str]) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per prompt: token ids (T,), routed experts (T, L, k), router entropy in bits (T, L)."""
    k = model.config.num_experts_per_tok
    ids_out, experts_out, ent_out = [], [], []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        logits = model(input_ids=ids, output_router_logits=True).router_logits  # L x (T, E)
        probs = torch.stack([lg.float().softmax(-1) for lg in logits], dim=1)  # (T, L, E)
        ids_out.append(ids[0].numpy())
        experts_out.append(probs.topk(k, dim=-1).indices.numpy())
        ent_out.append(-(probs * probs.clamp_min(1e-12).log2()).sum(-1).numpy())
    return ids_out, experts_out, ent_out


def routing_figures(
    ids: list[np.ndarray],
    experts: list[np.ndarray],
    entropy: list[np.ndarray],
    num_experts: int,
    prompt_ids: np.ndarray,
) -> dict[str, list[float]]:
    """Per-layer figures (lists of length L); predictors are fitted on 'train' and scored on 'val'."""
    k = experts[0].shape[-1]
    ex = np.concatenate(experts)  # (N, L, k)
    usage = multi_hot(ex, num_experts, np.float64).mean(0) / k  # (L, E)
    keys = np.array([token_key(t) for t in ids], np.int64)  # a repeated prompt stays on the train side
    split = split_indices(prompt_ids, DEFAULT_SPLIT, seed=DEFAULT_SPLIT_SEED, keys=keys)
    train_ids = np.concatenate([ids[i] for i in split["train"]]).astype(np.int64)
    train_ex = np.concatenate([experts[i] for i in split["train"]]).astype(np.int64)
    predictors = {name: cls(num_experts).fit_arrays(train_ids, train_ex) for name, cls in BASELINES.items()}
    L = ex.shape[1]
    recalls = {name: ExpertMetrics(L, num_experts, k) for name in BASELINES}  # ties shared, as everywhere
    for i in split["val"]:
        record = TraceRecord(int(prompt_ids[i]), ids[i], experts[i], num_prefill=len(ids[i]))
        for name, predictor in predictors.items():
            recalls[name].update(torch.from_numpy(predictor.scores(record)), torch.from_numpy(experts[i]),
                                 torch.arange(len(ids[i])))  # fmt: skip
    recall = {name: m.compute()[f"recall@{k}/layer"].tolist() for name, m in recalls.items()}
    return {
        "router_entropy_bits": np.concatenate(entropy).mean(0).tolist(),
        "load_balance": (-(usage * np.log2(usage.clip(1e-12))).sum(-1) / np.log2(num_experts)).tolist(),
        "prev_token_overlap": previous_token_overlap(ex, np.array([len(e) for e in experts])).tolist(),
        "recall_frequency": recall["frequency"],
        "recall_token_table": recall["token_table"],
    }


def read_prompts(path: str | Path, max_prompts: int | None = None) -> tuple[list[str], np.ndarray]:
    """Texts and prompt ids of a prompts .jsonl ({"prompt_id": int, "text": str} per line, as
    `tools.train_demo_model prompts` writes), the first `max_prompts`; blank lines are skipped; errors
    name the file and line."""
    texts, pids = [], []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected an object with prompt_id and text, got {row!r:.60}")
            text, pid = row.get("text"), row.get("prompt_id")
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: 'text' must be a string, got {text!r:.60}")
            if not isinstance(pid, int) or isinstance(pid, bool):
                raise ValueError(f"{path}:{lineno}: 'prompt_id' must be an integer, got {pid!r:.60}")
            texts.append(text)
            pids.append(pid)
    return texts[:max_prompts], np.asarray(pids[:max_prompts], dtype=np.int64)


def report(
    model_dir: str | Path, prompts_path: str | Path, max_prompts: int | None = None, seed: int = 0
) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts, pids = read_prompts(prompts_path, max_prompts)  # before the models load: a bad file fails fast
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    twin = AutoModelForCausalLM.from_config(trained.config, dtype=torch.float32).eval()
    out = {"prompts": len(texts)}
    for name, model in (("trained", trained), ("random", twin)):
        ids, experts, ent = route(model, tokenizer, texts)
        out["tokens"] = int(sum(map(len, ids)))
        out[name] = routing_figures(ids, experts, ent, model.config.num_experts, pids)
    return out


def to_markdown(res: dict) -> str:
    cols = [
        ("router_entropy_bits", "router entropy (bits)"),
        ("load_balance", "load balance"),
        ("prev_token_overlap", "prev-token overlap"),
        ("recall_frequency", "recall@k frequency"),
        ("recall_token_table", "recall@k token table"),
    ]
    lines = ["| model | layer | " + " | ".join(c[1] for c in cols) + " |", "|" + " --- |" * (len(cols) + 2)]
    for name in ("trained", "random"):
        s = res[name]
        for layer in range(len(s[cols[0][0]])):
            lines.append(f"| {name} | {layer} | " + " | ".join(f"{s[c][layer]:.3f}" for c, _ in cols) + " |")
        lines.append(f"| {name} | mean | " + " | ".join(f"{np.mean(s[c]):.3f}" for c, _ in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m integrate.demo_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="data/demo/model")
    ap.add_argument("--prompts", default="data/demo/prompts.jsonl")
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--threads", type=int, default=1)  # shared CPUs: see tools/train_demo_model.py --threads
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = report(args.model, args.prompts, args.max_prompts)
    print(f"{res['prompts']} prompts, {res['tokens']} tokens (predictors: fit on train split, scored on val)")
    print(to_markdown(res))
    if args.json:
        write_text_atomic(args.json, json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
