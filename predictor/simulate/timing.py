"""The time model: what a decode step costs on the GPU, on the host, and on the link.

Three timelines per decode step (batch 1), as the runtime (integrate/runtime) runs them:
  * the GPU executes, per MoE layer, a fixed part (attention, router, shared experts, launches:
    `compute_ms_per_layer`) and then each routed expert (`expert_ms`), each expert only once its
    weights are on the device; waiting for them is *stall*;
  * the host issues that work: `host_layer_ms` per layer (overlapping the fixed part it launches),
    `host_route_ms` per layer after the router readback (waiting for the fixed part first), `host_expert_ms` per routed expert,
    `copy_issue_ms` per copy it starts; the router's top-k is read back every layer (a sync: the
    host waits for the GPU), and a predictor costs `predict_step_ms` per token (token_ahead) or
    `predict_layer_ms` per layer (layer_ahead), readback included;
  * one host -> device link at `bandwidth_GBps` moves one expert at a time, demand and prefetch
    copies alike: a started copy is never pre-empted, so a demand miss waits behind the prefetches
    already on the link: with `max_inflight` N, the host commits up to N ahead at its events (as the
    runtime does); without, an ideal engine starts one whenever the link is free.
A miss may instead run on the host CPU (`cpu_expert_ms`, hybrid execution): its output joins the
layer when the CPU is done. The host thread computes it once it has launched the layer's device experts
and launches nothing meanwhile (the runtime's `hybrid="thread"`: torch's threads on the calling thread);
with `cpu_async` a CPU pool of its own runs it, fed from the stream, and the host thread goes on (the
runtime's `hybrid="pool"`, kTransformers' design: the stream waits for the pool in a host function,
integrate/runtime/host_pool.py); the layer's output then joins `cpu_handoff_ms` after the pool is done,
and the host thread loses `cpu_host_share` of the pool's CPU time to it (the two share the cores and,
between the pool's ops, the interpreter lock: `python -m benchmarks.host_pool` measures the share).

With every host cost 0 (the default of every preset but `h100_replay` and `h200_replay`) this is the plain model: compute per layer,
copies at link speed, a prediction usable `prediction_ms` after its inputs.

`zero_latency` reproduces MoE-Beyond's simulator: copies take no time and each layer's
prediction is inserted just before the layer is accessed, so hit rate ~ recall@budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace


def expert_bytes(hidden: int, intermediate: int, num_matrices: int = 3, dtype_bytes: int = 2) -> int:
    """Bytes of one routed expert: gate, up and down projections of hidden x intermediate."""
    return int(num_matrices * hidden * intermediate * dtype_bytes)


def shape_bytes(shape: dict) -> int:
    """Bytes of an expert shape dict (a trace meta's `expert_shape`, a preset's `expert`): its recorded
    `bytes` where the recording measured them (biases included), else `expert_bytes` of its matrices."""
    if "bytes" in shape:
        return int(shape["bytes"])
    return expert_bytes(shape["hidden"], shape["intermediate"], shape.get("num_matrices", 3), shape.get("dtype_bytes", 2))


@dataclass(frozen=True)
class TimeModel:
    expert_bytes: int
    bandwidth_GBps: float  # effective host -> device, 1 GB = 1e9 bytes
    compute_ms_per_layer: float  # GPU time of a layer's fixed part (everything but routed experts)
    prediction_ms: float = 0.0  # a prediction is usable this long after its inputs (plain presets)
    # > 0: the predictor runs in a worker process, one server that takes its work in order, each piece
    # once its input is sent and the worker is free: a token's trunk step (this long; token_ahead: every
    # layer's picks then) and each layer_ahead call (prediction_ms); a worker still busy with a token's
    # calls when the next token starts skips the rest of them, as the runtime's does
    prediction_step_ms: float = 0.0
    zero_latency: bool = False
    expert_ms: float = 0.0  # GPU time of one routed expert at batch 1
    host_layer_ms: float = 0.0  # host time to issue a layer's fixed part and read its router back
    host_route_ms: float = 0.0  # host time per layer after the router readback (routing bookkeeping, the
    # grouped expert launch, end of layer): unlike host_layer_ms it cannot overlap the layer's fixed part
    host_expert_ms: float = 0.0  # host time to look up and launch one routed expert
    copy_issue_ms: float = 0.0  # host time to start one copy (slot choice, events, the copy call)
    predict_step_ms: float = 0.0  # host-blocking time of one token_ahead predictor step, readback included
    predict_layer_ms: float = 0.0  # the same for one layer_ahead per-layer prediction
    # None: an ideal copy engine keeps the prefetch queue and starts the next copy the moment the
    # link is free, and a demand copy goes ahead of every prefetch not yet started (plain presets).
    # N: the host commits up to N prefetch copies ahead at its own events, and a demand copy waits
    # behind them (the runtime does this with 8: h100_replay)
    max_inflight: int | None = None
    cpu_expert_ms: float = 0.0  # one routed expert computed on the host CPU instead (0: no hybrid)
    cpu_async: bool = False  # True: CPU-run experts on a pool of their own, the host thread free (module doc)
    cpu_handoff_ms: float = 0.0  # cpu_async: a layer's CPU output joins the stream this long after the pool is done
    cpu_host_share: float = 0.0  # cpu_async: the share of the pool's CPU time the host thread loses to it

    def __post_init__(self):
        if not (0 < self.expert_bytes < math.inf and 0 < self.bandwidth_GBps < math.inf):  # also refuses NaN
            raise ValueError(f"expert_bytes and bandwidth_GBps must be positive and finite, got {self.expert_bytes}, "
                             f"{self.bandwidth_GBps}")  # fmt: skip
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_ms") or f.name == "compute_ms_per_layer":
                if not 0 <= value < math.inf:  # also refuses NaN
                    raise ValueError(f"sim.{f.name} must be >= 0 and finite, got {value}")
        if not 0 <= self.cpu_host_share <= 1:
            raise ValueError(f"sim.cpu_host_share must be in [0, 1], got {self.cpu_host_share}")
        m = self.max_inflight
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)
                              or m != int(m) or m < 1):  # fmt: skip
            raise ValueError(f"sim.max_inflight must be a whole number >= 1 (or None), got {self.max_inflight}")

    @property
    def copy_s(self) -> float:
        """Seconds to move one expert (0 in zero-latency mode)."""
        return 0.0 if self.zero_latency else self.expert_bytes / (self.bandwidth_GBps * 1e9)

    @property
    def compute_s(self) -> float:
        return self.compute_ms_per_layer * 1e-3

    @property
    def prediction_s(self) -> float:
        return 0.0 if self.zero_latency else self.prediction_ms * 1e-3

    @property
    def host_costs(self) -> bool:
        """True when any host-side cost is modelled (the runtime-calibrated presets)."""
        return any(
            (self.host_layer_ms, self.host_route_ms, self.host_expert_ms, self.copy_issue_ms, self.predict_step_ms,
             self.predict_layer_ms)
        )

    @property
    def plain(self) -> bool:
        """No host costs and no GPU time per routed expert: a layer's misses copy back to back from the
        router readback, with nothing to overlap (what pinning's closed form assumes)."""
        return not self.host_costs and not self.expert_ms

    def with_overrides(self, **kw) -> TimeModel:
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return {**asdict(self), "copy_ms": self.copy_s * 1e3}


# preset keys that map one to one onto TimeModel fields
_FIELDS = (
    "prediction_ms",
    "prediction_step_ms",
    "expert_ms",
    "host_layer_ms",
    "host_route_ms",
    "host_expert_ms",
    "copy_issue_ms",
    "predict_step_ms",
    "predict_layer_ms",
    "cpu_expert_ms",
    "cpu_handoff_ms",
    "cpu_host_share",
)


def time_model_from_config(sim: dict, expert_shape: dict | None) -> TimeModel:
    """Build from a `conf/sim` preset; a preset without `expert` takes the trace meta's expert_shape."""
    shape = sim.get("expert") or expert_shape
    if not shape:
        raise ValueError(
            "the sim preset has no `expert` shape and the trace meta has no expert_shape; pick a preset (sim=...)"
        )
    link = sim["link"]
    if link not in sim["links"]:
        raise ValueError(f"sim.link={link!r} is not one of {sorted(sim['links'])}")
    extra = {key: float(sim[key]) for key in _FIELDS if sim.get(key) is not None}
    if sim.get("max_inflight") is not None:
        extra["max_inflight"] = int(sim["max_inflight"])
    return TimeModel(
        expert_bytes=shape_bytes(shape),
        bandwidth_GBps=float(sim["links"][link]),
        compute_ms_per_layer=float(sim["compute_ms_per_layer"]),
        zero_latency=bool(sim.get("zero_latency", False)),
        cpu_async=bool(sim.get("cpu_async", False)),
        **extra,
    )
