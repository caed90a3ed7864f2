"""Trace-replay benchmark: real expert transfers, routing forced from a recorded trace.

    python -m benchmarks.bench_replay [--traces TRACE_DIR | SLICE.npz] [--predictor FILE ...] [--device cuda]
        [--capacities 0.1 0.25] [--methods lru cooc predictor hybrid oracle resident] [--schedule scheduler]
        [--sim h100_replay] [--save-npz SLICE.npz] ...

Full-size expert shapes (default: DeepSeek-V2-Lite, 26 MoE layers x 64 experts, each gate/up/down
2048x1408 bf16 = 17.3 MB) with random weights live in the runtime's host store; tokens are replayed
one at a time (batch 1, decode order) through the runtime's cache; per layer (benchmarks/replay_model.py)
a dense stand-in, the router readback, then the routed experts in one grouped call over the slot
pool (`--loop`: one at a time, the old path). So stalls are real transfer stalls, with no model
weights needed. Methods compared in one run:
  lru        on-demand loading, LRU eviction (no prefetch)
  cooc       previous-layer co-occurrence prefetch (fitted on the train split, then online), LRU
  predictor  each exported predictor (token_ahead or layer_ahead as trained) under `--schedule`: the
             part-1 policy's runtime settings (integrate/runtime/drivers.py `schedule_settings`)
  hybrid     the same plus hybrid execution: a miss runs on the host CPU from the pinned store when
             that is sooner than its copy (host time per expert measured in the run); no predictor:
             LRU plus hybrid; the runtime's split (`ExpertCache.split_host`), the device part as one grouped
             call, the host part on this thread or a pool in the stream's order (`--hybrid-run thread pool`:
             one row each, integrate/runtime/host_run.py)
  oracle     the same schedule driven by the true routing (perfect token-ahead prediction)
  resident   every expert resident on the device: the upper bound
  gate       (accepted, never run here) the cross-layer gate (`--prefetch gate` of the runtime) applies
             layer l+1's router to the real model's hidden state leaving layer l; the replay runs no
             model (random experts and inputs, routing forced from the trace), so there is no hidden
             state to feed it and any number would be made up: `--methods gate` logs that it is skipped.
             Measure it with `python -m integrate decode --prefetch gate` on the real model.
Every prefetching row reports `prediction_recall`: the share of routed experts the driver had predicted.
`--sim PRESET` prints, next to each row, the simulator's tokens/s and stall for it (benchmarks/replay_sim.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from benchmarks.replay_args import METHODS, NEEDS_MODEL, check_args, check_settings_for, parser
from benchmarks.replay_data import ReplayData, load_replay_data, save_npz, scale, synthetic_data
from benchmarks.replay_model import OraclePrefetcher, ReplayModel, h2d_gbps, host_expert_ms
from benchmarks.replay_sim import add_sim
from benchmarks.replay_table import format_row, format_sim, format_table  # noqa: F401  (imported from here too)
from integrate.runtime.cache import MAX_INFLIGHT, ExpertCache
from integrate.runtime.counters import Counters
from integrate.runtime.drivers import (
    load_driver_predictor,
    make_prefetcher,
    schedule_settings,
)
from integrate.runtime.expected_use import ExpectedUse
from integrate.runtime.host_pool import pool_threads
from integrate.runtime.hybrid import HybridRule, where_it_runs
from predictor.atomic import write_json_atomic

SCHEDULED = ("predictor", "hybrid", "oracle")  # rows that run under --schedule


def _driver(method, cache, data: ReplayData, predictor, budget, threshold, predictor_device=None):
    """The row's driver; predictor_device "worker": the predictor in a worker process on the host CPU."""
    L, E, k = data.num_layers, data.num_experts, data.top_k
    if method == "oracle":
        return OraclePrefetcher(cache, L, k)
    prefetch = {"cooc": "cooc", "predictor": "predictor", "hybrid": "predictor" if predictor else "none"}
    name = prefetch.get(method, "none")
    worker = predictor_device == "worker"
    return make_prefetcher(
        name, cache, L, E, k, predictor=predictor, budget=budget, threshold=threshold, cooc_counts=data.cooc_train,
        predictor_device=None if worker else predictor_device, predictor_worker=worker and name == "predictor",
        token_space=data.token_space,
    )


def run_one(
    model: ReplayModel,
    method: str,
    capacity: float,
    max_tokens: int,
    warmup: int,
    predictor=None,
    budget=None,
    max_inflight: int = 8,
    threshold: float = 0.0,
    policy: str | None = None,
    hybrid: HybridRule | None = None,
    predictor_device=None,
    hazard=None,
) -> dict:
    """One row: `method` at `capacity` (share of all experts resident), `max_tokens` timed after `warmup`.
    hazard: the learned eviction's reuse hazard where the row's driver brings none (the oracle's)."""
    data, device = model.data, model.device
    total = data.num_layers * data.num_experts
    slots = total if method == "resident" else max(1, round(capacity * total))
    policy = policy or ("predictor" if method in SCHEDULED and (predictor is not None or method == "oracle") else "lru")
    counters = Counters()
    expected = ExpectedUse(data.num_layers, data.num_experts, data.top_k, hazard) if policy == "learned" else None
    cache = ExpertCache(model.store, slots, device, policy, max_inflight=max_inflight, counters=counters,
                        hybrid=hybrid if method == "hybrid" else None, expected=expected)
    if method == "resident":
        cache.warm((layer, e) for layer in range(data.num_layers) for e in range(data.num_experts))
    driver = _driver(method, cache, data, predictor, budget, threshold, predictor_device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n, timed_s = 0, 0.0
    try:
        with torch.no_grad():
            for seq_tokens, seq_experts in zip(data.tokens, data.experts):
                cache.new_sequence()
                if driver is not None:
                    driver.reset()
                for t in range(len(seq_tokens)):
                    if n == warmup:
                        sync()
                        counters.reset()
                    if isinstance(driver, OraclePrefetcher):
                        driver.truth = seq_experts[t]
                    t0 = time.perf_counter()
                    model.token(cache, driver, int(seq_tokens[t]), seq_experts[t], t)
                    sync()  # SYNC POINT: the token's output is complete (its logits would be sampled here)
                    cache.check_host_run()
                    if n >= warmup:
                        timed_s += time.perf_counter() - t0
                        counters.decode_tokens += 1
                    n += 1
                    if n >= warmup + max_tokens:
                        break
                if n >= warmup + max_tokens:
                    break
    finally:
        try:
            if driver is not None:
                driver.close()  # a predictor worker's process
        finally:
            cache.close_host_run()  # hybrid's pool thread (the store is the model's: the cache is not closed)
    counters.decode_s = timed_s
    out = {
        "method": method,
        "capacity": capacity if method != "resident" else 1.0,
        "slots": slots,
        "policy": policy,
        "max_inflight": max_inflight,
        "threshold": threshold,
    }
    out.update(counters.as_dict())
    out["gb_moved_per_token"] = counters.bytes_moved / max(1, counters.decode_tokens) / 1e9
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _runs(methods, predictors: dict, thresholds: list, hybrid_runs=("thread",)) -> list[tuple]:
    """(method, predictor label, threshold or None for the schedule's, where hybrid's host experts run or None)
    in table order."""
    runs = []
    for m in methods:
        labels = list(predictors) if m in ("predictor", "hybrid") and predictors else [None]
        if m == "predictor" and not predictors:
            continue
        for label in labels:
            runs += [(m, label, p, h) for p in (thresholds if label else [None])
                     for h in (hybrid_runs if m == "hybrid" else [None])]
    return runs


def bench(
    data: ReplayData,
    device="cpu",
    capacities=(0.10, 0.25),
    methods=METHODS,
    predictor_path=None,
    max_tokens=256,
    warmup=32,
    dense_mb=64.0,
    dense_ms=0.0,
    dtype=torch.bfloat16,
    budget=None,
    max_inflight=None,
    threshold=None,
    schedule="scheduler",
    eviction=None,
    grouped=True,
    sim=None,
    predictor_device=None,
    hybrid_run="thread",
    log=print,
) -> list[dict]:
    """Every method at every capacity (and each `dense_ms`: extra device time per layer, CUDA only).
    threshold None: the schedule's; a list: one predictor row per value. sim: a `conf/sim` preset name
    (or its dict): each row gets the simulator's `sim_tokens_per_s` and `sim_stall_ms_per_token`.
    eviction: the scheduled rows' eviction instead of the schedule's (`learned` or `predictor`, the
    prediction-aware LRU the runtime used before it had the learned one). hybrid_run: where the hybrid
    rows' host experts compute (integrate/runtime/host_run.py; a list: one row each)."""
    device = torch.device(device)
    if device.type != "cuda" and any(dense_ms if isinstance(dense_ms, (list, tuple)) else [dense_ms]):
        raise ValueError("dense_ms (fixed device time standing in for attention) needs a CUDA device")
    for method in (m for m in methods if m in NEEDS_MODEL):
        log(f"{method}: skipped: it needs the real model's hidden states, and the replay runs no model "
            f"(use `python -m integrate decode --prefetch {method}`)")
    methods = [m for m in methods if m not in NEEDS_MODEL]
    sched = schedule_settings(schedule)
    if eviction is not None:
        sched["policy"] = eviction
    predictors = {}  # label -> loaded predictor; one "predictor" row per file
    paths = [predictor_path] if isinstance(predictor_path, (str, Path)) else list(predictor_path or [])
    if "predictor" in methods and not paths:
        log("no predictor file given: the 'predictor' rows are skipped")
    if any(m in methods for m in ("predictor", "hybrid")):
        for path in paths:
            label = Path(path).parent.name if Path(path).stem == "predictor" else Path(path).stem
            loaded = load_driver_predictor(
                path, data.num_layers, data.num_experts,
                torch.device("cpu" if predictor_device == "worker" else predictor_device or device), data.token_space,
                top_k=data.top_k,
            )
            if loaded.config.gate_inputs:  # it reads the gate's picks: hidden states, which the replay has not
                log(f"{label}: skipped: it reads the cross-layer gate's picks (gate_inputs), which need the real "
                    "model's hidden states (use `python -m integrate decode --predictor ...`)")  # fmt: skip
                continue
            predictors[label] = loaded
    # the train split's reuse hazard a predictor file carries, for the learned eviction of the oracle rows too
    hazard = next((p.reuse_hazard for p in predictors.values() if getattr(p, "reuse_hazard", None) is not None), None)
    if hazard is None and paths and "oracle" in methods:  # an oracle row alone: the first file's
        from predictor.export import load_predictor

        hazard = load_predictor(paths[0]).reuse_hazard
    if hazard is None and "oracle" in methods and sched["policy"] == "learned":
        log("warning: the oracle rows' learned eviction has no reuse hazard (no predictor file with one): it rates "
            "every expert at the mean rate and loses recency; give --predictor FILE with a hazard")  # fmt: skip
    thresholds = list(threshold) if isinstance(threshold, (list, tuple)) else [threshold]
    runs = _runs(methods, predictors, thresholds, [hybrid_run] if isinstance(hybrid_run, str) else list(hybrid_run))
    t0 = time.perf_counter()
    model = ReplayModel(data, device, dtype, dense_mb, grouped=grouped)
    log(
        f"store: {data.num_layers}x{data.num_experts} experts of {model.store.expert_bytes / 1e6:.1f} MB "
        f"({model.store.arena.numel() / 1e9:.1f} GB, pinned={model.store.pinned}) built in {time.perf_counter() - t0:.1f} s"
    )
    link = h2d_gbps(model.store, device) if device.type == "cuda" else None
    cpu_ms = host_expert_ms(model)
    # a pool row's expert, timed on a pool with the threads install gives it (a core for a predictor worker too)
    pool_n = {label: pool_threads(predictor_worker=predictor_device == "worker" and label is not None)
              for _, label, _, h in runs if h == "pool"}
    pool_ms = {n: where_it_runs(lambda: host_expert_ms(model), "pool", n) for n in set(pool_n.values())}
    log((f"host -> device copy of one expert: {link:.1f} GB/s (pinned, one stream); " if link else "")
        + f"one expert on the host CPU ({torch.get_num_threads()} threads): {cpu_ms:.3f} ms"
        + "".join(f", on a pool of {n} threads: {ms:.3f} ms" for n, ms in sorted(pool_ms.items()))
        + f"; schedule {schedule!r}: {sched}")
    rows = []
    for ms in dense_ms if isinstance(dense_ms, (list, tuple)) else [dense_ms]:
        model.busy_cycles = model.cycles_per_ms * ms
        for cap in capacities:
            for method, label, p, hrun in runs:
                if method == "resident" and cap != capacities[0]:
                    continue
                scheduled = method in SCHEDULED and (label is not None or method == "oracle")
                n = pool_n.get(label) if hrun == "pool" else None
                rule = HybridRule(link, pool_ms[n], "pool", n) if n else HybridRule(link, cpu_ms)
                where = dict(dense_ms=ms, predictor=label, schedule=schedule if scheduled else None,
                             threshold_set=p is not None, cpu_expert_ms=rule.cpu_expert_ms, link_gbps=link,
                             **({"hybrid_run": hrun} if hrun else {}))
                try:
                    row = run_one(
                        model, method, cap, max_tokens, warmup, predictors.get(label), budget,
                        (max_inflight or sched["max_inflight"] or MAX_INFLIGHT) if scheduled else (max_inflight or MAX_INFLIGHT),
                        (sched["threshold"] if p is None else p) if scheduled else 0.0,
                        sched["policy"] if scheduled else None,
                        rule,
                        predictor_device,
                        hazard,
                    )
                except (RuntimeError, ValueError) as e:  # the row is reported as failed; the others still run
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # an error the device raised (not an OOM) stops the run here
                    row = dict(method=method, capacity=cap, threshold=p, error=f"{type(e).__name__}: {e}", **where)
                    log(format_row(row))
                    rows.append(row)
                    continue
                row.update(where)
                log(format_row(row))
                rows.append(row)
    if sim is not None:
        add_sim(rows, data, sim, warmup, max_tokens, link, cpu_ms, predictors, model.store.expert_bytes, log, hazard)
    return rows


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    check_args(ap, args)
    data = synthetic_data() if args.traces is None else load_replay_data(args.traces)
    if args.save_npz:
        print(f"wrote {save_npz(data, args.save_npz, args.save_tokens)}")
        return 0
    data = scale(data, args.layers, args.experts, args.hidden, args.intermediate)
    preset = check_settings_for(ap, args, data)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device  # resolved by check_args
    print(
        f"replaying {data.source}: L={data.num_layers} E={data.num_experts} k={data.top_k} "
        f"H={data.hidden} I={data.intermediate} on {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else "")
    )
    rows = bench(
        data,
        device=device,
        capacities=args.capacities,
        methods=args.methods,
        predictor_path=args.predictor,
        max_tokens=args.max_tokens,
        warmup=args.warmup,
        dense_mb=args.dense_mb,
        dense_ms=args.dense_ms,
        dtype=getattr(torch, args.dtype),
        budget=args.budget,
        max_inflight=args.max_inflight,
        threshold=args.threshold,
        schedule=args.schedule,
        eviction=args.eviction,
        grouped=not args.loop,
        sim=preset,
        predictor_device=args.predictor_device,
        hybrid_run=args.hybrid_run,
    )
    print(format_table(rows))
    if args.json:
        write_json_atomic(args.json, {"command": " ".join(sys.argv), "device": device, "warmup": args.warmup,
                                      "max_tokens": args.max_tokens, "rows": rows})  # fmt: skip
    failed = [r for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} row(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
