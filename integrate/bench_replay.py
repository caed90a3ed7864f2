"""Trace-replay benchmark: real expert transfers, routing forced from a recorded trace.

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
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from integrate.runtime.cache import ExpertCache
from integrate.runtime.counters import Counters
from integrate.runtime.prefetch import CoOccurrence, LayerAhead, Prefetcher, TokenAhead, cooccurrence_counts
from integrate.runtime.store import ExpertLayout, ExpertStore

METHODS = ("lru", "cooc", "predictor", "oracle", "resident")


@dataclass
class ReplayData:
    """Held-out sequences to replay and co-occurrence counts fitted on the training split."""

    num_layers: int
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    tokens: list[np.ndarray]  # per sequence (T,)
    experts: list[np.ndarray]  # per sequence (T, L, k)
    cooc_train: np.ndarray  # (L-1, E, E)
    source: str = ""
    notes: dict = field(default_factory=dict)


def load_replay_data(path: str | Path) -> ReplayData:
    """From a trace directory (held-out = "val" of split_indices(..., seed=0)) or a `.npz` made by `save_npz`."""
    path = Path(path)
    if path.suffix == ".npz":
        z = np.load(path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        offsets = z["offsets"]
        cut = lambda a: [a[s:e] for s, e in zip(offsets[:-1], offsets[1:])]
        return ReplayData(
            tokens=cut(z["tokens"].astype(np.int64)),
            experts=cut(z["experts"].astype(np.int64)),
            cooc_train=z["cooc_train"],
            **meta,
        )
    from predictor.traces import load_traces, split_indices

    ts = load_traces(path)
    m = ts.meta
    split = split_indices(ts.prompt_ids, {"train": 0.8, "val": 0.2}, seed=0)
    train = np.concatenate([ts.record(int(i)).experts for i in split["train"]])
    val = [ts.record(int(i)) for i in split["val"]]
    shape = m.expert_shape or {"hidden": 2048, "intermediate": 1408}
    return ReplayData(
        num_layers=m.num_moe_layers,
        num_experts=m.num_experts,
        top_k=m.top_k,
        hidden=int(shape["hidden"]),
        intermediate=int(shape["intermediate"]),
        tokens=[r.token_ids for r in val],
        experts=[r.experts for r in val],
        cooc_train=cooccurrence_counts(train, m.num_moe_layers, m.num_experts).astype(np.float32),
        source=f"{path} (val split, seed 0)",
    )


def save_npz(data: ReplayData, path: str | Path, max_tokens: int | None = None) -> Path:
    """The replayed slice as one small file (e.g. to carry to a GPU machine without `datasets`)."""
    tokens, experts, n = [], [], 0
    for t, e in zip(data.tokens, data.experts):
        if max_tokens is not None and n >= max_tokens:
            break
        tokens.append(t)
        experts.append(e)
        n += len(t)
    meta = dict(
        num_layers=data.num_layers,
        num_experts=data.num_experts,
        top_k=data.top_k,
        hidden=data.hidden,
        intermediate=data.intermediate,
        source=data.source,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        meta=json.dumps(meta),
        tokens=np.concatenate(tokens).astype(np.int32),
        experts=np.concatenate(experts).astype(np.uint8 if data.num_experts <= 256 else np.int16),
        offsets=np.cumsum([0] + [len(t) for t in tokens]),
        cooc_train=data.cooc_train.astype(np.float32),
    )
    return path


def synthetic_data(
    num_layers=4, num_experts=16, top_k=2, hidden=64, intermediate=48, seqs=4, length=24, seed=0
):
    """Skewed, temporally correlated random routing (for smoke tests without traces)."""
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(num_experts, 0.3), size=num_layers)  # (L, E)

    def seq():
        out = np.empty((length, num_layers, top_k), dtype=np.int64)
        for t in range(length):
            for layer in range(num_layers):
                out[t, layer] = rng.choice(num_experts, size=top_k, replace=False, p=popularity[layer])
        return out

    train = np.concatenate([seq() for _ in range(seqs)])
    return ReplayData(
        num_layers,
        num_experts,
        top_k,
        hidden,
        intermediate,
        tokens=[rng.integers(0, 100, length) for _ in range(seqs)],
        experts=[seq() for _ in range(seqs)],
        cooc_train=cooccurrence_counts(train, num_layers, num_experts).astype(np.float32),
        source="synthetic",
    )


class Oracle(Prefetcher):
    """Prefetch the token's true experts before its forward (perfect token-ahead prediction)."""

    def __init__(self, cache: ExpertCache, num_layers: int, top_k: int):
        super().__init__(cache, num_layers, top_k)
        self.truth: np.ndarray | None = None  # (L, k), set by the replay loop before begin_step

    def begin_step(self, token_ids: torch.Tensor) -> None:
        super().begin_step(token_ids)
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
            driver.begin_step(torch.tensor([token_id]))
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
    if method == "cooc":
        drv = CoOccurrence(cache, L, E, k, budget)
        drv.counts += data.cooc_train
        return drv
    if method == "oracle":
        return Oracle(cache, L, k)
    if method == "predictor":
        cls = TokenAhead if predictor.config.mode == "token_ahead" else LayerAhead
        return cls(cache, predictor, budget, threshold)
    return None


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
                if isinstance(driver, Oracle):
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
    predictors = {}  # label -> loaded predictor; one "predictor" row per file
    paths = [predictor_path] if isinstance(predictor_path, (str, Path)) else list(predictor_path or [])
    if "predictor" in methods and not paths:
        log("no predictor file given: the 'predictor' rows are skipped")
    if "predictor" in methods:
        from predictor.export import load_predictor

        for path in paths:
            p = load_predictor(path, map_location=device)
            c = p.config
            if (c.num_layers, c.num_experts) != (data.num_layers, data.num_experts):
                raise ValueError(
                    f"{path}: predictor is for L={c.num_layers}, E={c.num_experts}; traces have "
                    f"L={data.num_layers}, E={data.num_experts}"
                )
            predictors[Path(path).stem] = p
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
    f"{'pf issued/used/wasted':>22} {'GB/tok':>7} {'pred ms/step':>12}"
)


def format_row(r: dict) -> str:
    pf = f"{r['prefetches_issued']}/{r['prefetches_used']}/{r['prefetches_wasted']}"
    cap = "all" if r["method"] == "resident" else f"{r['capacity']:.0%}"
    name = r["method"]
    if r.get("predictor"):
        name = f"predictor:{r['predictor']}" + (f"@p{r['threshold']:g}" if r.get("threshold") else "")
    return (
        f"{r.get('dense_ms', 0):>8.1f} {name:<30} {cap:>8} {r['tokens_per_s']:>9.2f} {r['stall_ms_per_token']:>12.2f} "
        f"{r['hit_rate']:>8.1%} {pf:>22} {r['gb_moved_per_token']:>7.3f} {r['predictor_ms_per_step']:>12.3f}"
    )


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in rows])


def scale(data: ReplayData, layers=None, experts=None, hidden=None, intermediate=None) -> ReplayData:
    """A smaller problem from the same routing: the first `layers` MoE layers, expert ids folded
    modulo `experts` (sets may then hold fewer than k distinct experts), other matrix sizes."""
    L = min(layers or data.num_layers, data.num_layers)
    E = min(experts or data.num_experts, data.num_experts)
    if (L, E, hidden, intermediate) == (data.num_layers, data.num_experts, None, None):
        return data
    cooc = np.zeros((max(L - 1, 0), E, E), dtype=np.float32)
    src = data.cooc_train[: L - 1]
    i, j = np.meshgrid(np.arange(data.num_experts) % E, np.arange(data.num_experts) % E, indexing="ij")
    for layer in range(L - 1):
        np.add.at(cooc[layer], (i, j), src[layer])
    return ReplayData(
        L,
        E,
        data.top_k,
        hidden or data.hidden,
        intermediate or data.intermediate,
        tokens=data.tokens,
        experts=[e[:, :L] % E for e in data.experts],
        cooc_train=cooc,
        source=f"{data.source}, scaled to L={L} E={E}",
        notes=data.notes,
    )
