"""Trace-replay benchmark: real expert transfers, routing forced from a recorded trace.

    python -m benchmarks.bench_replay [--traces TRACE_DIR | SLICE.npz] [--predictor FILE ...] [--device cuda]
        [--capacities 0.1 0.25] [--methods lru cooc predictor oracle resident] [--save-npz SLICE.npz] ...

Full-size expert shapes (default: DeepSeek-V2-Lite, 26 MoE layers x 64 experts, each gate/up/down
2048x1408 bf16 = 17.3 MB) with random weights live in the runtime's host store; tokens are replayed
one at a time (batch 1, decode order) through the runtime's cache, with per layer:
  dense stand-in for attention + shared experts (two matmuls of `dense_mb` MB of weights, plus
  `dense_ms` of fixed device time: a GPU sleep kernel, counted in clock cycles calibrated once),
  a router readback (one device -> host sync, as the real router's top-k costs),
  the trace's routed experts: fetch + gate/up/down matmuls on the token's hidden state.
So stalls are real transfer stalls, with no model weights needed. Methods compared in one run:
  lru        on-demand loading, LRU eviction (no prefetch)
  cooc       previous-layer co-occurrence prefetch (fitted on the train split, then online), LRU
  predictor  exported predictor (token_ahead or layer_ahead as trained), prediction-aware eviction
  oracle     token-ahead prefetch of the true routed experts: perfect prediction (reference only)
  resident   every expert resident on the device: the upper bound
  gate       (accepted, never run here) the cross-layer gate (`--prefetch gate` of the runtime) applies
             layer l+1's router to the real model's hidden state leaving layer l; the replay runs no
             model (random experts and inputs, routing forced from the trace), so there is no hidden
             state to feed it and any number would be made up: `--methods gate` logs that it is skipped.
             Measure it with `python -m integrate decode --prefetch gate` on the real model.
Every prefetching row reports `prediction_recall`: the share of routed experts the driver had predicted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.replay_data import ReplayData, load_replay_data, save_npz, scale, synthetic_data
from integrate.runtime.cache import ExpertCache
from integrate.runtime.counters import Counters
from integrate.runtime.drivers import check_settings, load_driver_predictor, make_prefetcher
from integrate.runtime.prefetcher import Prefetcher
from integrate.runtime.store import ExpertLayout, ExpertStore

METHODS = ("lru", "cooc", "predictor", "oracle", "resident")
NEEDS_MODEL = ("gate",)  # drivers that read the real model's hidden states: never run by the replay


class OraclePrefetcher(Prefetcher):
    """Prefetch the token's true experts before its forward (perfect token-ahead prediction)."""

    def __init__(self, cache: ExpertCache, num_layers: int, top_k: int):
        super().__init__(cache, num_layers, top_k)
        self.truth: np.ndarray | None = None  # (L, k), set by the replay loop before begin_step

    def begin_step(self, token_ids: torch.Tensor, padding=None) -> None:
        super().begin_step(token_ids, padding)
        keys = [(layer, int(e)) for layer in range(self.num_layers) for e in self.truth[layer]]
        self.cache.pool.predict(keys, replace=True)
        self.cache.prefetch(keys)


def _cycles_per_ms(device: torch.device) -> float:
    """GPU clock cycles of `torch.cuda._sleep` per millisecond, measured once."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm-up
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


class ReplayModel:
    """Random full-size experts in a host store, plus per-layer dense stand-in weights on the device."""

    def __init__(
        self, data: ReplayData, device: torch.device, dtype: torch.dtype, dense_mb: float, seed: int = 0
    ):
        self.data, self.device, self.dtype = data, device, dtype
        L, E, H, inter = data.num_layers, data.num_experts, data.hidden, data.intermediate
        gen = torch.Generator(device=device).manual_seed(seed)
        # gate and up stored stacked as one [2I, H] matrix (as transformers does): one matmul for both
        example = {
            "gate_up": torch.empty(2 * inter, H, dtype=dtype),
            "down": torch.empty(H, inter, dtype=dtype),
        }
        self.store = ExpertStore(ExpertLayout(example), L, E)
        per_layer = E * self.store.expert_bytes // torch.empty((), dtype=dtype).element_size()
        layer_bytes = E * self.store.expert_bytes
        # random weights made on the device, one layer at a time (fast even for 28.8 GB)
        for layer in range(L):
            w = torch.randn(per_layer, generator=gen, device=device, dtype=torch.float32).mul_(0.02).to(dtype)
            self.store.arena[layer * layer_bytes : (layer + 1) * layer_bytes].copy_(w.view(torch.uint8))
        d = max(1, int(dense_mb * 2**20 / (2 * H * torch.empty((), dtype=dtype).element_size())))
        self.dense = (
            [
                (
                    torch.randn(d, H, generator=gen, device=device).mul_(H**-0.5).to(dtype),
                    torch.randn(H, d, generator=gen, device=device).mul_(d**-0.5).to(dtype),
                )
                for _ in range(L)
            ]
            if dense_mb > 0
            else []
        )
        self.cycles_per_ms = _cycles_per_ms(device) if device.type == "cuda" else 0.0
        self.busy_cycles = 0.0  # per layer; set by bench() from dense_ms
        self.router = torch.randn(E, H, generator=gen, device=device).to(dtype)
        self.inputs = torch.randn(64, 1, H, generator=gen, device=device).to(dtype)

    def token(
        self, cache: ExpertCache, driver: Prefetcher | None, token_id: int, experts: np.ndarray, t: int
    ):
        """One decode step of one token; experts (L, k) forced from the trace."""
        x = self.inputs[t % len(self.inputs)]
        if driver is not None:
            driver.begin_step(torch.tensor([[token_id]]))  # (B, S) = one sequence, one token
        k = self.data.top_k
        for layer in range(self.data.num_layers):
            if self.dense:
                w1, w2 = self.dense[layer]
                x = x + F.linear(F.silu(F.linear(x, w1)), w2)
            if self.busy_cycles:  # fixed device time standing in for attention kernels (no host cost)
                torch.cuda._sleep(int(self.busy_cycles))
            # SYNC POINT, deliberately: the real router's decision reaches the host every layer
            int(F.linear(x, self.router).argmax())
            if driver is not None:
                driver.routed(layer, torch.from_numpy(experts[layer]).view(1, -1))
            y = torch.zeros_like(x)
            for e in sorted(set(experts[layer].tolist())):
                w = cache.fetch(layer, e)
                gate, up = F.linear(x, w["gate_up"]).chunk(2, dim=-1)
                y.add_(F.linear(F.silu(gate) * up, w["down"]), alpha=1.0 / k)
            cache.end_layer(layer)
            x = F.rms_norm(x + y, (x.shape[-1],))
        if driver is not None:
            driver.end_step()
        cache.end_step()
        return x


def _driver(method, cache, data: ReplayData, predictor, budget, threshold):
    L, E, k = data.num_layers, data.num_experts, data.top_k
    if method == "oracle":
        return OraclePrefetcher(cache, L, k)
    prefetch = method if method in ("cooc", "predictor") else "none"  # lru, resident: no prefetch
    return make_prefetcher(
        prefetch, cache, L, E, k, predictor=predictor, budget=budget, threshold=threshold, cooc_counts=data.cooc_train
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
) -> dict:
    data, device = model.data, model.device
    total = data.num_layers * data.num_experts
    slots = total if method == "resident" else max(1, round(capacity * total))
    policy = "predictor" if method in ("predictor", "oracle") else "lru"
    counters = Counters()
    cache = ExpertCache(model.store, slots, device, policy, max_inflight=max_inflight, counters=counters)
    if method == "resident":
        cache.warm((layer, e) for layer in range(data.num_layers) for e in range(data.num_experts))
    driver = _driver(method, cache, data, predictor, budget, threshold)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n, timed_s = 0, 0.0
    with torch.no_grad():
        for seq_tokens, seq_experts in zip(data.tokens, data.experts):
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
                if n >= warmup:
                    timed_s += time.perf_counter() - t0
                    counters.decode_tokens += 1
                n += 1
                if n >= warmup + max_tokens:
                    break
            if n >= warmup + max_tokens:
                break
    counters.decode_s = timed_s
    out = {
        "method": method,
        "capacity": capacity if method != "resident" else 1.0,
        "slots": slots,
        "policy": policy,
    }
    out.update(counters.as_dict())
    out["gb_moved_per_token"] = counters.bytes_moved / max(1, counters.decode_tokens) / 1e9
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


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
    max_inflight=8,
    threshold=0.0,
    log=print,
) -> list[dict]:
    """Every method at every capacity (and each `dense_ms`: extra device time per layer, CUDA only)."""
    device = torch.device(device)
    if device.type != "cuda" and any(dense_ms if isinstance(dense_ms, (list, tuple)) else [dense_ms]):
        raise ValueError("dense_ms (fixed device time standing in for attention) needs a CUDA device")
    for method in (m for m in methods if m in NEEDS_MODEL):
        log(f"{method}: skipped: it needs the real model's hidden states, and the replay runs no model "
            f"(use `python -m integrate decode --prefetch {method}`)")
    methods = [m for m in methods if m not in NEEDS_MODEL]
    predictors = {}  # label -> loaded predictor; one "predictor" row per file
    paths = [predictor_path] if isinstance(predictor_path, (str, Path)) else list(predictor_path or [])
    if "predictor" in methods and not paths:
        log("no predictor file given: the 'predictor' rows are skipped")
    if "predictor" in methods:
        for path in paths:
            predictors[Path(path).stem] = load_driver_predictor(
                path, data.num_layers, data.num_experts, device, data.token_space, top_k=data.top_k
            )
    thresholds = list(threshold) if isinstance(threshold, (list, tuple)) else [threshold]
    runs = [(m, None, 0.0) for m in methods if m != "predictor"]
    if "predictor" in methods:
        at = [m for m in methods if m != "predictor"].index("oracle") if "oracle" in methods else len(runs)
        runs[at:at] = [("predictor", label, p) for label in predictors for p in thresholds]
    t0 = time.perf_counter()
    model = ReplayModel(data, device, dtype, dense_mb)
    log(
        f"store: {data.num_layers}x{data.num_experts} experts of {model.store.expert_bytes / 1e6:.1f} MB "
        f"({model.store.arena.numel() / 1e9:.1f} GB, pinned={model.store.pinned}) built in {time.perf_counter() - t0:.1f} s"
    )
    if device.type == "cuda":
        log(
            f"host -> device copy of one expert: {h2d_gbps(model.store, device):.1f} GB/s (pinned, one stream)"
        )
    rows = []
    for ms in dense_ms if isinstance(dense_ms, (list, tuple)) else [dense_ms]:
        model.busy_cycles = model.cycles_per_ms * ms
        for cap in capacities:
            for method, label, p in runs:
                if method == "resident" and cap != capacities[0]:
                    continue
                row = run_one(
                    model,
                    method,
                    cap,
                    max_tokens,
                    warmup,
                    predictors.get(label),
                    budget,
                    max_inflight,
                    p,
                )
                row["dense_ms"] = ms
                row["threshold"] = p
                row["predictor"] = label
                log(format_row(row))
                rows.append(row)
    return rows


def h2d_gbps(store: ExpertStore, device: torch.device, n: int = 32) -> float:
    """Measured host -> device bandwidth for expert-sized copies (the transfer cost behind every miss)."""
    dst = torch.empty(store.expert_bytes, dtype=torch.uint8, device=device)
    dst.copy_(store.buffer(0, 0), non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(n):
        dst.copy_(store.buffer(0, i % store.num_experts), non_blocking=True)
    torch.cuda.synchronize(device)
    return n * store.expert_bytes / (time.perf_counter() - t0) / 1e9


HEADER = (
    f"{'dense ms':>8} {'method':<30} {'capacity':>8} {'tokens/s':>9} {'stall ms/tok':>12} {'hit rate':>8} "
    f"{'pf issued/used/wasted':>22} {'recall':>7} {'GB/tok':>7} {'pred ms/step':>12}"
)


def format_row(r: dict) -> str:
    pf = f"{r['prefetches_issued']}/{r['prefetches_used']}/{r['prefetches_wasted']}"
    recall = f"{r['prediction_recall']:.1%}" if r.get("routed_scored") else "-"
    cap = "all" if r["method"] == "resident" else f"{r['capacity']:.0%}"
    name = r["method"]
    if r.get("predictor"):
        name = f"predictor:{r['predictor']}" + (f"@p{r['threshold']:g}" if r.get("threshold") else "")
    return (
        f"{r.get('dense_ms', 0):>8.1f} {name:<30} {cap:>8} {r['tokens_per_s']:>9.2f} {r['stall_ms_per_token']:>12.2f} "
        f"{r['hit_rate']:>8.1%} {pf:>22} {recall:>7} {r['gb_moved_per_token']:>7.3f} {r['predictor_ms_per_step']:>12.3f}"
    )


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_replay", description=__doc__.split("\n\n")[0],
    )
    ap.add_argument("--traces", default=None, help="trace directory or .npz; default: synthetic routing")
    ap.add_argument("--predictor", nargs="+", default=None, help="exported predictor file(s): one row each")
    ap.add_argument("--device", default=None)
    ap.add_argument("--capacities", type=float, nargs="+", default=[0.10, 0.25])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + NEEDS_MODEL)
    ap.add_argument("--max-tokens", type=int, default=256, help="timed tokens per method and capacity")
    ap.add_argument("--warmup", type=int, default=32, help="untimed tokens first (fill the cache)")
    ap.add_argument("--dense-mb", type=float, default=64.0, help="per-layer dense stand-in weights (MB)")
    ap.add_argument(
        "--dense-ms",
        type=float,
        nargs="+",
        default=[0.0],
        help="extra fixed device time per layer standing in for attention (CUDA only); "
        "several values run in turn on the same store",
    )
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument(
        "--threshold",
        type=float,
        nargs="+",
        default=[0.0],
        help="predictor prefetch only for experts with probability >= this; several values: one row each",
    )
    ap.add_argument("--max-inflight", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="scale down: first N MoE layers")
    ap.add_argument("--experts", type=int, default=None, help="scale down: expert ids folded modulo N")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--intermediate", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--save-npz", default=None, help="only write the replay slice to this .npz and exit")
    ap.add_argument("--save-tokens", type=int, default=None, help="tokens kept by --save-npz")
    args = ap.parse_args(argv)

    data = synthetic_data() if args.traces is None else load_replay_data(args.traces)
    if args.save_npz:
        print(f"wrote {save_npz(data, args.save_npz, args.save_tokens)}")
        return 0
    data = scale(data, args.layers, args.experts, args.hidden, args.intermediate)
    try:  # bad settings fail before the expert store is built
        for t in args.threshold:
            check_settings(budget=args.budget, threshold=t, max_inflight=args.max_inflight, num_experts=data.num_experts)
    except ValueError as e:
        ap.error(str(e))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "device": device, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
