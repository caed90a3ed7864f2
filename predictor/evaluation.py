"""`evaluate(cfg)`: prediction metrics and cache simulation of a predictor and the baselines.

1. Load the evaluation rows (a split of `data.path`, the held-out "val" by default, or all rows)
   and the train rows the baselines, pinning and activation matrices are fitted on.
2. Score every row with every scorer (the predictor from `ckpt_path`, .ckpt or .safetensors,
   and the baselines), `score_workers` scorers at a time: ExpertMetrics overall, per layer, by
   position; top-`budget` predictions.
3. Replay the rows (the first `simulate.max_sequences` of them) through the cache simulator: demand
   policies and prediction-driven prefetch at every capacity under the `sim` time model, plus
   zero-latency (MoE-Beyond-style) runs, on a thread pool beside step 2 (predictor/evaluation_sims.py).
Rows are never held all at once: scored a row at a time, fitted a chunk of rows at a time
(predictor/evaluation_rows.py), so memory follows the simulated rows, not the trace set.
4. Write report.json, report.md and plots to the run dir; log to W&B (offline by default).
Returns a flat dict of floats.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from predictor import baselines
from predictor.evaluation_rows import (
    check_held_out,
    check_predictor_shape,
    check_same_model,
    head,
    paths,
    select_rows,
    train_replay_stats,
)
from predictor.evaluation_sims import SimulationJobs, add_gap_closed, check_simulation  # noqa: F401 (re-exported)
from predictor.hub_traces import is_hub_uri
from predictor.metrics import ExpertMetrics, to_jsonable
from predictor.progress import progress_bars
from predictor.simulate import (
    ActivationMatrixScorer,
    CoOccurrenceScorer,
    GateAheadScorer,
    OracleScorer,
    Predictions,
    PredictorScorer,
    build_accesses,
    time_model_from_config,
)
from predictor.simulate.run import score_probs
from predictor.token_space import check_token_space
from predictor.trace_sets import load_trace_sets
from predictor.traces import TraceMeta, TraceSet, check_trace_path

log = logging.getLogger(__name__)

BASELINES = {
    "frequency": baselines.Frequency,
    "previous_token": baselines.PreviousToken,
    "token_table": baselines.TokenTable,
    "cooccurrence": CoOccurrenceScorer,
    "cooccurrence_token": baselines.CoOccurrenceToken,
    "routing_bank": baselines.RoutingBankVote,
    "routing_bank_recent": baselines.RoutingBankRecentVote,
    "moe_infinity": ActivationMatrixScorer,
    "gate_ahead": GateAheadScorer,  # the cross-layer gate's picks, where the traces recorded them
    "oracle": OracleScorer,  # perfect knowledge one token ahead: the ceiling, not a competitor
}


def ckpt_file(path: str | Path) -> Path:
    """The predictor file `ckpt_path` names (a file, or a run folder holding predictor.safetensors); the
    error names the key."""
    from predictor.export import predictor_file

    try:
        return predictor_file(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"ckpt_path: {e}") from None


def load_model(path: str | Path, device: str = "cpu", with_meta: bool = False):
    """The predictor at `ckpt_path` (an exported file or a Lightning checkpoint), on `device`
    (and its meta with `with_meta`: the trace meta it was trained on, token space included)."""
    from predictor.export import load_predictor

    model, meta = load_predictor(ckpt_file(path), with_meta=True)
    model = model.to(device).eval()
    return (model, meta) if with_meta else model


def build_scorers(cfg: DictConfig, meta: TraceMeta, train_rows: TraceSet, ckpt: str | Path | None = None,
                  held_out: tuple[TraceSet, TraceSet] | None = None) -> dict:  # fmt: skip
    """The baselines, fitted, and the predictor: `ckpt`, the file `cfg.ckpt_path` names (an artifact
    reference resolves to one, predictor/tracking.py), defaults to cfg.ckpt_path itself. `held_out`:
    (the trace set, the rows evaluated), which must not hold the predictor's train prompts."""
    predictor = None
    if cfg.ckpt_path:  # first: its checks fail before the baselines are fitted
        model, pmeta = load_model(ckpt or cfg.ckpt_path, cfg.device, with_meta=True)
        check_token_space(meta.token_space, "the evaluation traces (data.path)", pmeta.get("token_space"),
                          f"the predictor ckpt_path={cfg.ckpt_path}")
        if held_out is not None:
            check_held_out(pmeta, *held_out, f"the predictor ckpt_path={cfg.ckpt_path}", all_rows=cfg.split == "all")
        c = model.config
        check_predictor_shape(c, meta, str(cfg.ckpt_path))
        if c.gate_inputs > meta.gate_ahead:  # before any scoring: its rows would fail one by one
            raise ValueError(f"{cfg.ckpt_path}: the predictor reads {c.gate_inputs} cross-layer gate picks per layer "
                             f"(gate_inputs), the evaluation traces record {meta.gate_ahead} (collect.py "
                             f"record_gate_ahead={c.gate_inputs})")
        if meta.vocab_size is not None and meta.vocab_size > c.vocab_size:  # ids past its embedding table
            raise ValueError(f"{cfg.ckpt_path}: predictor embeds token ids < {c.vocab_size}, the evaluation traces "
                             f"use ids < {meta.vocab_size} (vocab_size): trained on another vocabulary")
        predictor = PredictorScorer(model, device=cfg.device)
    scorers = {}
    for name in cfg.baselines:
        if name not in BASELINES:
            raise ValueError(f"baselines: unknown {name!r}; choose from {sorted(BASELINES)}")
        if name == "gate_ahead" and not meta.gate_ahead:  # train rows without them: fit says so
            log.info("baseline gate_ahead left out: the traces have no cross-layer gate picks (collect.py record_gate_ahead)")
            continue
        t0 = time.perf_counter()
        scorers[name] = BASELINES[name](meta.num_experts).fit(train_rows)  # streamed: a chunk of rows at a time
        log.info("fitted %s on %d train sequences in %.1fs", name, len(train_rows), time.perf_counter() - t0)
    if predictor is not None:
        scorers["predictor"] = predictor
    return scorers


def f1_decoding(top_k: int, decode_k: int | None, threshold: float | None) -> str:
    """What the report's F1 columns decode: "top-6" per (token, layer), or "p >= 0.3"."""
    return f"p >= {threshold:g}" if threshold is not None else f"top-{decode_k or top_k}"


# the metrics of a decoding that cuts the probability at `metrics.threshold` (none for scores that only rank)
THRESHOLD_DECODED = ("precision", "recall", "f1_micro", "f1_macro_layers", "moebeyond/accuracy", "moebeyond/f1_macro01")


def score(scorer, records, meta: TraceMeta, mcfg: DictConfig, candidates: int, keep: int | None = None):
    """(metrics, per-sequence top-`candidates` expert ids and probabilities of the first `keep` rows (all:
    None; the simulator replays them), seconds spent scoring); `records` are read one at a time."""
    k = meta.top_k
    metrics = ExpertMetrics(
        meta.num_moe_layers,
        meta.num_experts,
        k,
        ks=[k * m for m in mcfg.k_multiples if k * m <= meta.num_experts],
        decode_k=mcfg.decode_k,
        threshold=mcfg.threshold,
        position_edges=mcfg.position_edges,
    )
    # the scores' probabilities, for thresholds, PR-AUC, ECE and the simulator's admission: sigmoid of the
    # predictor's logits, a baseline's own estimates of P(routed), and for the other baselines (scores >= 0:
    # odds, or ranks only) the monotone s / (1 + s), in float64 so large scores stay distinct
    own = getattr(scorer, "scores_are_probs", False)
    kind = "logits" if isinstance(scorer, PredictorScorer) else "probs" if own else "odds"
    ranks_only = kind == "odds" and not getattr(scorer, "scores_are_odds", False)
    calibration = getattr(scorer, "calibration", None)
    ids, probs, seconds, buf = [], [], 0.0, []

    def flush():
        s = np.concatenate([b[0] for b in buf])
        p = torch.sigmoid(torch.from_numpy(s)) if kind == "logits" else torch.from_numpy(score_probs(s, kind))  # (torch: threads)
        experts = torch.from_numpy(np.concatenate([b[1] for b in buf]))
        positions = torch.from_numpy(np.concatenate([np.arange(len(b[0])) for b in buf]))
        # threshold decoding cuts the probability the runtime's `threshold` cuts: the calibrated one
        decoded = p if calibration is None or metrics.threshold is None else torch.from_numpy(calibration(p.numpy()))
        metrics.update(torch.from_numpy(s), experts, positions, probs=p, decode_probs=decoded)
        buf.clear()

    for rec in records:
        t0 = time.perf_counter()
        s = scorer.scores(rec)
        seconds += time.perf_counter() - t0
        if keep is None or len(ids) < keep:
            top = Predictions.from_scores([s], candidates, scorer.mode, scorer.lookahead, kind, calibration)
            T, L = s.shape[:2]
            ids.append(top.ids.reshape(T, L, -1).astype(np.int16))
            probs.append(top.probs.reshape(T, L, -1))
        buf.append((s, rec.experts))
        if sum(len(b[0]) for b in buf) >= 4096:  # metric updates in batches of rows, not per sequence
            flush()
    if buf:
        flush()
    result = metrics.compute()  # of the raw probabilities; with a calibration, also its ECE
    if ranks_only:  # s / (1 + s) of scores that only rank is no probability: no calibration to report,
        del result["ece"], result["calibration"]  # nor a decoding that cuts it at a probability
        if metrics.threshold is not None:
            result.update({key: float("nan") for key in THRESHOLD_DECODED})
            result["f1/layer"] = np.full_like(result["f1/layer"], np.nan)
    if calibration is not None:
        result["ece_calibrated"] = calibration.ece(metrics.pos_hist.cpu().numpy(), metrics.neg_hist.cpu().numpy())
    result["position_buckets"] = metrics.position_buckets()
    return result, (ids, probs), seconds


def _score_all(cfg, scorers, records, meta, candidates, keep, preds, report, sims, bars) -> None:
    """Score every row with every scorer, `score_workers` scorers at a time (threads: the scorers'
    numpy, torch and numba work releases the GIL), the predictor first (the slowest, usually); each
    scorer's prefetch replays start once it is done. The report lists the scorers in their configured
    order whatever order they finish in."""
    def one(name, sc):
        return score(sc, bars.track(records, description=f"scoring {name}"), meta, cfg.metrics, candidates, keep)

    done = {}

    def finish(name, result):
        metrics, preds[name], seconds = result
        done[name] = metrics, seconds
        log.info("%-20s recall@%d %.4f  f1 %.4f  pr_auc %.4f", name, meta.top_k,
                 metrics[f"recall@{meta.top_k}"], metrics["f1_micro"], metrics["pr_auc"])
        if sims is not None:
            sims.ready(name)

    workers = report["data"]["score_workers"]
    if workers == 1:  # in order, in this thread
        for name, sc in scorers.items():
            finish(name, one(name, sc))
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            first = sorted(scorers, key=lambda name: name != "predictor")  # the slowest starts first
            running = {pool.submit(one, name, scorers[name]): name for name in first}
            try:
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        finish(running.pop(fut), fut.result())
            finally:
                for fut in running:  # after an error the scorers not yet started never start (the running
                    fut.cancel()     # ones finish first: a thread cannot be stopped)
    for name, sc in scorers.items():
        metrics, seconds = done[name]
        report["scorers"][name] = {
            "mode": sc.mode,
            "lookahead": sc.lookahead,
            "metrics": to_jsonable(metrics),
            "score_seconds": seconds,
            "tokens_per_s": report["data"]["tokens"] / max(seconds, 1e-9),
        }


def flat_metrics(report: dict) -> dict[str, float]:
    out = {}
    for name, s in report["scorers"].items():
        for key, value in s["metrics"].items():
            if isinstance(value, float):
                out[f"{name}/{key}"] = value
    for run in report["simulation"]:
        prefix = f"sim/{run['timing']}/{run['policy']}@{run['capacity']:.2f}"
        out[f"{prefix}/hit_rate"] = run["hit_rate"]
        out[f"{prefix}/stall_ms_per_token"] = run["stall_ms_per_token"]
        for key in ("gap_closed", "time_gap_closed"):  # the report's headline share (None: no gap to close)
            if run.get(key) is not None:
                out[f"{prefix}/{key}"] = run[key]
    return out


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run per `cfg` (conf/evaluate.yaml); returns a flat dict of floats."""
    from predictor.cli import resolve_device
    from predictor.config_schema import check_config
    from predictor.tracking import eval_run, is_artifact_ref

    check_config(cfg, "evaluate")  # `+simulate.budgets=4` and other typos: an error naming the key
    cfg.device = str(resolve_device(str(cfg.device), "device"))  # one this machine has ("auto" resolved), before any work
    for key in ("max_sequences", "simulate.max_sequences"):  # (0 read as an empty split)
        n = OmegaConf.select(cfg, key)
        if n is not None and not (isinstance(n, int) and n >= 1):
            raise ValueError(f"{key}={n!r}: the first N rows, N >= 1 (null: all)")
    if cfg.ckpt_path and not is_artifact_ref(str(cfg.ckpt_path)):  # a typo found before the traces are read
        ckpt_file(cfg.ckpt_path)
    for key in ("data.path", "train_data"):  # and before a W&B run starts
        for path in paths(OmegaConf.select(cfg, key)):
            if not is_hub_uri(path):
                check_trace_path(Path(path), key)  # as loading would
    at_once = int(cfg.threads) if cfg.get("threads") else 2  # threads=1 keeps the whole job on one core
    if cfg.get("score_workers") is None:
        cfg.score_workers = at_once
    if cfg.simulate.get("workers") is None:
        cfg.simulate.workers = at_once
    for name in cfg.simulate.prefetch:  # before any work: a typo would silently drop a prefetch scorer
        if name not in BASELINES and name != "predictor":
            raise ValueError(f"simulate.prefetch: unknown {name!r}; choose from {sorted([*BASELINES, 'predictor'])}")
    with eval_run(cfg) as run:  # W&B (None when disabled): started first, so it records the predictor as input
        return _evaluate(cfg, run)


def _evaluate(cfg: DictConfig, run) -> dict[str, float]:
    from predictor.evaluation_report import log_wandb, write_report
    from predictor.tracking import is_artifact_ref, use_predictor_artifact

    start = time.perf_counter()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    ts = load_trace_sets(paths(cfg.data.path))
    meta = ts.meta
    records = select_rows(ts, cfg.split, cfg.data.split, cfg.data.seed, cfg.max_sequences)  # views: read lazily
    same = paths(cfg.train_data) == paths(cfg.data.path)
    train_ts = ts if same else load_trace_sets(paths(cfg.train_data), "train_data")
    check_same_model(meta, train_ts.meta, f"train_data {cfg.train_data}")
    train_records = select_rows(train_ts, cfg.train_split, cfg.data.split, cfg.data.seed, None)
    replayed = head(records, cfg.simulate.get("max_sequences"))
    # by prompt tokens, not ids: train_data may hold these prompts under other ids (merged sets renumber them)
    shared = np.intersect1d(records.prompt_keys, train_records.prompt_keys)
    if len(shared) and cfg.split == "all":
        log.warning("split=all: the baselines were fitted on %d of these prompts (train_data %s)", len(shared),
                    cfg.train_data)  # fmt: skip
    elif len(shared):
        raise ValueError(f"train_split={cfg.train_split!r} of train_data {cfg.train_data} and split={cfg.split!r} of "
                         f"{ts.path} share {len(shared)} prompts: the baselines would be fitted on the rows they are "
                         "scored on; choose another train_split (or train_data), or split=all on purpose")
    log.info(
        "evaluating %d sequences of %s (%s); fitting on %d",
        len(records),
        ts.path,
        cfg.split,
        len(train_records),
    )

    tm = time_model_from_config(OmegaConf.to_container(cfg.sim, resolve=True), meta.expert_shape)
    for key, ours in (
        ("num_layers", meta.num_moe_layers),
        ("num_experts", meta.num_experts),
        ("top_k", meta.top_k),
    ):
        if cfg.sim.get(key) not in (None, ours):
            log.warning(
                "sim preset %s has %s=%s, the traces %s: its expert size is a what-if",
                cfg.sim.name,
                key,
                cfg.sim[key],
                ours,
            )

    if cfg.simulate.enabled:
        check_simulation(cfg, tm)  # before fitting and scoring: a typo fails at once
    ckpt = cfg.ckpt_path
    if is_artifact_ref(ckpt):  # wandb-artifact://...: fetched, and recorded as this run's input
        ckpt = use_predictor_artifact(run, ckpt, out_dir / "artifacts", cfg.wandb.get("mode", "offline"))
    scorers = build_scorers(cfg, meta, train_records, ckpt, held_out=(ts, records))
    budget = meta.top_k if cfg.simulate.budget is None else cfg.simulate.budget  # 0 is an error, not top_k
    if not 1 <= budget <= meta.num_experts:
        raise ValueError(f"simulate.budget={cfg.simulate.budget}: must be in [1, {meta.num_experts}] experts")
    candidates = min(meta.num_experts, max(budget, cfg.simulate.candidates))
    report = {
        "data": {
            "path": str(ts.path),
            "split": cfg.split,
            "sequences": len(records),
            "tokens": int(records.lengths.sum()),
            "source_model": meta.source_model,
            "num_moe_layers": meta.num_moe_layers,
            "num_experts": meta.num_experts,
            "top_k": meta.top_k,
            "train_data": str(train_ts.path),
            "train_split": cfg.train_split,
            "train_sequences": len(train_records),
            "simulated_sequences": len(replayed) if cfg.simulate.enabled else 0,
            "score_workers": max(1, int(cfg.get("score_workers") or 1)),  # scorers at once: their tokens/s share
        },
        "ckpt_path": cfg.ckpt_path,
        "predictor_file": str(ckpt) if ckpt else None,
        "budget": budget,
        "f1_decoding": f1_decoding(meta.top_k, cfg.metrics.decode_k, cfg.metrics.threshold),
        "window": cfg.simulate.window,
        "scorers": {},
        "simulation": [],
    }
    preds, sims = {}, None
    if cfg.simulate.enabled:  # the replays start now and run beside the scoring (evaluation_sims.py)
        acc = build_accesses(replayed, meta.num_moe_layers, meta.num_experts, meta.top_k)
        train_stats = train_replay_stats(train_records)  # counted a chunk of rows at a time
        sims = SimulationJobs(cfg, acc, tm, train_stats, scorers, preds, budget)
        report["time_model"] = {"preset": cfg.sim.name, "link": cfg.sim.link, **tm.to_dict()}
    with progress_bars() as bars:  # a bar per scorer, on a terminal only
        try:
            _score_all(cfg, scorers, records, meta, candidates, len(replayed) if sims is not None else 0, preds, report,
                       sims, bars)  # candidates kept only for the replays
            if sims is not None:
                report["simulation"] = sims.results(bars)
        finally:
            if sims is not None:
                sims.close()
    report["elapsed_s"] = time.perf_counter() - start
    metrics = flat_metrics(report)
    files = write_report(report, out_dir, plots=cfg.plots)
    log.info("report: %s", out_dir / "report.md")
    if run is not None:
        log_wandb(run, metrics, report, files)
    return metrics
