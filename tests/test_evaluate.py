"""evaluate(cfg) end to end on a tiny synthetic trace set and a tiny predictor, via the real Hydra config."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from synthetic import random_traces, tiny_predictor

from predictor.evaluation import evaluate, load_model
from predictor.export import export_predictor

ROOT = Path(__file__).resolve().parents[1]
L, E, K, V = 3, 8, 2, 40


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "tiny"
    return random_traces(path, num_layers=L, num_experts=E, top_k=K, vocab_size=V, lengths=(5, 12),
                         expert_shape={"hidden": 64, "intermediate": 32, "num_matrices": 3, "dtype_bytes": 2}).path


@pytest.fixture(scope="module")
def predictor_files(tmp_path_factory):
    model = tiny_predictor(vocab_size=V, num_layers=L, num_experts=E, top_k=K)
    cfg = model.config
    out = tmp_path_factory.mktemp("predictor")
    exported = export_predictor(model, out / "predictor.safetensors", {"source_model": "tiny"})
    ckpt = out / "last.ckpt"  # what PredictorLitModule checkpoints hold
    torch.save(
        {
            "hyper_parameters": {"net": cfg.to_dict()},
            "state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
        },
        ckpt,
    )
    return model, exported, ckpt


def _cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def test_checkpoint_and_export_load_the_same_model(predictor_files):
    model, exported, ckpt = predictor_files
    ids, ex = torch.randint(0, V, (1, 6)), torch.randint(0, E, (1, 6, L, K))
    with torch.no_grad():
        want = model(ids, ex)
        torch.testing.assert_close(load_model(exported)(ids, ex), want)
        torch.testing.assert_close(load_model(ckpt)(ids, ex), want)
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        load_model(ckpt.parent / "missing.ckpt")


def test_evaluate_end_to_end(tmp_path, traces, predictor_files):
    _, exported, _ = predictor_files
    cfg = _cfg(
        [
            f"data.path={traces}",
            f"paths.output_dir={tmp_path}",
            f"ckpt_path={exported}",
            "simulate.capacities=[0.25,0.5]",
            "simulate.zero_latency_capacities=[0.25]",
            "wandb.mode=disabled",
            "device=auto",  # resolved before the predictor loads (it reached .to("auto"))
        ]
    )
    metrics = evaluate(cfg)
    for name in ("predictor", "token_table", "moe_infinity"):
        assert 0.0 <= metrics[f"{name}/recall@{K}"] <= 1.0
    assert metrics["sim/timed/belady@0.25/hit_rate"] >= metrics["sim/timed/lru@0.25/hit_rate"]
    assert "sim/zero_latency/predictor@0.25/hit_rate" in metrics
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["data"]["split"] == "val" and report["time_model"]["expert_bytes"] == 3 * 64 * 32 * 2
    assert len(report["scorers"]["predictor"]["metrics"][f"recall@{K}/layer"]) == L
    assert "gate_ahead" not in report["scorers"]  # a default baseline, left out: these traces have no gate picks
    md = (tmp_path / "report.md").read_text()
    assert "MoE-Beyond acc." in md and "Stall per token" in md
    assert any(line.startswith("| belady ") for line in md.splitlines())
    assert metrics["sim/reference/all_resident@1.00/hit_rate"] == 1.0  # the ceiling the plots draw
    for png in ("hit_rate_vs_capacity.png", "stall_vs_capacity.png", "recall_per_layer.png"):
        assert (tmp_path / png).stat().st_size > 0


def test_evaluate_baselines_only_on_all_rows_with_a_preset(tmp_path, traces):
    cfg = _cfg(
        [
            f"data.path={traces}",
            f"paths.output_dir={tmp_path}",
            "split=all",
            "sim=mixtral_8x7b",
            "sim.link=pcie5",
            "baselines=[frequency,previous_token]",
            "simulate.prefetch=[previous_token]",
            "simulate.capacities=[0.5]",
            "simulate.demand_policies=[lru,pinning]",
            "plots=false",
            "wandb.enabled=false",
        ]
    )
    metrics = evaluate(cfg)
    assert "predictor/recall@2" not in metrics and "sim/timed/previous_token@0.50/hit_rate" in metrics
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["data"]["sequences"] == 10
    assert report["time_model"]["bandwidth_GBps"] == 50.0 and report["time_model"]["preset"] == "mixtral_8x7b"
    # frequency's scores are its estimates of P(routed): their ECE is reported; previous_token's only rank
    assert "ece" in report["scorers"]["frequency"]["metrics"] and "ece" not in report["scorers"]["previous_token"]["metrics"]
    assert report["f1_decoding"] == "top-2" and report["data"]["train_split"] == "train"
    assert "F1 micro, top-2" in (tmp_path / "report.md").read_text()


def test_baselines_are_never_fitted_on_the_rows_they_are_scored_on(tmp_path, traces):
    cfg = _cfg([f"data.path={traces}", f"paths.output_dir={tmp_path}", "train_split=val", "baselines=[frequency]",
                "simulate.enabled=false", "plots=false", "wandb.enabled=false"])
    with pytest.raises(ValueError, match=r"train_split='val' of train_data .* and split='val' of .* share \d+ prompts"):
        evaluate(cfg)
    # the same prompts in another trace set (a copy here; merged sets renumber prompt ids): found by their tokens
    shutil.copytree(traces, tmp_path / "copy")
    cfg = _cfg([f"data.path={traces}", f"train_data={tmp_path / 'copy'}", f"paths.output_dir={tmp_path}",
                "train_split=all", "baselines=[frequency]", "simulate.enabled=false", "plots=false",
                "wandb.enabled=false"])  # fmt: skip
    with pytest.raises(ValueError, match=r"train_split='all' of train_data .*copy and split='val' .* share \d+ prompts"):
        evaluate(cfg)


def test_evaluate_scores_and_replays_recorded_gate_picks(tmp_path):
    shape = {"hidden": 64, "intermediate": 32, "num_matrices": 3, "dtype_bytes": 2}
    path = random_traces(tmp_path / "gated", num_layers=L, num_experts=E, top_k=K, vocab_size=V, lengths=(5, 12),
                         n_prompts=20, gate_ahead=3, expert_shape=shape).path  # fmt: skip
    cfg = _cfg([f"data.path={path}", f"paths.output_dir={tmp_path / 'run'}", "baselines=[frequency,gate_ahead]",
                "simulate.prefetch=[gate_ahead]", "simulate.capacities=[0.5]", "plots=false", "wandb.enabled=false"])  # fmt: skip
    metrics = evaluate(cfg)
    # the gate's first pick is always routed, its other two never: calibrated, they rank below the five
    # unlisted experts (one of which is routed), so recall@2 = (1 + 1/5, the tie shared fairly) / 2
    assert metrics["gate_ahead/recall@2"] == pytest.approx(0.6)
    assert metrics["gate_ahead/recall@2"] > metrics["frequency/recall@2"]
    # its replays prefetch from the picks, at their timing: the always-right first pick lifts the hit rate
    hits = {name: metrics[f"sim/timed/{name}@0.50/hit_rate"] for name in ("lru", "gate_ahead", "gate_ahead+scheduler")}
    assert hits["gate_ahead"] > hits["lru"] + 0.2 and hits["gate_ahead+scheduler"] > hits["lru"] + 0.2, hits
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["scorers"]["gate_ahead"]["mode"] == "layer_output"


def test_hybrid_lru_is_a_row_of_its_own_without_a_predictor(tmp_path, traces):
    """hybrid_lru reads no predictor: a demand policy (each miss on the CPU when sooner), refused as a
    prefetch policy (it would have prefetched every scorer's picks), and only with sim.cpu_expert_ms."""
    base = [f"data.path={traces}", f"paths.output_dir={tmp_path}", "baselines=[frequency]", "simulate.prefetch=[frequency]",
            "simulate.capacities=[0.25]", "simulate.references=false", "plots=false", "wandb.enabled=false"]
    with pytest.raises(ValueError, match="simulate.prefetch_policies: 'hybrid_lru' reads no predictor"):
        evaluate(_cfg([*base, "simulate.prefetch_policies=[hybrid_lru]", "sim.cpu_expert_ms=0.01"]))
    with pytest.raises(ValueError, match="simulate.demand_policies has a hybrid policy: set sim.cpu_expert_ms > 0"):
        evaluate(_cfg([*base, "simulate.demand_policies=[lru,hybrid_lru]"]))
    # (these experts copy in 0.5 µs: a CPU that beats that)
    metrics = evaluate(_cfg([*base, "simulate.demand_policies=[lru,hybrid_lru]", "sim.cpu_expert_ms=0.0001"]))
    rows = {r["policy"]: r for r in json.loads((tmp_path / "report.json").read_text())["simulation"]}
    assert rows["hybrid_lru"]["prefetch_issued"] == 0 and rows["hybrid_lru"]["cpu_experts"] > 0
    assert "frequency+hybrid_lru" not in rows and metrics["sim/timed/hybrid_lru@0.25/hit_rate"] >= 0


def test_evaluate_rejects_unknown_names(tmp_path, traces):
    cfg = _cfg(
        [
            f"data.path={traces}",
            f"paths.output_dir={tmp_path}",
            "baselines=[crystal_ball]",
            "wandb.enabled=false",
        ]
    )
    with pytest.raises(ValueError, match="unknown 'crystal_ball'"):
        evaluate(cfg)
    cfg = _cfg([f"data.path={traces}", f"paths.output_dir={tmp_path}", "split=test", "wandb.enabled=false"])
    with pytest.raises(ValueError, match="split='test'"):
        evaluate(cfg)
    for key in ("max_sequences", "simulate.max_sequences"):  # (0 was read as an empty split)
        with pytest.raises(ValueError, match=f"{key}=0: the first N rows"):
            evaluate(_cfg([f"data.path={traces}", f"paths.output_dir={tmp_path}", f"{key}=0", "wandb.enabled=false"]))
    with pytest.raises(FileNotFoundError, match="python -m predictor.moebeyond --out .*deepseek-v2-lite-puffin"):
        evaluate(_cfg([f"data.path={tmp_path / 'deepseek-v2-lite-puffin'}", "wandb.enabled=false"]))
    cfg = _cfg([f"data.path={traces}", f"paths.output_dir={tmp_path}", "device=foo", "wandb.enabled=false"])
    with pytest.raises(ValueError, match="device=foo: not a device"):
        evaluate(cfg)


def test_replays_start_beside_the_scoring_and_report_in_order(tmp_path, traces, monkeypatch):
    """The demand policies and references start before any scorer scores, a scorer's prefetch replays
    once it is done; the rows come back in the report's order, whatever order they finished in."""
    import predictor.evaluation as ev
    from predictor.evaluation_sims import SimulationJobs

    events, score, ready = [], ev.score, SimulationJobs.ready
    monkeypatch.setattr(ev, "score", lambda sc, *a, **k: events.append(("score", sc.name)) or score(sc, *a, **k))
    monkeypatch.setattr(SimulationJobs, "ready", lambda self, name: events.append(("ready", name)) or ready(self, name))
    cfg = _cfg([f"data.path={traces}", f"paths.output_dir={tmp_path}", "baselines=[frequency,token_table]",
                "simulate.prefetch=[frequency,token_table]", "simulate.capacities=[0.25,0.5]", "simulate.workers=2",
                "score_workers=1", "plots=false", "wandb.enabled=false"])  # fmt: skip
    evaluate(cfg)
    assert events[0] == ("ready", None)  # before the first scorer
    for name in ("frequency", "token_table"):
        assert events.index(("score", name)) < events.index(("ready", name))
    assert events.index(("ready", "frequency")) < events.index(("score", "token_table"))
    runs = json.loads((tmp_path / "report.json").read_text())["simulation"]
    caps = [r["capacity"] for r in runs if r["timing"] == "timed"]
    assert caps == sorted(caps) and runs[0]["policy"] == "lru" and runs[-1]["policy"] == "all_resident"


def test_scorers_at_once_report_what_one_at_a_time_reports(tmp_path, traces, predictor_files, one_thread):
    """score_workers=3 (scorers in threads, the predictor first) writes the report score_workers=1 does:
    the same metrics and replays, the scorers in their configured order. threads=1 means one of each."""
    reports = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        cfg = _cfg([f"data.path={traces}", f"paths.output_dir={out}", f"ckpt_path={predictor_files[1]}",
                    "baselines=[frequency,token_table,cooccurrence,routing_bank]", "simulate.capacities=[0.25]",
                    "simulate.prefetch=[cooccurrence,predictor]", "plots=false", "wandb.enabled=false",
                    "threads=1" if workers == 1 else f"score_workers={workers}"])  # fmt: skip
        evaluate(cfg)
        assert cfg.score_workers == workers and cfg.simulate.workers == (1 if workers == 1 else 2)
        reports.append(json.loads((out / "report.json").read_text()))
    one, many = reports
    assert list(many["scorers"]) == list(one["scorers"]) == ["frequency", "token_table", "cooccurrence",
                                                               "routing_bank", "predictor"]  # fmt: skip
    for name in one["scorers"]:
        assert many["scorers"][name]["metrics"] == one["scorers"][name]["metrics"], name
    drop = ("elapsed_s", "sim_seconds", "accesses_per_s")
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in rep["simulation"]] for rep in reports]
    assert rows[0] == rows[1] and len(rows[0]) > 5


def test_evaluate_refuses_a_predictor_on_prompts_it_trained_on(tmp_path, traces, predictor_files):
    from predictor.evaluation_rows import check_held_out
    from predictor.splits import DEFAULT_SPLIT, split_indices
    from predictor.traces import load_traces

    model, _, _ = predictor_files
    base = [f"data.path={traces}", f"paths.output_dir={tmp_path}", "baselines=[token_table]",
            "simulate.enabled=false", "plots=false", "wandb.mode=disabled"]
    trained = {"traces": str(traces), "split": {"train": 0.5, "val": 0.5}, "split_seed": 1, "train_split": "train"}
    other = export_predictor(model, tmp_path / "other.safetensors", trained)
    with pytest.raises(ValueError, match=r"was trained on \d+ of the \d+ prompts evaluated here.*seed 1"):
        evaluate(_cfg([*base, f"ckpt_path={other}"]))
    with pytest.warns(UserWarning, match="not held out"):  # split=all, asked for: a warning
        evaluate(_cfg([*base, f"ckpt_path={other}", "split=all"]))
    # evaluated with its own split, nothing it trained on is scored
    own = evaluate(_cfg([*base, f"ckpt_path={other}", "data.split={train: 0.5, val: 0.5}", "data.seed=1"]))
    assert 0 <= own[f"predictor/recall@{K}"] <= 1
    same = export_predictor(model, tmp_path / "same.safetensors", {**trained, "split": dict(DEFAULT_SPLIT), "split_seed": 0})
    assert 0 <= evaluate(_cfg([*base, f"ckpt_path={same}"]))[f"predictor/recall@{K}"] <= 1  # default split, both sides
    # the check itself: the calibration prompts carved from the train split were not trained on
    ts = load_traces(traces)
    val = ts.select(split_indices(ts.prompt_ids, DEFAULT_SPLIT, seed=0)["val"])
    check_held_out({**trained, "split": dict(DEFAULT_SPLIT), "split_seed": 0, "calib_fraction": 0.2}, ts, val, "p")
    train = ts.select(split_indices(ts.prompt_ids, DEFAULT_SPLIT, seed=0)["train"])
    calib_meta = {**trained, "split": dict(DEFAULT_SPLIT), "split_seed": 0, "calib_fraction": 0.2}
    with pytest.raises(ValueError, match="calib_fraction 0.2"):
        check_held_out(calib_meta, ts, train, "p")
    check_held_out({**calib_meta, "traces": "org/elsewhere"}, ts, train, "p")  # other traces: nothing to check


def test_held_out_check_knows_the_trace_set_by_content(tmp_path, traces):
    import shutil

    from predictor.evaluation_rows import check_held_out
    from predictor.splits import DEFAULT_SPLIT, split_indices, trace_fingerprint
    from predictor.traces import load_traces

    ts = load_traces(traces)
    moved = load_traces(shutil.copytree(traces, tmp_path / "moved"))  # a copy elsewhere, or a Hub snapshot
    meta = {"traces": "hf://datasets/someone/gone", "split": dict(DEFAULT_SPLIT), "split_seed": 0,
            "traces_fingerprint": trace_fingerprint(ts)}
    assert trace_fingerprint(moved) == trace_fingerprint(ts)
    train = moved.select(split_indices(moved.prompt_ids, DEFAULT_SPLIT, seed=0)["train"])
    with pytest.raises(ValueError, match="was trained on"):
        check_held_out(meta, moved, train, "p")
    other = random_traces(tmp_path / "other", num_layers=L, num_experts=E, top_k=K, vocab_size=V, lengths=(5, 12),
                          seed=7)  # same prompt ids, other rows: another set, never refused
    check_held_out(meta, other, other, "p")
    with pytest.warns(UserWarning, match="before its rows changed"):  # the directory it trained on, rewritten
        check_held_out({**meta, "traces": str(other.path)}, other, other, "p")
    # data.max_rows: the run split only its first rows, so other prompts were its train prompts
    half = 4  # of 10 rows, one prompt each: its first 4 split so that one of the whole set's val prompts is train
    first = split_indices(ts.prompt_ids[:half], DEFAULT_SPLIT, seed=0)
    val_whole = ts.select(split_indices(ts.prompt_ids, DEFAULT_SPLIT, seed=0)["val"])
    leaked = set(ts.prompt_ids[:half][first["train"]]) & set(val_whole.prompt_ids)
    assert leaked  # the split of the first rows differs from the whole set's
    with pytest.raises(ValueError, match=f"was trained on {len(leaked)} of"):
        check_held_out({**meta, "max_rows": half}, ts, val_whole, "p")


def test_held_out_check_knows_a_set_trained_on_with_others(tmp_path):
    """A run on data.path=[A, B] split the merged prompts: A's own val split holds some of its train prompts,
    which the check finds from the file's `traces_members` and the sets it records."""
    from predictor.data import TraceDataModule
    from predictor.evaluation_rows import check_held_out
    from predictor.splits import DEFAULT_SPLIT, split_indices
    from predictor.traces import load_traces

    shape = dict(num_layers=L, num_experts=E, top_k=K, vocab_size=V, lengths=(5, 12), token_space="vocab:sha256:0123")
    a = random_traces(tmp_path / "a", n_prompts=12, seed=1, **shape)
    b = random_traces(tmp_path / "b", n_prompts=12, seed=2, **shape)
    meta = TraceDataModule(path=[str(a.path), str(b.path)], window=4).describe()
    assert [m["rows"] for m in meta["traces_members"]] == [12, 12]
    ts = load_traces(a.path)
    val = ts.select(split_indices(ts.prompt_ids, DEFAULT_SPLIT, seed=0)["val"])  # A's own split, not the run's
    with pytest.raises(ValueError, match="was trained on [1-9]"):
        check_held_out(meta, ts, val, "p")
    moved = tmp_path / "b2"
    b.path.rename(moved)  # a member the check cannot read: it says so
    with pytest.warns(UserWarning, match="cannot be read here"):
        check_held_out(meta, ts, val, "p")


def test_a_missing_predictor_is_named_before_any_trace_is_read(tmp_path, traces):
    cfg = _cfg([f"data.path={tmp_path / 'no-traces'}", f"ckpt_path={tmp_path / 'run'}", f"paths.output_dir={tmp_path}",
                "wandb.enabled=false"])  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"ckpt_path: no predictor file at .*run"):
        evaluate(cfg)
    # missing traces too, and before a W&B run starts (its folder in the run directory)
    for key in ("data.path", "train_data"):
        cfg = _cfg([f"data.path={traces if key == 'train_data' else tmp_path / 'no-traces'}",
                    f"train_data={tmp_path / 'no-traces'}", f"paths.output_dir={tmp_path}"])  # fmt: skip
        with pytest.raises(FileNotFoundError, match=f"{key}: no trace dataset at {tmp_path / 'no-traces'}"):
            evaluate(cfg)
    assert not (tmp_path / "wandb").exists()


def _scored(traces, name, threshold=None, scorer=None):
    import numpy as np
    from omegaconf import OmegaConf

    from predictor.evaluation import BASELINES, score
    from predictor.trace_sets import load_trace_sets

    ts = load_trace_sets([traces])
    rows = list(ts)
    sc = scorer or BASELINES[name](E).fit(ts)
    mcfg = OmegaConf.create({"k_multiples": [1], "decode_k": None, "threshold": threshold,
                             "position_edges": [0, 4, 8]})  # fmt: skip
    result, (ids, probs), _ = score(sc, rows, ts.meta, mcfg, candidates=3)
    return sc, rows, result, np.concatenate([i.reshape(-1, 3) for i in ids]), np.concatenate(
        [p.reshape(-1, 3) for p in probs])


def test_a_baselines_own_probabilities_reach_the_simulator_as_they_are(traces):
    """frequency estimates P(routed): the scheduler reads that, not s / (1 + s) (a certain expert was 0.5)."""
    import numpy as np

    sc, rows, _, ids, probs = _scored(traces, "frequency")
    s = np.concatenate([sc.scores(r).reshape(-1, E) for r in rows])
    assert np.allclose(probs, np.take_along_axis(s, ids.astype(np.int64), -1))


def test_threshold_decoding_is_the_oracles_and_not_a_rank_only_scorers(traces):
    """At p >= 0.6 the oracle (0 / 1: exact probabilities) decodes perfectly; previous_token's scores only
    rank, so a probability cut means nothing: its threshold-decoded metrics are NaN, its recall@k kept."""
    import math

    _, _, oracle, _, _ = _scored(traces, "oracle", threshold=0.6)
    assert oracle["f1_micro"] == oracle["precision"] == oracle["recall"] == 1.0 and oracle["ece"] < 1e-3  # (bin centres)
    _, _, prev, _, _ = _scored(traces, "previous_token", threshold=0.6)
    assert all(math.isnan(prev[key]) for key in ("f1_micro", "precision", "recall", "moebeyond/accuracy"))
    assert prev[f"recall@{K}"] > 0 and "ece" not in prev


def test_threshold_decoding_cuts_the_calibrated_probability(traces, predictor_files):
    """A calibrated predictor is decoded as the runtime's `threshold` decodes it: on the calibrated map."""
    import numpy as np

    from predictor.calibration import Calibration
    from predictor.simulate import PredictorScorer

    model = predictor_files[0]
    sc = PredictorScorer(model)
    _, _, raw, _, _ = _scored(traces, None, threshold=0.5, scorer=sc)
    sc.calibration = Calibration(np.array([0.0, 1.0]), np.array([1.0, 1.0]))  # every probability -> 1
    _, _, cal, _, _ = _scored(traces, None, threshold=0.5, scorer=sc)
    assert cal["recall"] == 1.0 and cal["recall"] != raw["recall"]
    assert cal["pr_auc"] == raw["pr_auc"]  # PR-AUC and the raw ECE stay the raw probabilities'
