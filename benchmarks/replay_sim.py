"""The simulator's prediction for each trace-replay row (benchmarks/bench_replay.py `--sim PRESET`).

Each row is simulated on the same tokens the replay ran (its warm-up, then its timed tokens: the
full run minus the warm-up part), with the runtime's own settings turned into a part-1 `Policy`:
  lru       LRU, no prefetch, copies committed in request order (the runtime is not demand-first)
  predictor the predictor's top-k per layer (scores from the same model, teacher-forced on the
            replayed routing; calibrated as the file says), cut at the schedule's threshold, the row's
            eviction (the learned one, with the file's reuse hazard, or prediction-aware LRU), `max_inflight`
  hybrid    the same, misses run on the host when that is sooner (`cpu_expert_ms` measured in the run)
  oracle    the same settings with the true routing as the prediction
  resident  every expert resident
and the preset's time model with what the run measured for the row (`time_model`): the link, the host's
time per expert, the predictor's time per step, and `dense_ms` added to the GPU's fixed time per layer.
Co-occurrence rows are not simulated ("-").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.replay_data import ReplayData
from benchmarks.replay_table import format_sim
from predictor.simulate import Policy, Predictions, PredictorScorer, simulate, time_model_from_config
from predictor.simulate.accesses import chunk_accesses
from predictor.traces import TraceRecord

CONF = Path(__file__).resolve().parents[1] / "conf"


def load_preset(name: str, overrides: list[str] = ()) -> dict:
    """A `conf/sim` preset composed by Hydra (its defaults list applied), with `sim.KEY=VALUE` overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"sim={name}", *overrides])
    return OmegaConf.to_container(cfg.sim, resolve=True)


def replayed(data: ReplayData, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The first n tokens in replay order: per sequence token ids (T,) and experts (T, L, k)."""
    tokens, experts, left = [], [], n
    for t, e in zip(data.tokens, data.experts):
        if left <= 0:
            break
        tokens.append(t[:left])
        experts.append(e[:left])
        left -= len(tokens[-1])
    return tokens, experts


class RowSimulator:
    def __init__(self, data: ReplayData, sim: dict, warmup: int, tokens: int, link_gbps: float, cpu_expert_ms: float,
                 expert_bytes: int | None = None, predictors: dict | None = None, hazard=None):
        self.data, self.warmup, self.tokens = data, warmup, tokens
        self.base = time_model_from_config(sim, {"hidden": data.hidden, "intermediate": data.intermediate}).with_overrides(
            bandwidth_GBps=link_gbps
        )
        if expert_bytes is not None:  # the replay's own (a scaled-down run's) rather than the preset's
            self.base = self.base.with_overrides(expert_bytes=expert_bytes)
        self.cpu_expert_ms = cpu_expert_ms
        self.scores = {}  # predictor label -> per-sequence (T, L, E) logits, teacher-forced
        self.modes = {}  # predictor label -> (mode, lookahead)
        self.calibrations, self.hazards = {}, {}  # predictor label -> what its file carries (or None)
        self.oracle_hazard = hazard  # the oracle rows' learned eviction's (the replay's)
        self._acc = {}  # tokens -> (Accesses, per-sequence experts)
        ids, experts = replayed(data, warmup + tokens)
        for label, model in (predictors or {}).items():
            scorer = PredictorScorer(model, label, device=str(next(model.parameters()).device))
            self.scores[label] = [scorer.scores(TraceRecord(i, t, e, 0)) for i, (t, e) in enumerate(zip(ids, experts))]
            self.modes[label] = (scorer.mode, scorer.lookahead)
            self.calibrations[label], self.hazards[label] = scorer.calibration, getattr(model, "reuse_hazard", None)

    def time_model(self, row: dict):
        """The preset's model with what the run measured for this row: the link, `dense_ms` on the GPU's
        fixed time per layer, the host's time per expert (hybrid rows) and the predictor's own time per
        decode step (spread over the layers for layer_ahead)."""
        tm = self.base.with_overrides(
            compute_ms_per_layer=self.base.compute_ms_per_layer + row.get("dense_ms", 0.0),
            cpu_expert_ms=(row.get("cpu_expert_ms") or self.cpu_expert_ms) if row["method"] == "hybrid" else 0.0,
            cpu_async=row.get("hybrid_run") == "pool",  # the host's experts on a pool, off the host thread
        )
        if row.get("link_gbps"):
            tm = tm.with_overrides(bandwidth_GBps=row["link_gbps"])
        if not row.get("predictor"):  # no predictor runs (the oracle's picks are given): none of its time
            tm = tm.with_overrides(predict_step_ms=0.0, predict_layer_ms=0.0, prediction_ms=0.0, prediction_step_ms=0.0)
        elif row.get("predictor_ms_per_step") and row.get("predictor") in self.modes:
            mode = self.modes[row["predictor"]][0]
            ms = row["predictor_ms_per_step"]
            tm = tm.with_overrides(**({"predict_step_ms": ms} if mode == "token_ahead" else
                                      {"predict_step_ms": 0.0, "predict_layer_ms": ms / self.data.num_layers}))
        return tm

    def _accesses(self, n: int):
        if n not in self._acc:
            _, experts = replayed(self.data, n)
            acc = chunk_accesses(np.concatenate(experts), np.array([len(e) for e in experts]), self.data.num_experts)
            self._acc[n] = (acc, experts)
        return self._acc[n]

    def _run(self, n: int, row: dict):
        d = self.data
        acc, experts = self._accesses(n)
        hybrid = row["method"] == "hybrid"
        tm = self.time_model(row)
        preds = None
        if row["method"] == "oracle":
            preds = Predictions.from_sequences(experts, None, "token_ahead")
        elif row.get("predictor") and row["method"] in ("predictor", "hybrid"):
            mode, h = self.modes[row["predictor"]]
            left, scores = n, []
            for s in self.scores[row["predictor"]]:
                scores.append(s[: min(left, len(s))])
                left -= len(scores[-1])
            preds = Predictions.from_scores([s for s in scores if len(s)], d.top_k, mode, h,
                                            calibration=self.calibrations.get(row["predictor"]))  # fmt: skip
        learned = row.get("policy") == "learned" and preds is not None
        policy = Policy(
            "learned" if learned else "lru", "all", hybrid=hybrid, demand_first=False,
            min_prob=row.get("threshold", 0.0), max_inflight=row.get("max_inflight") if preds is not None else None,
        )
        # a predictor row's hazard is its file's (None: the mean rate, as the runtime then uses); the oracle's the replay's
        hazard = self.hazards.get(row["predictor"]) if row.get("predictor") else self.oracle_hazard
        resident = row["method"] == "resident"
        return simulate(acc, tm, policy, 1.0 if resident else row["capacity"], predictions=preds, warm_all=resident,
                        hazard=hazard if learned else None)  # fmt: skip

    def row(self, row: dict) -> tuple[float, float] | None:
        """(tokens/s, stall ms/token) the simulator predicts for a replay row; None for co-occurrence rows
        (no model of them). A row whose predictor was not given is an error that names it."""
        if row["method"] == "cooc":
            return None
        if row.get("predictor") and row["predictor"] not in self.scores:
            raise KeyError(f"replay row {row['method']}:{row['predictor']} needs its predictor: "
                           f"give it as --predictor {row['predictor']}=FILE (loaded: {sorted(self.scores) or 'none'})")
        full, warm = self._run(self.warmup + self.tokens, row), self._run(self.warmup, row)
        return self.tokens / (full.elapsed_s - warm.elapsed_s), 1e3 * (full.stall_s - warm.stall_s) / self.tokens


def add_sim(rows, data, sim, warmup, max_tokens, link, cpu_ms, predictors, expert_bytes, log=print,
            hazard=None) -> None:  # fmt: skip
    """The simulator's prediction for every row, with the run's measured link and host expert time
    (`hazard`: the oracle rows' learned eviction's, as the replay gave it)."""
    preset = load_preset(sim) if isinstance(sim, str) else sim
    rs = RowSimulator(data, preset, warmup, max_tokens, link or preset["links"][preset["link"]], cpu_ms,
                      expert_bytes, predictors, hazard)
    for r in rows:
        if "error" in r:
            continue
        got = rs.row(r)
        r["sim_preset"] = preset.get("name", sim)
        r["sim_tokens_per_s"], r["sim_stall_ms_per_token"] = got if got else (None, None)
    log(f"measured vs simulated ({preset.get('name', sim)} preset, measured link and host expert time):")
    log(format_sim(rows))
