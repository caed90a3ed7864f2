"""The time model: how long expert copies and layer computes take.

One copy engine moves one expert at a time, host -> device, at `bandwidth_GBps`; copies queue
FIFO, demand loads go ahead of queued (not yet started) prefetches, a started copy is never
interrupted. A layer computes for `compute_ms_per_layer` once all its routed experts are on the
device; waiting for them is stall. A prediction is available `prediction_ms` after its inputs
(token start in token_ahead mode, the router of layer l - h in layer_ahead mode).

`zero_latency` reproduces MoE-Beyond's simulator: copies take no time and each layer's
prediction is inserted just before the layer is accessed, so hit rate ~ recall@budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


def expert_bytes(hidden: int, intermediate: int, num_matrices: int = 3, dtype_bytes: int = 2) -> int:
    """Bytes of one routed expert: gate, up and down projections of hidden x intermediate."""
    return int(num_matrices * hidden * intermediate * dtype_bytes)


@dataclass(frozen=True)
class TimeModel:
    expert_bytes: int
    bandwidth_GBps: float  # effective host -> device, 1 GB = 1e9 bytes
    compute_ms_per_layer: float
    prediction_ms: float = 0.0
    zero_latency: bool = False

    def __post_init__(self):
        if self.expert_bytes <= 0 or self.bandwidth_GBps <= 0:
            raise ValueError(
                f"expert_bytes and bandwidth_GBps must be positive, got {self.expert_bytes}, {self.bandwidth_GBps}"
            )
        if self.compute_ms_per_layer < 0 or self.prediction_ms < 0:
            raise ValueError("compute_ms_per_layer and prediction_ms must be >= 0")

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

    def to_dict(self) -> dict:
        return {**asdict(self), "copy_ms": self.copy_s * 1e3}


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
    return TimeModel(
        expert_bytes=expert_bytes(
            shape["hidden"], shape["intermediate"], shape.get("num_matrices", 3), shape.get("dtype_bytes", 2)
        ),
        bandwidth_GBps=float(sim["links"][link]),
        compute_ms_per_layer=float(sim["compute_ms_per_layer"]),
        prediction_ms=float(sim.get("prediction_ms", 0.0)),
        zero_latency=bool(sim.get("zero_latency", False)),
    )
