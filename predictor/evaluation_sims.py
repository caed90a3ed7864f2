"""The evaluation's cache simulations (predictor/evaluation.py): every policy at every capacity, run on
a thread pool (the compiled engine releases the GIL) while the scorers are still scoring.

`SimulationJobs` plans the runs in report order: per capacity the demand policies, the references
(oracle schedule, the same knowing only the running token, lower bound), each prefetch scorer under
each prefetch policy, then the zero-latency (MoE-Beyond-style) runs; the all-resident replay once, as
the reference row. A run is started as soon as what it reads exists: the demand policies and
references before any scorer has scored, a scorer's prefetch runs as soon as that scorer is done
(`ready`), so the replays overlap the scoring instead of waiting for all of it. Beside the scoring one worker fewer runs than
`simulate.workers`, so the replays take what the scorers leave (on 2 cores, the Puffin table: 4:43 with
the replays after the scoring, 3:41 beside it, 2:26 with the scorers two at a time, `score_workers`, and
their metrics compiled; docs/RESULTS.md section 4).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

from omegaconf import DictConfig

from predictor.simulate import DEMAND_POLICIES, POLICIES, Predictions, lower_bound, pinning, simulate
from predictor.simulate.result import gap_closed
from predictor.simulate.timing import TimeModel

log = logging.getLogger(__name__)


def check_simulation(cfg: DictConfig, tm: TimeModel) -> None:
    """The simulation settings, before any scoring: a typo fails in a second, not after the scorers."""
    scfg = cfg.simulate
    for name in scfg.prefetch_policies:
        if name in DEMAND_POLICIES:  # (hybrid_lru) a row of its own, not one per prefetch scorer
            raise ValueError(f"simulate.prefetch_policies: {name!r} reads no predictor: list it in "
                             "simulate.demand_policies")
        if name not in POLICIES:
            raise ValueError(f"simulate.prefetch_policies: unknown {name!r}; choose from {sorted(POLICIES)}")
    for policy in scfg.demand_policies:
        if policy not in DEMAND_POLICIES:
            raise ValueError(f"simulate.demand_policies: unknown {policy!r}; choose from {DEMAND_POLICIES}")
    for key in ("prefetch_policies", "demand_policies"):
        if any(n in POLICIES and POLICIES[n].hybrid for n in scfg[key]) and not tm.cpu_expert_ms > 0:
            raise ValueError(f"simulate.{key} has a hybrid policy: set sim.cpu_expert_ms > 0")
    if not scfg.candidates >= 1:
        raise ValueError(f"simulate.candidates={scfg.candidates}: the scheduler needs >= 1 predicted expert per row")


class SimulationJobs:
    """Every simulation of one evaluation. `preds[name]` (per-sequence top ids and probabilities) is read
    when a run of scorer `name` starts, so call `ready(name)` only once it is filled; `results()` waits
    for all and returns the rows in report order, with `gap_closed`. The train split gives pinning its
    frequencies and the learned eviction its reuse hazard: `train_stats` =
    evaluation_rows.train_replay_stats."""

    def __init__(self, cfg: DictConfig, acc, tm: TimeModel, train_stats: tuple, scorers: dict, preds: dict,
                 budget: int):  # fmt: skip
        check_simulation(cfg, tm)
        scfg = cfg.simulate
        train_freq, hazard = train_stats
        zero = TimeModel(tm.expert_bytes, tm.bandwidth_GBps, tm.compute_ms_per_layer, zero_latency=True)
        prefetchers = [name for name in scfg.prefetch if name in scorers]

        @functools.cache
        def candidates(name, n):  # one per (scorer, n): each is rows x n ids and probabilities
            ids, probs = preds[name]
            sc = scorers[name]
            return Predictions.from_sequences([i[..., :n] for i in ids], [p[..., :n] for p in probs], sc.mode,
                                              sc.lookahead)  # fmt: skip

        def run(scorer, model, pol, cap, n, **kw):  # a prefetch run: its candidates are built when it starts
            return simulate(acc, model, pol, cap, scfg.scope, candidates(scorer, n), **kw)

        # every expert on the GPU: one per replay, for the lower bound and as a reference row
        self.resident = simulate(acc, tm, "lru", 1.0, warm_all=True, name="all_resident") if scfg.references else None
        jobs: list[tuple[str, str | None, Callable]] = []  # (timing, scorer it reads or None, run) in report order
        for cap in scfg.capacities:
            for policy in scfg.demand_policies:
                if policy == "pinning" and not tm.plain:
                    log.info("pinning skipped: its closed form has no host costs and no GPU time per expert (sim=%s)",
                             cfg.sim.name)
                elif policy == "pinning":
                    jobs.append(("timed", None, partial(pinning, acc, tm, cap, scfg.scope, train_freq)))
                else:
                    jobs.append(("timed", None, partial(simulate, acc, tm, policy, cap, scfg.scope)))
            if scfg.references:
                jobs.append(("timed", None, partial(simulate, acc, tm, "belady", cap, scfg.scope, oracle=True,
                                                    name="oracle_schedule")))  # fmt: skip
                # what knowing the running token (any causal predictor's most) allows: docs/DESIGN.md
                jobs.append(("timed", None, partial(simulate, acc, tm, "belady", cap, scfg.scope, oracle=True, horizon=1,
                                                    hazard=hazard, name="oracle_schedule_token")))  # fmt: skip
                jobs.append(("timed", None, partial(lower_bound, acc, tm, cap, scfg.scope, self.resident)))
            for name in prefetchers:
                for pol in scfg.prefetch_policies if name != "oracle" else ["naive"]:
                    label = name if pol == "naive" else f"{name}+{pol}"
                    n = budget if pol == "naive" else scfg.candidates
                    jobs.append(("timed", name, partial(run, name, tm, pol, cap, n, window=scfg.window,
                                                        hazard=hazard, name=label)))  # fmt: skip
            if cap in scfg.zero_latency_capacities:
                for name in prefetchers:
                    jobs.append(("zero_latency", name, partial(run, name, zero, "naive", cap, budget, name=name)))
                jobs.append(("zero_latency", None, partial(simulate, acc, zero, "lru", cap, scfg.scope)))
        self.jobs = jobs
        self.futures: dict[int, Future] = {}
        self.workers = max(1, int(scfg.workers))
        self.pool = ThreadPoolExecutor(max_workers=self.workers)
        # while the scorers score, one worker fewer runs (one core stays theirs); all once they are done
        self._running = threading.Semaphore(max(1, self.workers - 1))
        self.ready(None)

    def ready(self, name: str | None) -> None:
        """Start the runs that read scorer `name`'s predictions (None: those that read none)."""
        for i, (_, needs, job) in enumerate(self.jobs):
            if needs == name and i not in self.futures:
                self.futures[i] = self.pool.submit(self._gated, job)

    def _gated(self, job):
        with self._running:
            return job()

    def results(self, bars=None) -> list[dict]:
        """Wait for every run (starting any whose scorer was never marked ready); rows in report order.
        Called once the scoring is done: every worker runs from here on."""
        for name in {needs for _, needs, _ in self.jobs}:
            self.ready(name)
        if self.workers > 1:
            self._running.release()
        futures = [self.futures[i] for i in range(len(self.jobs))]
        done = (f.result() for f in futures)
        if bars is not None:
            done = bars.track(done, total=len(futures), description="simulating")
        try:
            runs = [_record(result, timing) for (timing, _, _), result in zip(self.jobs, done)]
        finally:
            self.close()
        if self.resident is not None:
            runs.append(_record(self.resident, "reference"))
        add_gap_closed(runs)
        return runs

    def close(self) -> None:
        """Stop: runs not yet started are cancelled (an error elsewhere ends the evaluation)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def _record(result, timing: str) -> dict:
    row = result.to_dict()
    row["timing"] = timing
    log.info(
        "%-28s %-9s cap %.2f: hit %.3f, stall %.2f ms/token, %.1f tok/s (%.1fs, %.2fM accesses/s)",
        result.policy, timing, result.capacity, result.hit_rate, result.stall_ms_per_token, result.tokens_per_s,
        result.sim_seconds, result.accesses_per_s / 1e6,
    )  # fmt: skip
    return row


def add_gap_closed(runs: list[dict]) -> None:
    """gap_closed = (LRU stall - stall) / (LRU stall - oracle schedule stall), per capacity (timed runs), and
    time_gap_closed, the same in time per token (`gap_closed` of predictor/simulate/result.py)."""
    ref = {}
    for r in runs:
        if r["timing"] == "timed" and r["policy"] in ("lru", "oracle_schedule"):
            ref[(r["policy"], r["capacity"])] = r
    for r in runs:
        lru, best = ref.get(("lru", r["capacity"])), ref.get(("oracle_schedule", r["capacity"]))
        ok = r["timing"] == "timed" and lru is not None and best is not None
        r["gap_closed"] = gap_closed(*(x["stall_ms_per_token"] for x in (lru, best, r))) if ok else None
        r["time_gap_closed"] = gap_closed(*(1e3 / x["tokens_per_s"] for x in (lru, best, r))) if ok else None
