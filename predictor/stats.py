"""Per-layer routing statistics of a trace set and the heuristic baselines' held-out recall.

    python -m predictor.stats TRACE_DIR [--split-seed 0] [--json out.json] [--lookahead H] [--baselines NAME ...]
        [--train-data OTHER_TRACE_DIR] [--max-sequences N]

Per MoE layer, over all rows: how skewed expert popularity is (top-1 and top-k share of routed
slots, Gini, max/mean load), the entropy of the load distribution in bits (log2 E when uniform),
and how many of a token's experts the previous token also used (|S_t ∩ S_t-1| / k).
Then every baseline of `predictor.baselines` is fitted on the train prompts and scored on the
held-out "val" prompts of `split_indices(..., DEFAULT_SPLIT, seed)` (predictor/splits.py). With
`--train-data` they are fitted on the train prompts of that other trace set (same model, same token
space: a mismatch is refused) and scored on every row of TRACE_DIR (e.g. a foreign prompt set).
Rows stream: the statistics and the fits read a chunk of rows at a time (predictor/chunks.py), the
scoring one row at a time, so memory does not grow with the trace set (`--max-sequences N` scores the
first N held-out rows only, for a quick look at a large set).

On a terminal: rich tables, and a progress bar per baseline on stderr. Piped or redirected: the same
tables as plain Markdown (never cut to a console width), and no progress output.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

from .atomic import write_json_atomic
from .baselines import all_baselines, fit_all
from .chunks import row_chunks
from .cli import positive_int
from .config import check_lookahead
from .progress import progress_bars
from .routing_stats import layer_counts, previous_token_overlap_sums
from .splits import DEFAULT_SPLIT, DEFAULT_SPLIT_SEED, check_nonempty, shared_prefix_tokens, split_indices
from .token_space import check_token_space
from .traces import TraceSet, load_traces

SHARED_OPENING = 16  # tokens a held-out prompt shares with a train prompt's opening past a common greeting


def gini(loads: np.ndarray) -> np.ndarray:
    """Gini coefficient along the last axis: 0 = perfectly balanced, (E-1)/E = one expert takes all."""
    x = np.sort(loads, axis=-1)
    n = x.shape[-1]
    cum = np.cumsum(x, axis=-1)
    return (n + 1 - 2 * (cum.sum(-1) / np.maximum(cum[..., -1], 1e-12))) / n


def per_layer_stats(experts: np.ndarray, lengths: np.ndarray, num_experts: int) -> dict[str, np.ndarray]:
    """Per-layer arrays (L,) describing expert load and temporal reuse."""
    overlap, pairs = previous_token_overlap_sums(experts, lengths)
    return _layer_stats(layer_counts(experts, num_experts), len(experts), overlap, pairs, experts.shape[-1])


def streamed_layer_stats(data: TraceSet, num_experts: int) -> tuple[dict[str, np.ndarray], int]:
    """(`per_layer_stats` of every row of `data`, tokens), read a chunk of rows at a time: equal values."""
    counts, tokens, overlap, pairs, k = 0, 0, 0.0, 0, data.meta.top_k
    for chunk in row_chunks(data):
        counts = counts + layer_counts(chunk.experts, num_experts)
        tokens += len(chunk.tokens)
        o, p = previous_token_overlap_sums(chunk.experts, chunk.lengths)
        overlap, pairs = overlap + o, pairs + p
    if not tokens:
        raise ValueError(f"{data.path}: no rows")
    return _layer_stats(counts, tokens, overlap, pairs, k), tokens


def _layer_stats(counts: np.ndarray, tokens: int, overlap: np.ndarray, pairs: int, k: int) -> dict[str, np.ndarray]:
    """From the sums: routed counts (L, E) over `tokens` tokens, previous-token overlap sums (L,) over `pairs`."""
    num_experts = counts.shape[1]
    share = (counts / tokens).astype(np.float32).astype(np.float64) / k  # (L, E), rows sum to 1
    ranked = -np.sort(-share, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(share > 0, share * np.log2(share), 0.0), axis=-1)
    return {
        "top1_share": ranked[:, 0],
        "topk_share": ranked[:, :k].sum(-1),
        "gini": gini(share),
        "max_over_mean": ranked[:, 0] * num_experts,
        "entropy_bits": entropy,
        "prev_token_overlap": overlap / max(pairs, 1) / k,
    }


def _recall_sums(scores: np.ndarray, experts: np.ndarray, k: int) -> np.ndarray:
    """Per-layer sum over tokens of recall@k: (T, L, E) scores, (T, L, k_true) experts -> (L,).

    Minimal on purpose (predictor.metrics holds the official metrics); numpy keeps the baseline
    report free of torch's thread pool, which crawls on an oversubscribed CPU.
    """
    if np.isnan(scores).any():  # it would tie with nothing (as the metrics refuse it too)
        raise ValueError("scores contain NaN")
    kth = np.partition(scores, scores.shape[-1] - k, axis=-1)[..., -k, None]  # (T, L, 1) the k-th largest score
    above, tied = (scores > kth).sum(-1, keepdims=True), (scores == kth).sum(-1, keepdims=True)
    mine = np.take_along_axis(scores, experts, -1)  # (T, L, k_true)
    # ties are shared (docs/DESIGN.md): an expert tied at the cut is found with the share of the cut's places left
    found = (mine > kth) + (mine == kth) * ((k - above) / tied)
    return found.mean(-1).sum(0)


def recall_ks(top_k: int, num_experts: int) -> tuple[int, ...]:
    """k = top_k, and a prefetch budget of twice that where the model has enough experts."""
    return tuple(sorted({top_k, min(2 * top_k, num_experts)}))


def baseline_recall(
    ts: TraceSet, split_seed: int, lookahead: int = 1, names: list[str] | None = None,
    train_ts: TraceSet | None = None, track=None, max_sequences: int | None = None,
) -> tuple[dict, dict]:
    """Fit every baseline (or those in `names`) on train prompts, score val prompts -> ({name: result}, split info).
    With `train_ts`: fit on its train prompts, score every row of `ts`. `track(rows, description=...)`
    wraps each baseline's pass over the val rows (a progress bar's `track`). Fits stream the train rows
    in one pass (baselines.fit_all), scoring reads a val row at a time; `max_sequences`: the first N val rows."""
    m = ts.meta
    check_lookahead(lookahead, m.num_moe_layers, key="--lookahead")  # h >= L leaves no layer to predict
    if train_ts is not None:
        shape, other = (m.num_moe_layers, m.num_experts, m.top_k), (train_ts.meta.num_moe_layers,
                                                                    train_ts.meta.num_experts, train_ts.meta.top_k)
        if shape != other:
            raise ValueError(f"--train-data {train_ts.path} has (L, E, k) = {other}, {ts.path} has {shape}")
        check_token_space(m.token_space, str(ts.path), train_ts.meta.token_space, f"--train-data {train_ts.path}")
    chosen = all_baselines(m.num_experts, lookahead)
    if names:
        unknown = sorted(set(names) - {b.name for b in chosen})
        if unknown:
            raise ValueError(f"--baselines: unknown {unknown}; choose from {[b.name for b in chosen]}")
        chosen = [b for b in chosen if b.name in names]
    ks = recall_ks(m.top_k, m.num_experts)
    if train_ts is None:
        split = check_nonempty(split_indices(ts.prompt_ids, DEFAULT_SPLIT, seed=split_seed, keys=ts.prompt_keys),
                               str(ts.path))  # fmt: skip
    else:
        split = {"train": split_indices(train_ts.prompt_ids, DEFAULT_SPLIT, seed=split_seed)["train"],
                 "val": np.arange(len(ts))}
    if max_sequences is not None:
        if max_sequences < 1:
            raise ValueError(f"--max-sequences must be >= 1, got {max_sequences}")
        split["val"] = split["val"][:max_sequences]
    fit_ts = ts if train_ts is None else train_ts
    train = fit_ts.select(split["train"])  # views: nothing read until a pass reads it
    fit_all(chosen, train)
    val = ts.select(split["val"])  # a view: rows are read as they are scored
    val_tokens = int(val.lengths.sum())
    results = {}
    for baseline in chosen:
        sums = {k: np.zeros(m.num_moe_layers) for k in ks}
        for rec in val if track is None else track(val, description=f"scoring {baseline.name}"):
            scores = baseline.scores(rec)
            for k in ks:
                sums[k] += _recall_sums(scores, rec.experts, k)
        results[baseline.name] = {
            "mode": baseline.mode,
            "lookahead": baseline.lookahead,
            **{f"recall@{k}": float(sums[k].sum() / (val_tokens * m.num_moe_layers)) for k in ks},
            f"recall@{m.top_k}/layer": (sums[m.top_k] / val_tokens).tolist(),
        }
    shared = shared_prefix_tokens(val, train)  # (val rows,) opening tokens a train row has
    # by prompt tokens: with --train-data nothing else keeps the fitted prompts out of the scored ones
    in_train = len(np.unique(val.prompt_ids[np.isin(val.prompt_keys, train.prompt_keys)]))  # val prompts, as counted
    if in_train:
        warnings.warn(f"{in_train} of the prompts scored in {ts.path} are train prompts of {fit_ts.path}: "
                      "the baselines' recall is not a held-out figure", stacklevel=2)
    info = {
        "seed": split_seed,
        "train_prompts": len(np.unique(fit_ts.prompt_ids[split["train"]])),
        "train_data": str(fit_ts.path),
        "val_prompts": len(np.unique(ts.prompt_ids[split["val"]])),
        "val_tokens": int(val_tokens),
        "val_prompts_in_train": in_train,  # 0 unless --train-data shares prompts with the scored set
        # held-out tokens whose whole prefix a train row starts with (their routing is one training saw), and
        # those in rows sharing >= SHARED_OPENING tokens with a train row (more than a common opening)
        "val_tokens_shared_prefix": int(shared.sum()),
        "val_tokens_shared_opening": int(shared[shared >= SHARED_OPENING].sum()),
        "val_prompts_shared_opening": len(np.unique(val.prompt_ids[shared >= SHARED_OPENING])),
    }
    return results, info


def compute_stats(
    ts: TraceSet, split_seed: int = DEFAULT_SPLIT_SEED, baselines: bool = True, lookahead: int = 1, names: list[str] | None = None,
    train_ts: TraceSet | None = None, progress: bool = False, max_sequences: int | None = None,
) -> dict:
    """Everything the CLI prints, as plain JSON-able values (per-layer values are lists of length L);
    `names` limits the baselines to those; `train_ts` fits them on another trace set (see baseline_recall);
    `progress`: a bar per baseline on stderr, when that is a terminal (predictor/progress.py);
    `max_sequences`: score the first N val rows only."""
    m = ts.meta
    per_layer, tokens = streamed_layer_stats(ts, m.num_experts)  # a chunk of rows at a time
    out = {
        "dataset": {
            "path": str(ts.path),
            "source_model": m.source_model,
            "sequences": len(ts),
            "tokens": tokens,
            "moe_layers": list(m.moe_layers),
            "num_experts": m.num_experts,
            "top_k": m.top_k,
            "max_entropy_bits": float(np.log2(m.num_experts)),
        },
        "layers": {key: value.tolist() for key, value in per_layer.items()},
        "mean": {key: float(value.mean()) for key, value in per_layer.items()},
    }
    if baselines:
        with progress_bars(enabled=progress) as bars:
            out["baselines"], out["split"] = baseline_recall(ts, split_seed, lookahead, names, train_ts, bars.track,
                                                             max_sequences)
    return out


def _layer_frame(moe_layers: list[int], columns: dict[str, tuple[list[float], str]]):
    """One row per MoE layer plus a mean row; `columns` maps header -> (per-layer values, format)."""
    import pandas as pd

    rows = [[str(layer), *(format(v[i], fmt) for v, fmt in columns.values())] for i, layer in enumerate(moe_layers)]
    rows.append(["mean", *(format(float(np.mean(v)), fmt) for v, fmt in columns.values())])
    return pd.DataFrame(rows, columns=["layer", *columns])


def _show(console, title: str, frame, mean_row: bool = False, text_columns: int = 0) -> None:
    """A rich table on a terminal; plain Markdown otherwise (piped or redirected: never cut to the
    console width). The first `text_columns` columns are left-aligned in Markdown."""
    if console.is_terminal:
        from rich.table import Table

        table = Table(title=title)
        for i, col in enumerate(frame.columns):
            table.add_column(col, justify="left" if i < text_columns else "right")
        for i, row in enumerate(frame.itertuples(index=False)):
            table.add_row(*row, end_section=mean_row and i == len(frame) - 2)
        console.print(table)
        return
    align = ["left"] * text_columns + ["right"] * (len(frame.columns) - text_columns)
    console.out(f"\n### {title}\n\n" + frame.to_markdown(index=False, disable_numparse=True, colalign=align),
                highlight=False)  # fmt: skip


def print_stats(stats: dict, console=None) -> None:
    """The tables of `compute_stats` on `console` (default: stdout): rich tables on a terminal, Markdown otherwise."""
    import pandas as pd
    from rich.console import Console

    d, layers, k = stats["dataset"], stats["layers"], stats["dataset"]["top_k"]
    console = console or Console()
    head = (f"{d['path']}: {d['source_model']}, {d['sequences']:,} sequences, {d['tokens']:,} tokens, "
            f"{len(d['moe_layers'])} MoE layers, top-{k} of {d['num_experts']} experts")  # fmt: skip
    if console.is_terminal:
        console.print(head, style="bold", highlight=False)
    else:
        console.out(head, highlight=False)
    _show(console, f"Routing per MoE layer (uniform: top-{k} share {k / d['num_experts']:.1%}, "
                   f"entropy {d['max_entropy_bits']:.2f} bits)", _layer_frame(d["moe_layers"], {
        "top-1 share": (layers["top1_share"], ".1%"),
        f"top-{k} share": (layers["topk_share"], ".1%"),
        "Gini": (layers["gini"], ".3f"),
        "max/mean": (layers["max_over_mean"], ".2f"),
        "entropy bits": (layers["entropy_bits"], ".3f"),
        "prev-token overlap": (layers["prev_token_overlap"], ".1%"),
    }), mean_row=True)  # fmt: skip
    baselines = stats.get("baselines")
    if not baselines:
        return
    s = stats["split"]
    per_layer = {name: (res[f"recall@{k}/layer"], ".1%") for name, res in baselines.items()}
    _show(console, f"Baselines' recall@{k} per MoE layer on val prompts", _layer_frame(d["moe_layers"], per_layer),
          mean_row=True)  # fmt: skip
    ks = recall_ks(k, d["num_experts"])
    rows = [[name, res["mode"], str(res["lookahead"] or "-"), *(f"{res[f'recall@{x}']:.1%}" for x in ks)]
            for name, res in baselines.items()]  # fmt: skip
    shared = ""
    if "val_tokens_shared_prefix" in s:
        shared = (f"; {s['val_tokens_shared_prefix']:,} of them ({s['val_tokens_shared_prefix'] / max(s['val_tokens'], 1):.1%}) "
                  f"with their whole prefix in a train prompt, {s['val_tokens_shared_opening']:,} in the "
                  f"{s['val_prompts_shared_opening']} val prompts opening with {SHARED_OPENING}+ tokens of one")  # fmt: skip
    seen = s.get("val_prompts_in_train", 0)
    what = f"val prompts, {seen} of them train prompts too (not held out)" if seen else "held-out prompts"
    _show(console, f"Baselines on {what} (split seed {s['seed']}: {s['train_prompts']} train / "
                   f"{s['val_prompts']} val prompts, {s['val_tokens']:,} val tokens{shared})",
          pd.DataFrame(rows, columns=["baseline", "mode", "lookahead", *(f"recall@{x}" for x in ks)]), text_columns=2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m predictor.stats", description=__doc__.split("\n\n")[0])
    ap.add_argument("trace_dir", type=Path)
    ap.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED, help="seed of the prompt-level train/val split")
    ap.add_argument("--json", type=Path, default=None, help="also write the statistics to this JSON file")
    ap.add_argument("--no-baselines", action="store_true", help="only the per-layer routing statistics")
    ap.add_argument("--lookahead", type=int, default=1, help="h of the layer_ahead baselines (layers <= l - h)")
    ap.add_argument("--baselines", nargs="+", default=None, metavar="NAME", help="only these baselines (default: all)")
    ap.add_argument("--train-data", type=Path, default=None, metavar="TRACE_DIR",
                    help="fit the baselines on this trace set's train prompts; score every row of trace_dir")
    ap.add_argument("--max-sequences", type=int, default=None, metavar="N",
                    help="score the baselines on the first N held-out rows only (fits still read every train row)")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="torch and BLAS threads (default 1: steady on cores other jobs share)")
    args = ap.parse_args(argv)
    if args.max_sequences is not None and args.max_sequences < 1:
        ap.error(f"--max-sequences must be >= 1, got {args.max_sequences}")
    import torch
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency: numpy's BLAS and OpenMP pools

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    start = time.perf_counter()
    stats = compute_stats(
        load_traces(args.trace_dir), args.split_seed, baselines=not args.no_baselines, lookahead=args.lookahead,
        names=args.baselines, train_ts=None if args.train_data is None else load_traces(args.train_data),
        progress=True, max_sequences=args.max_sequences,
    )
    print_stats(stats)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, stats)
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
