"""The policy grid: every policy at every capacity, link and compute setting, and on the H100 preset.

    python -m benchmarks.sim_grid --predictor LAYER_AHEAD.safetensors [TOKEN_AHEAD.safetensors] \
        [--traces data/big/deepseek-v2-lite-puffin] [--capacities 0.05 0.1 0.25 0.5] \
        [--cpu-expert-ms 0.13] [--max-sequences N] [--markdown grid.md] [--threads 1] \
        [--settings "pcie4 1ms" h100_replay] [--recalls 0.75 0.9] [--inflight N] [--link-weight W] [--scheduler scheduler_load] \
        [--oracle-horizons 2 3]

Held-out prompts (the 80/20 prompt split, seed 0). Settings: PCIe 4 / PCIe 5 and 0.25 / 1 ms of GPU
work per layer, for experts of the traces' shape (DeepSeek-V2-Lite's 17.3 MB for traces that record
none), and the runtime-calibrated `h100_replay` preset (`--settings` also takes any other `conf/sim`
preset, e.g. `h200_replay`; those fitted to a GPU run keep the DeepSeek-V2-Lite expert they measured). Per cell:
* on-demand LRU and Belady (no prefetch);
* each predictor under naive prefetch and under the scheduler (learned eviction + prefetch admission
  by expected value); with `--cpu-expert-ms`, the scheduler with hybrid CPU execution, and hybrid LRU
  without a predictor;
* each predictor's ceiling: the scheduler given the true experts in that predictor's mode, i.e. what
  this scheduler reaches with any predictor that knows as much, at 100 % recall; with `--recalls`,
  also a calibrated noisy oracle of each given recall@k (what recall a target needs); with
  `--candidate-oracles`, the scheduler fed the predictor's own candidates with the wrong ones removed
  (their probability 0), and with the right ones also certain (probability 1): what the gap is made of;
* the oracle schedule; the same knowing only the running token (a heuristic reference for what a
  predictor of it allows, not a bound: the ceiling rows can pass it) and, with `--oracle-horizons`, knowing H tokens (for H >= 2 an upper estimate: its eviction reads
  H - 1 tokens past each miss); the lower bound (for schedules that copy every expert they run: hybrid
  rows can pass it), and all experts resident.
Columns: hit rate, stall per token, tokens/s, the share of the LRU -> oracle schedule stall gap
closed, the same share of the gap in time per token (the predictor's host time counts there; in
stall it even hides copies), and stall and tokens/s relative to LRU. The learned eviction's reuse
hazard (per layer and gap since last use, times a factor per expert) is fitted on the train split.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from predictor.atomic import write_json_atomic, write_text_atomic
from predictor.evaluation import load_model
from predictor.evaluation_rows import check_held_out, check_predictor_shape
from predictor.export import read_predictor_meta
from predictor.simulate import (
    Predictions,
    PredictorScorer,
    build_accesses,
    lower_bound,
    simulate,
)
from predictor.simulate.policy import POLICIES, reuse_hazard
from predictor.simulate.result import gap_closed
from predictor.simulate.timing import TimeModel, shape_bytes
from predictor.splits import DEFAULT_SPLIT, DEFAULT_SPLIT_SEED, check_nonempty, split_indices
from predictor.token_space import check_token_space
from predictor.traces import load_traces

SETTINGS = {  # name -> (link GB/s, GPU ms per layer), as the deepseek_v2_lite preset of conf/sim has them
    "pcie4 1ms": (25.0, 1.0),
    "pcie4 0.25ms": (25.0, 0.25),
    "pcie5 1ms": (50.0, 1.0),
    "pcie5 0.25ms": (50.0, 0.25),
}


def link_setting(name: str, expert_shape: dict | None) -> TimeModel:
    """A PCIe setting of SETTINGS for experts of the traces' shape (DeepSeek-V2-Lite's, 17.3 MB, for
    traces that record none)."""
    gbps, ms = SETTINGS[name]
    return TimeModel(shape_bytes(expert_shape or {"hidden": 2048, "intermediate": 1408}), gbps, ms, prediction_ms=0.2)


RUNNING_TOKEN = "oracle schedule, running token known"


def preset(name: str, cpu_expert_ms: float) -> TimeModel:
    """A `conf/sim` preset's time model (`h100_replay`, `h200_replay`, ...)."""
    from benchmarks.replay_sim import load_preset
    from predictor.simulate import time_model_from_config

    sim = load_preset(name, [f"sim.cpu_expert_ms={cpu_expert_ms}"])
    return time_model_from_config(sim, None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sim_grid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default="data/big/deepseek-v2-lite-puffin")
    ap.add_argument("--predictor", nargs="+", required=True)
    ap.add_argument("--capacities", type=float, nargs="+", default=[0.05, 0.10, 0.25, 0.50])
    ap.add_argument("--cpu-expert-ms", type=float, default=0.0, help="hybrid rows (benchmarks/cpu_expert.py)")
    ap.add_argument("--candidates", type=int, default=12, help="predicted experts the scheduler weighs per row")
    ap.add_argument("--max-sequences", type=int, default=None)
    ap.add_argument("--settings", nargs="+", default=[*SETTINGS, "h100_replay"],
                    help=f"names from {list(SETTINGS)} or conf/sim presets (h100_replay, h200_replay)")
    ap.add_argument("--markdown", default=None, help="also write the table here")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recalls", type=float, nargs="*", default=[],
                    help="also the scheduler with a calibrated noisy oracle of this recall@k per predictor mode")
    ap.add_argument("--time", nargs="+", default=[], metavar="FIELD=VALUE",
                    help="override time-model fields in every setting, e.g. predict_layer_ms=0.1 (what a faster predictor buys)")
    ap.add_argument("--oracle-horizons", type=int, nargs="*", default=[], metavar="H",
                    help="also the oracle schedule knowing the routing of H tokens: the running one and H - 1 after it")
    ap.add_argument("--candidate-oracles", action="store_true",
                    help="also the scheduler on each predictor's candidates with the wrong ones dropped, and the right ones certain")
    ap.add_argument("--inflight", type=int, default=None,
                    help="the scheduler's and hybrid's cap on prefetch copies on the link (default: the policy's)")
    ap.add_argument("--scheduler", default="scheduler", choices=[n for n, p in POLICIES.items() if p.admit == "value"
                                                                 and not p.hybrid],
                    help="the policy of the scheduler rows (and, with hybrid execution, of the hybrid rows)")
    ap.add_argument("--link-weight", type=float, default=None,
                    help="the scheduler's and hybrid's admission cost of a wrong prefetch, in copies (default: the policy's)")
    args = ap.parse_args(argv)
    if not all(0 < c <= 1 for c in args.capacities):  # before the predictors score
        ap.error(f"--capacities {args.capacities}: fractions of all routed experts, in (0, 1]")
    if any(h < 1 for h in args.oracle_horizons):
        ap.error(f"--oracle-horizons: numbers of tokens >= 1, got {args.oracle_horizons}")
    from benchmarks.replay_sim import CONF

    presets = sorted(p.stem for p in (CONF / "sim").glob("*.yaml"))
    unknown = [name for name in args.settings if name not in SETTINGS and name not in presets]
    if unknown:  # before the traces load and the predictors score
        ap.error(f"--settings {unknown}: choose from {list(SETTINGS)} or the conf/sim presets {presets}")
    torch.set_num_threads(args.threads)
    try:
        timing = time_overrides(args.time)
    except ValueError as e:
        ap.error(str(e))

    ts = load_traces(args.traces)
    m = ts.meta
    split = check_nonempty(split_indices(ts.prompt_ids, DEFAULT_SPLIT, seed=DEFAULT_SPLIT_SEED, keys=ts.prompt_keys),
                           f"--traces {args.traces}")
    for path in args.predictor:  # before any work: a predictor of these traces, never scored on its own train prompts
        config, pmeta = read_predictor_meta(path)
        check_token_space(m.token_space, f"--traces {args.traces}", pmeta.get("token_space"), f"--predictor {path}")
        try:
            check_predictor_shape(config, m, f"--predictor {path}")
        except ValueError as e:
            raise SystemExit(str(e)) from None
        check_held_out(pmeta, ts, ts.select(split["val"][: args.max_sequences]),
                       f"--predictor {path} (sim_grid scores the 80/20 split's val prompts, seed 0)")
    val = [ts.record(int(i)) for i in split["val"][: args.max_sequences]]
    train = [ts.record(int(i)) for i in split["train"]]
    L, E, k = m.num_moe_layers, m.num_experts, m.top_k
    acc = build_accesses(val, L, E, k)
    hazard = reuse_hazard(build_accesses(train, L, E, k))
    override = {k: v for k, v in (("max_inflight", args.inflight), ("link_weight", args.link_weight)) if v is not None}
    sched = replace(POLICIES[args.scheduler], **override)
    hybrid = replace(sched, hybrid=True)  # the scheduler's third rule (POLICIES["hybrid"] for "scheduler")
    preds, perfect = {}, {}
    for path in args.predictor:
        t0 = time.perf_counter()
        sc = PredictorScorer(load_model(path))
        label = sc.mode if sc.mode != "layer_ahead" else f"layer_ahead h={sc.lookahead}"
        label += ", calibrated" if sc.calibration is not None else ""
        if label in preds:  # two files of one mode: told apart by their folders (or names)
            label += f" ({Path(path).parent.name if Path(path).stem == 'predictor' else Path(path).stem})"
        scores = [sc.scores(r) for r in val]
        preds[label] = (Predictions.from_scores(scores, args.candidates, sc.mode, sc.lookahead, calibration=sc.calibration),
                        Predictions.from_scores(scores, k, sc.mode, sc.lookahead, calibration=sc.calibration))  # fmt: skip
        perfect[label] = {f"ceiling {label}": Predictions.truth(acc, sc.mode, sc.lookahead)}
        perfect[label].update({f"recall {r:.0%} {label}": Predictions.truth(acc, sc.mode, sc.lookahead, recall=r)
                               for r in args.recalls})  # fmt: skip
        if args.candidate_oracles:
            perfect[label].update({f"{label}, {name}": p for name, p in candidate_oracles(preds[label][0], acc).items()})
        print(f"scored {label} ({path}) on {acc.num_tokens} held-out tokens in {time.perf_counter() - t0:.0f} s")

    settings = {name: link_setting(name, m.expert_shape) if name in SETTINGS else preset(name, args.cpu_expert_ms)
                for name in args.settings}  # fmt: skip
    rows = []
    for sname, tm in settings.items():
        if args.cpu_expert_ms:
            tm = tm.with_overrides(cpu_expert_ms=args.cpu_expert_ms)
        tm = tm.with_overrides(**timing)
        resident = simulate(acc, tm, "lru", 1.0, warm_all=True, name="all resident")
        for cap in args.capacities:
            t0 = time.perf_counter()
            cell = [simulate(acc, tm, "lru", cap), simulate(acc, tm, "belady", cap)]
            for label, (cand, top) in preds.items():
                window = 2 if cand.mode == "token_ahead" else None
                cell.append(simulate(acc, tm, "naive", cap, predictions=top, window=window, name=f"naive {label}"))
                cell.append(simulate(acc, tm, sched, cap, predictions=cand, window=window, hazard=hazard,
                                     name=f"scheduler {label}"))  # fmt: skip
                if args.cpu_expert_ms:
                    cell.append(simulate(acc, tm, hybrid, cap, predictions=cand, window=window, hazard=hazard,
                                         name=f"hybrid {label}"))  # fmt: skip
                for name, truth in perfect[label].items():  # a candidate at probability 0 is never queued
                    cell.append(simulate(acc, tm, replace(sched, min_prob=max(sched.min_prob, 1e-9)), cap,
                                         predictions=truth, window=window, hazard=hazard, name=name))  # fmt: skip
            if args.cpu_expert_ms:
                cell.append(simulate(acc, tm, "hybrid_lru", cap, name="hybrid, no predictor"))
            # what perfect knowledge of the running token alone buys with LRU eviction: copies as
            # early as slots free, but not before the token starts
            cell.append(simulate(acc, tm, "lru", cap, oracle=True, horizon=1, name="oracle copies, LRU eviction"))
            # what a predictor of the running token allows, heuristically (the ceiling rows can pass it): the
            # oracle schedule knowing that token alone (its copies, and Belady's next uses inside it; past it, the learned reuse hazard)
            cell.append(simulate(acc, tm, "belady", cap, oracle=True, horizon=1, hazard=hazard,
                                 name=RUNNING_TOKEN))  # fmt: skip
            for h in args.oracle_horizons:  # ... and knowing the h - 1 tokens after it, not yet sampled
                cell.append(simulate(acc, tm, "belady", cap, oracle=True, horizon=h, hazard=hazard,
                                     name=f"oracle schedule, {h} tokens known"))  # fmt: skip
            cell.append(simulate(acc, tm, "belady", cap, oracle=True, name="oracle schedule"))
            cell.append(lower_bound(acc, tm, cap, resident=resident))
            lru, best = cell[0].stall_ms_per_token, cell[-2].stall_ms_per_token
            lru_ms, best_ms = 1e3 / cell[0].tokens_per_s, 1e3 / cell[-2].tokens_per_s  # time per token
            for r in cell + [resident]:
                row = r.to_dict()
                row.update(setting=sname, cell_capacity=cap, lru_stall=lru, oracle_stall=best)
                row["gap_closed"] = gap_closed(lru, best, r.stall_ms_per_token)
                row["time_gap_closed"] = gap_closed(lru_ms, best_ms, 1e3 / r.tokens_per_s)  # the same in time per token
                row["stall_vs_lru"] = r.stall_ms_per_token / lru if lru else None
                row["tps_vs_lru"] = r.tokens_per_s / cell[0].tokens_per_s
                rows.append(row)
            print(f"{sname} {cap:.0%}: {time.perf_counter() - t0:.0f} s", flush=True)
    table = format_grid(rows)
    changed = {k: v for k, v in vars(sched).items() if v != getattr(POLICIES["scheduler"], k)}
    policy = f"- scheduler rows: `{args.scheduler}`" + (f" ({changed})" if changed else "")  # what the rows ran
    print(table)
    print(policy + "\n" + check_targets(rows))
    if args.markdown:
        write_text_atomic(args.markdown, table + "\n\n" + policy + "\n" + check_targets(rows) + "\n")
    if args.json:
        write_json_atomic(args.json, rows, indent=1, default=float)


def time_overrides(items: list[str]) -> dict[str, float]:
    """`--time FIELD=VALUE ...` -> TimeModel overrides; an unknown field or a missing `=` is an error naming it."""
    fields = {f.name for f in dataclass_fields(TimeModel)} - {"zero_latency"}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--time {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"--time {item!r}: {value!r} is not a number") from None
        if key == "cpu_async":  # a switch: 0 or 1
            if out[key] not in (0.0, 1.0):
                raise ValueError(f"--time {item!r}: cpu_async is 0 or 1")
            out[key] = bool(out[key])
    return out


def candidate_oracles(cand: Predictions, acc) -> dict[str, Predictions]:
    """A predictor's candidates told apart by the truth: "wrong candidates dropped" keeps the right ones
    at their own probability (the wrong at 0, after them: run under a policy with min_prob > 0 they are
    never queued), "right candidates certain" also sets the right ones to 1. Each row stays best first.
    Against the plain scheduler row, the first measures what the wrong copies cost, the second what the
    predictor's doubt about its right candidates costs."""
    right = (cand.ids[:, :, None] == (np.asarray(acc.keys) % acc.num_experts)[:, None, :]).any(-1)  # (R, B)
    out = {}
    for name, p in (("wrong candidates dropped", np.where(right, cand.probs, 0.0)), ("right candidates certain", right)):
        p = p.astype(np.float32)
        order = np.argsort(-p, axis=1, kind="stable")
        ids, probs = np.take_along_axis(cand.ids, order, 1), np.take_along_axis(p, order, 1)
        out[name] = replace(cand, ids=ids, probs=probs)
    return out


def _f(x, fmt):
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)


def format_grid(rows: list[dict]) -> str:
    out = [
        "| setting | capacity | policy | hit rate | stall ms/token | tokens/s | gap closed | time gap closed | stall / LRU "
        "| tokens/s / LRU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cap = "all" if r["policy"] == "all resident" else f"{r['cell_capacity']:.0%}"
        name = f"**{r['policy']}**" if r["policy"].startswith(("scheduler", "hybrid ")) else r["policy"]
        out.append(
            f"| {r['setting']} | {cap} | {name} | {r['hit_rate']:.1%} | {r['stall_ms_per_token']:.1f} | "
            f"{r['tokens_per_s']:.1f} | {_f(r['gap_closed'], '.0%')} | {_f(r.get('time_gap_closed'), '.0%')} | "
            f"{_f(r['stall_vs_lru'], '.2f')} | {r['tps_vs_lru']:.2f} |"
        )
    return "\n".join(out)


def check_targets(rows: list[dict]) -> str:
    """The part-1 targets, each with the rows that decide it."""
    lines = []
    sched = [r for r in rows if r["policy"].startswith("scheduler")]
    worse = [r for r in sched if r["stall_ms_per_token"] > r["lru_stall"] + 1e-9]
    slower = [r for r in sched if r.get("tps_vs_lru", 1.0) < 1.0 - 1e-9]  # the target is stall; tokens/s beside it
    lines.append(
        f"- scheduler never stalls more than LRU: {'yes' if not worse else 'NO'} "
        f"({len(sched) - len(worse)} of {len(sched)} scheduler rows)"
        + "".join(f"; {r['setting']} {r['cell_capacity']:.0%} {r['policy']}" for r in worse)
        + f"; in tokens/s {len(sched) - len(slower)} of {len(sched)} not slower than LRU"
    )
    ceiling = {(r["setting"], r["cell_capacity"], r["policy"].removeprefix("ceiling ")): r["gap_closed"]
               for r in rows if r["policy"].startswith("ceiling ")}  # fmt: skip
    causal = {(r["setting"], r["cell_capacity"]): r["gap_closed"] for r in rows if r["policy"] == RUNNING_TOKEN}
    for r in sched:
        if r["setting"] in ("pcie4 1ms", "h100_replay") and r["cell_capacity"] in (0.10, 0.25, 0.50):
            ok = (r["gap_closed"] or 0) >= 0.70
            top = ceiling.get((r["setting"], r["cell_capacity"], r["policy"].removeprefix("scheduler ")))
            reach = causal.get((r["setting"], r["cell_capacity"]))
            share = r["gap_closed"] / reach if (reach or 0) > 0 and r["gap_closed"] is not None else None
            lines.append(
                f"- {r['setting']} {r['cell_capacity']:.0%} {r['policy']}: gap closed {_f(r['gap_closed'], '.2%')} "
                f"({'meets' if ok else 'below'} 70 %; at 100 % recall {_f(top, '.0%')}; the oracle schedule knowing "
                f"the running token {_f(reach, '.0%')}, of which it reaches {_f(share, '.0%')}); in time per token "
                f"{_f(r.get('time_gap_closed'), '.0%')}"
            )
    res = {r["setting"]: r["tokens_per_s"] for r in rows if r["policy"] == "all resident"}
    for r in rows:
        if r["policy"].startswith("hybrid") and r["setting"] == "h100_replay":
            share = r["tokens_per_s"] / res[r["setting"]]
            lines.append(
                f"- hybrid {r['setting']} {r['cell_capacity']:.0%} {r['policy']}: {share:.2%} of all-resident tokens/s "
                f"({'meets' if share >= 0.9 else 'below'} 90 %{'' if r['cell_capacity'] in (0.10, 0.25) else '; the target is at 10 and 25 %'})"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
