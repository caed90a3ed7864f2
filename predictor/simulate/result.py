"""What one simulator run reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class SimResult:
    policy: str
    capacity: float  # fraction of all L * E routed experts
    slots: int  # experts the device holds (summed over layers when per layer)
    scope: str  # "global" | "per_layer"
    tokens: int
    accesses: int
    hits: int
    stall_s: float  # summed over tokens
    compute_s: float  # GPU busy time: tokens * L * (fixed part + k x expert_ms)
    demand_loads: int  # copies of misses (the oracle schedule's every copy, each also a hit when it lands in time)
    prefetch_issued: int = 0
    prefetch_used: int = 0  # routed at the layer it was fetched for (late ones included)
    prefetch_late: int = 0  # routed, but still queued or in flight when its layer ran: a miss
    prefetch_wasted: int = 0  # evicted or left over without being routed
    prefetch_cancelled: int = 0  # dropped while still queued (its layer ran first): never copied
    prefetch_rejected: int = 0  # dropped by the policy's admission: expected value <= 0
    cpu_experts: int = 0  # misses computed on the host CPU (hybrid)
    cpu_s: float = 0.0  # the host CPU's time on them (hybrid; on the host thread also in elapsed, not in host_s)
    elapsed_s: float = 0.0  # wall time of the replay under the time model (0: stall + compute)
    host_s: float = 0.0  # host time spent issuing work (host-cost presets)
    expert_bytes: int = 0
    hits_per_layer: list = field(default_factory=list)
    accesses_per_layer: list = field(default_factory=list)
    sim_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def bytes_moved(self) -> int:
        return (self.demand_loads + self.prefetch_issued) * self.expert_bytes

    @property
    def stall_ms_per_token(self) -> float:
        return 1e3 * self.stall_s / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        total = self.elapsed_s or (self.stall_s + self.compute_s)
        return self.tokens / total if total > 0 else float("inf")

    @property
    def accesses_per_s(self) -> float:
        return self.accesses / self.sim_seconds if self.sim_seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("hit_rate", "bytes_moved", "stall_ms_per_token", "tokens_per_s", "accesses_per_s"):
            out[name] = getattr(self, name)
        out["hit_rate_per_layer"] = (  # [] where no per-layer split is known (a lower bound's count)
            np.asarray(self.hits_per_layer) / np.maximum(np.asarray(self.accesses_per_layer), 1)
        ).tolist() if self.hits_per_layer else []
        return out


def gap_closed(lru: float, best: float, value: float) -> float | None:
    """The share of the gap from LRU's `lru` to the oracle schedule's `best` that `value` closes, in stall
    per token or in time per token (where the host time a policy adds, its predictor's, counts, while in
    stall it even hides copies); None where there is no gap."""
    return (lru - value) / (lru - best) if lru > best else None
