"""Measured vs simulated: the runtime's H100 trace replay against the `h100_replay` time model.

    python benchmarks/sim_vs_gpu.py [--traces DIR] [--predictor FILE ...] [--fit] [sim.KEY=VALUE ...]

For every row the replay measured (conf/sim/h100_replay.yaml, `calibration`), the simulator runs
the same held-out tokens the same way (16 warm-up tokens, then 48 timed) with the runtime's own
policy: on-demand LRU; "oracle" prefetch, the true experts of the token issued at its start with
prediction-aware LRU eviction and 8 copies in flight; all experts resident. Each row prints measured
and simulated tokens/s and stall, and the error. Predictor rows (older predictors than any given
here) are compared by sign: the replay found them slower than LRU, and so must the simulator. `--fit` grid-searches the host
and GPU costs for the smallest worst-case error.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from predictor.simulate import Policy, Predictions, build_accesses, simulate, time_model_from_config
from predictor.splits import DEFAULT_SPLIT, DEFAULT_SPLIT_SEED, split_indices
from predictor.traces import load_traces

CONF = Path(__file__).resolve().parents[1] / "conf"
RUNTIME_LRU = Policy("lru", demand_first=False)  # what integrate/runtime/cache.py does today
RUNTIME_PREFETCH = Policy("lru", "all", demand_first=False)  # prediction-aware LRU, every prediction


def load_sim(overrides: list[str]) -> dict:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=["sim=h100_replay", *overrides])
    return OmegaConf.to_container(cfg.sim, resolve=True)


def replay_records(traces: str, n_tokens: int) -> list:
    """The first `n_tokens` held-out tokens in replay order (as benchmarks/bench_replay.py takes them)."""
    ts = load_traces(traces)
    out, n = [], 0
    for i in split_indices(ts.prompt_ids, DEFAULT_SPLIT, seed=DEFAULT_SPLIT_SEED)["val"]:
        rec = ts.record(int(i))
        take = min(len(rec.token_ids), n_tokens - n)
        out.append(rec.truncated(take))
        n += take
        if n >= n_tokens:
            return out
    raise ValueError(f"{traces}: fewer than {n_tokens} held-out tokens")


def run_row(records, meta, tm, method: str, capacity: float, warmup: int, tokens: int, preds=None):
    """(tokens/s, stall ms/token) of the timed tokens: the full replay minus its warm-up part."""
    L, E, k = meta.num_moe_layers, meta.num_experts, meta.top_k
    out = []
    for n in (warmup + tokens, warmup):
        recs, left = [], n
        for rec in records:
            if left <= 0:
                break
            recs.append(rec.truncated(min(left, len(rec.token_ids))))
            left -= len(recs[-1].token_ids)
        acc = build_accesses(recs, L, E, k)
        kw: dict = {}
        if method == "oracle":
            ids = [np.asarray(r.experts) for r in recs]
            kw["predictions"] = Predictions.from_sequences(ids, None, "token_ahead")
        elif method in ("token_ahead", "layer_ahead"):
            kw["predictions"] = preds.head(acc)
        res = simulate(
            acc,
            tm,
            RUNTIME_PREFETCH if "predictions" in kw else RUNTIME_LRU,
            1.0 if method == "resident" else capacity,
            warm_all=method == "resident",
            **kw,
        )
        out.append(res)
    full, warm = out
    dt = full.elapsed_s - warm.elapsed_s
    return tokens / dt, 1e3 * (full.stall_s - warm.stall_s) / tokens


def rows_table(sim: dict, records, meta, preds: dict) -> tuple[list, float]:
    cal = sim["calibration"]
    lines, worst = [], 0.0
    base = time_model_from_config(sim, meta.expert_shape)
    for dense, method, cap, tps, stall in cal["rows"]:
        tm = base.with_overrides(compute_ms_per_layer=base.compute_ms_per_layer + dense)
        s_tps, s_stall = run_row(records, meta, tm, method, cap, cal["warmup"], cal["tokens"])
        err = s_tps / tps - 1
        worst = max(worst, abs(err))
        lines.append((dense, method, cap, tps, s_tps, err, stall, s_stall, ""))
    for dense, mode, cap, tps, stall, *same_run_lru in cal.get("predictor_rows", []):
        if mode not in preds:
            continue
        tm = base.with_overrides(compute_ms_per_layer=base.compute_ms_per_layer + dense)
        s_tps, s_stall = run_row(records, meta, tm, mode, cap, cal["warmup"], cal["tokens"], preds[mode])
        lru = next(r for r in lines if r[:3] == (dense, "lru", cap))
        measured_lru = same_run_lru[0] if same_run_lru else lru[3]
        versus = f"vs LRU: measured {tps / measured_lru - 1:+.0%}, simulated {s_tps / lru[4] - 1:+.0%}"
        lines.append((dense, f"predictor {mode}", cap, tps, s_tps, s_tps / tps - 1, stall, s_stall, versus))
    return lines, worst


class PredictorRows:
    """A predictor's top-k picks over the replayed records (mode and lookahead as trained)."""

    def __init__(self, path: str, records, meta):
        from predictor.evaluation import load_model
        from predictor.simulate import PredictorScorer

        scorer = PredictorScorer(load_model(path))
        self.mode, self.lookahead = scorer.mode, scorer.lookahead
        self.scores = [scorer.scores(r) for r in records]
        self.k = meta.top_k

    def head(self, acc):
        out, left = [], acc.num_tokens
        for s in self.scores:
            out.append(s[: min(left, len(s))])
            left -= len(out[-1])
            if left <= 0:
                break
        return Predictions.from_scores(out, self.k, self.mode, self.lookahead)


def fit(sim: dict, records, meta) -> dict:
    grid = {
        "host_layer_ms": [0.35, 0.40, 0.45, 0.50, 0.55],
        "host_expert_ms": [0.10, 0.12, 0.14, 0.16],
        "copy_issue_ms": [0.0, 0.03, 0.06, 0.1],
        "compute_ms_per_layer": [0.02, 0.05, 0.1],
        "expert_ms": [0.01, 0.02, 0.05],
    }
    best = (float("inf"), None)
    for values in itertools.product(*grid.values()):
        trial = {**sim, **dict(zip(grid, values))}
        _, worst = rows_table(trial, records, meta, {})
        if worst < best[0]:
            best = (worst, dict(zip(grid, values)))
    print(f"best worst-case error {best[0]:.1%}: {best[1]}")
    return {**sim, **best[1]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default="data/big/deepseek-v2-lite-puffin")
    ap.add_argument("--predictor", nargs="*", default=[], help="exported predictors for the predictor rows")
    ap.add_argument("--fit", action="store_true", help="grid-search the host and GPU costs first")
    ap.add_argument("overrides", nargs="*", help="sim.KEY=VALUE overrides of the preset")
    args = ap.parse_args(argv)
    sim = load_sim(args.overrides)
    cal = sim["calibration"]
    records = replay_records(args.traces, cal["warmup"] + cal["tokens"])
    meta = load_traces(args.traces).meta
    preds = {}
    for path in args.predictor:
        p = PredictorRows(path, records, meta)
        preds[p.mode] = p
    if args.fit:
        sim = fit(sim, records, meta)
    lines, worst = rows_table(sim, records, meta, preds)
    print(f"{'dense ms':>8} {'method':<22} {'capacity':>8} {'tok/s meas.':>11} {'tok/s sim.':>10} "
          f"{'error':>7} {'stall meas.':>11} {'stall sim.':>10}")
    for dense, method, cap, tps, s_tps, err, stall, s_stall, label in lines:
        print(f"{dense:>8g} {method:<22} {cap:>8.0%} {tps:>11.1f} {s_tps:>10.1f} {err:>+7.1%} {stall:>11.1f} "
              f"{s_stall:>10.1f} {label}")
    print(f"worst error over the {len(cal['rows'])} fitted rows: {worst:.1%} (target: within 15 %)")


if __name__ == "__main__":
    main()
