"""Runtime counters: plain numbers, readable from Python at any time (`Runtime.counters`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Counters:
    hits: int = 0  # routed accesses whose expert was resident and its copy had landed
    misses: int = 0  # routed accesses that waited for a copy (demand load, or a prefetch still in flight)
    late_prefetches: int = 0  # the part of `misses` that found its expert's prefetch still in flight
    prefetches_issued: int = 0  # prefetch copies put on the copy stream
    prefetches_used: int = 0  # issued prefetches whose expert was routed before its layer ended
    prefetches_wasted: int = 0  # issued prefetches whose layer ran without routing the expert
    demand_loads: int = 0  # synchronous loads on a miss
    host_experts: int = 0  # the part of `misses` computed on the host CPU from the store (hybrid), not copied
    bytes_moved: int = 0  # host -> device bytes, demand and prefetch
    stall_ms: float = 0.0  # time the compute stream waited for copies (device time on CUDA, wall time on CPU)
    predicted_routed: int = 0  # routed experts the prefetch driver had predicted for their sequence and layer
    routed_scored: int = 0  # routed experts of the (sequence, layer)s the driver predicts (decode steps; a worker's
    # picks back after their layer routed count as predicting none of them)
    predictor_ms: float = 0.0  # host-thread time spent on prediction (decode steps only; a worker's: its messages)
    predictions_late: int = 0  # a worker's picks back after their layer had routed, or for an earlier token (dropped)
    predictions_dropped: int = 0  # a worker's replies it dropped unsent: the host had left its reply ring full
    predictor_steps: int = 0
    decode_tokens: int = 0  # tokens produced by decode steps (one forward of one new token per sequence)
    decode_s: float = 0.0  # wall time of those decode steps
    prefill_tokens: int = 0
    prefill_s: float = 0.0

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def stall_ms_per_token(self) -> float:
        tokens = self.decode_tokens + self.prefill_tokens
        return self.stall_ms / tokens if tokens else 0.0

    @property
    def prediction_recall(self) -> float:
        """Of the routed experts of the layers the driver predicted, the share it had predicted."""
        return self.predicted_routed / self.routed_scored if self.routed_scored else 0.0

    @property
    def predictor_ms_per_step(self) -> float:
        return self.predictor_ms / self.predictor_steps if self.predictor_steps else 0.0

    def copy(self) -> Counters:
        return Counters(**asdict(self))

    def as_dict(self) -> dict:
        out = asdict(self)
        for name in ("accesses", "hit_rate", "tokens_per_s", "stall_ms_per_token", "predictor_ms_per_step",
                     "prediction_recall"):
            out[name] = getattr(self, name)
        return out

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def summary(self) -> str:
        return (
            f"hits {self.hits}  misses {self.misses} (late prefetches {self.late_prefetches})  "
            f"hit rate {self.hit_rate:.1%}\n"
            f"prefetches issued {self.prefetches_issued}  used {self.prefetches_used}  "
            f"wasted {self.prefetches_wasted}"
            + (f"  prediction recall {self.prediction_recall:.1%} ({self.predicted_routed}/{self.routed_scored})"
               if self.routed_scored else "")
            + (f"  late predictions {self.predictions_late}" if self.predictions_late else "")
            + (f"  dropped predictions {self.predictions_dropped}" if self.predictions_dropped else "")
            + "\n"
            f"bytes moved {self.bytes_moved / 2**20:.1f} MiB  stall {self.stall_ms:.1f} ms "
            f"({self.stall_ms_per_token:.2f} ms/token)  predictor {self.predictor_ms_per_step:.3f} ms/step"
            + (f"  misses run on the host {self.host_experts}" if self.host_experts else "") + "\n"
            f"decode {self.decode_tokens} tokens in {self.decode_s:.2f} s = {self.tokens_per_s:.2f} tokens/s"
        )
