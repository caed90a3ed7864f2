"""train(cfg) on the real Hydra config, shrunk: CSV / W&B offline / no logger, export, multirun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic import TINY_NET, random_traces, train_cfg
from wandb_log import records, run_log

ROOT = Path(__file__).resolve().parents[1]
L, E, K, V = 3, 8, 2, 40

TINY = [
    *TINY_NET,
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "model.train_metrics_every=1",
]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "t"
    return random_traces(path, num_layers=L, num_experts=E, top_k=K, vocab_size=V, n_prompts=12).path


make_cfg = train_cfg


def test_configs_compose():
    for overrides in (
        [],
        ["experiment=deepseek_v2_lite_puffin"],
        ["experiment=deepseek_v2_lite_puffin", "model=layer_ahead", "model.net.lookahead=2"],
        ["experiment=deepseek_v2_lite_puffin_layer_ahead", "model.net.lookahead=4"],
        ["experiment=deepseek_v2_lite_puffin_layer_ahead_lean"],
        ["trainer=gpu"],
        ["trainer=ddp", "trainer.num_nodes=2"],
        ["logger=csv"],
        ["logger=none"],
        ["~logger"],
        ["logger=many", "callbacks=early_stopping"],
    ):
        cfg = make_cfg(overrides, Path("/tmp/unused"))
        assert cfg.model.net.mode in ("token_ahead", "layer_ahead")
    cfg = make_cfg(
        ["experiment=deepseek_v2_lite_puffin", "model=layer_ahead", "model.net.lookahead=2"], Path("/x")
    )
    assert cfg.data.path.endswith("data/big/deepseek-v2-lite-puffin")
    assert (
        cfg.model.net.mode == "layer_ahead" and cfg.model.net.lookahead == 2 and cfg.model.net.dropout == 0.0
    )
    lay = make_cfg(["experiment=deepseek_v2_lite_puffin_layer_ahead", "model.net.lookahead=4"], Path("/x"))
    assert (lay.model.net.mode, lay.model.net.lookahead, lay.model.net.d_model) == ("layer_ahead", 4, 128)
    assert lay.model.net.dropout == 0.0 and lay.model.net.depth_last
    assert lay.data.path == cfg.data.path and lay.trainer.max_time == "00:00:29:00"
    # both Puffin experiments use the routing memory; the demo default does not
    assert (lay.model.net.memory_heads, lay.model.net.memory_size, lay.model.net.bank_size) == (2, 128, 8192)
    lean = make_cfg(["experiment=deepseek_v2_lite_puffin_layer_ahead_lean"], Path("/x")).model.net
    assert (lean.depth_blocks, lean.memory_heads, lean.bank_size, lean.lookahead) == (0, 0, 8192, 1)
    token_net = make_cfg(["experiment=deepseek_v2_lite_puffin"], Path("/x")).model.net
    assert not {"bank_size", "depth_last", "lookahead"} & set(token_net)  # token_ahead lists only its own keys
    assert make_cfg([], Path("/x")).model.net.memory_heads == 0
    assert not make_cfg(["logger=none"], Path("/x")).get("logger")
    assert make_cfg([], Path("/x")).logger.wandb.mode == os.environ.get("WANDB_MODE", "offline")


@pytest.mark.slow
def test_train_csv_exports_predictor(traces, tmp_path):
    from predictor.export import load_predictor
    from predictor.training import train

    cfg = make_cfg([f"data.path={traces}", "logger=csv", *TINY], tmp_path)
    metrics = train(cfg)
    assert 0.0 <= metrics["final/val/recall@k"] <= 1.0
    assert metrics["train_tokens"] > 0 and metrics["train_tokens_per_s"] > 0
    assert (tmp_path / "csv" / "metrics.csv").exists()
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert len(report["val_report"][f"recall@{K}/layer"]) == L
    model, meta = load_predictor(tmp_path / "predictor.safetensors", with_meta=True)
    assert meta["source_model"] == "synthetic" and meta["num_experts"] == E and meta["mode"] == "token_ahead"
    from predictor.splits import trace_fingerprint
    from predictor.traces import load_traces

    assert meta["traces_fingerprint"] == trace_fingerprint(load_traces(traces)) and meta["max_rows"] is None
    # the file carries the learned eviction's reuse hazard of the train split, as the export CLI fits it
    from predictor.export import fit_reuse_hazard

    assert model.reuse_hazard.factor.shape == (L, E)
    np.testing.assert_allclose(model.reuse_hazard.rate, fit_reuse_hazard(meta).rate, rtol=1e-6)
    assert abs(meta["metrics"][f"recall@{K}"] - metrics["final/val/recall@k"]) < 1e-6


@pytest.mark.slow
def test_train_wandb_offline_layer_ahead(traces, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from predictor.export import load_predictor
    from predictor.training import train

    cfg = make_cfg(
        [
            f"data.path={traces}",
            "logger=wandb",
            "model=layer_ahead",
            "model.net.lookahead=2",
            "model.net.memory_heads=1",  # the routing memory trains through Lightning too
            "model.net.memory_size=8",
            "model.net.bank_size=4",  # and the routing bank, built from the train split
            "trainer.max_epochs=1",
            "data.calib_fraction=0.2",  # probabilities calibrated on prompts of their own
            *TINY[:-2],
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert "final/val/recall@k" in metrics
    predictor = load_predictor(tmp_path / "predictor.safetensors")
    assert predictor.memory.size == 8
    assert predictor.calibration is not None and 0 <= metrics["final/val/ece_calibrated"] <= 1
    assert metrics["final/val/ece_raw"] == pytest.approx(metrics["final/val/ece"], abs=1e-6)  # the same cells
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup()
    train_prompts = set(dm.traces.prompt_ids[dm.indices["train"]].tolist())
    stored = set(predictor.bank.sequences.tolist())
    assert stored and stored <= train_prompts  # no held-out prompt in the bank, and no calibration prompt
    assert predictor.bank.rows == len(predictor.bank.sequences) > 0  # sized by the file, not the config
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    import wandb

    assert wandb.run is None  # finished: the next job of a multirun starts a fresh run


def test_a_run_that_raises_is_a_failed_wandb_run_and_a_sweep_names_a_metric_it_lacks(traces, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    import predictor.training as training

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(training, "export_predictor", broken)
    with pytest.raises(OSError, match="disk full"):
        training.train(make_cfg([f"data.path={traces}", "logger=wandb", "trainer.max_epochs=1", *TINY[:-2]], tmp_path))
    assert [r.exit.exit_code for r in records(run_log(tmp_path)) if r.WhichOneof("record_type") == "exit"] == [1]

    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"optimized_metric": "final/val/f1_mikro"})
    metrics = {"final/val/recall@k": 0.5, "val/recall@k": 0.4}
    assert training.sweep_value(cfg, metrics) is None  # a single run: nothing optimises it
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    basic = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"}  # a grid: it reads nothing back
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: SimpleNamespace(mode=RunMode.MULTIRUN, sweeper=basic)))
    assert training.sweep_value(cfg, metrics) is None
    optuna = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"}
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: SimpleNamespace(mode=RunMode.MULTIRUN, sweeper=optuna)))
    with pytest.raises(KeyError, match=r"optimized_metric=final/val/f1_mikro: .* \['final/val/recall@k', 'val/recall@k'\]"):
        training.sweep_value(cfg, metrics)  # was val/recall@k, silently
    assert training.sweep_value(OmegaConf.create({"optimized_metric": "final/val/recall@k"}), metrics) == 0.5


def test_train_tests_the_best_weights_on_a_split_kept_from_selection(traces, tmp_path):
    from predictor.training import train

    base = [f"data.path={traces}", "logger=none", "callbacks=none", "trainer.max_steps=3", "trainer.max_epochs=1",
            *TINY[:-2]]
    split = ["data.split.train=0.5", "data.split.val=0.25", "+data.split.test=0.25", "data.test_split=test", "test=true"]
    metrics = train(make_cfg([*base, *split], tmp_path / "a"))
    assert 0.0 <= metrics["final/test/recall@k"] <= 1.0 and 0.0 <= metrics["final/val/recall@k"] <= 1.0
    assert metrics["final/test/recall@k"] != metrics["final/val/recall@k"]  # other prompts
    # without the final validation the calibration is still fitted, but no held-out ECE is reported
    # from the histograms of the last epoch's weights
    metrics = train(make_cfg([*base, "validate=false", "data.calib_fraction=0.25"], tmp_path / "v"))
    assert "final/val/ece_raw" not in metrics and "final/val/recall@k" not in metrics
    assert not list((tmp_path / "v").rglob("*.ckpt"))  # callbacks=none: no checkpoint (Lightning's default one neither)
    from predictor.export import load_predictor

    assert load_predictor(tmp_path / "v" / "predictor.safetensors").calibration is not None
    with pytest.raises(ValueError, match="test=true needs data.test_split"):
        train(make_cfg([*base, "test=true"], tmp_path / "b"))
    for bad, message in (("model.pos_weight=-3", "'pos_weight' = -3: must be null or a number > 0"),
                         ("model.focal_gamma=-2", "'focal_gamma' = -2: must be a number >= 0"),
                         ("model.train_metrics_every=0", "'train_metrics_every' = 0: must be an int >= 1")):
        with pytest.raises(ValueError, match=message):  # before any training
            train(make_cfg([*base, bad], tmp_path / "c"))


@pytest.mark.slow
@pytest.mark.parametrize("no_logger,callbacks", [("logger=none", "none"), ("logger=none", "default"),
                                                 ("~logger", "default")])  # default has a LearningRateMonitor
def test_train_without_logger(traces, tmp_path, no_logger, callbacks):
    """Both documented forms (conf/train.yaml's header) train without an experiment logger."""
    from predictor.training import train

    cfg = make_cfg(
        [
            f"data.path={traces}",
            no_logger,
            f"callbacks={callbacks}",
            "trainer.max_steps=3",
            "trainer.max_epochs=1",
            *TINY[:-2],
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert (tmp_path / "predictor.safetensors").exists() and "final/val/recall@k" in metrics


@pytest.mark.slow
def test_multirun_cli(traces, tmp_path):
    """`python train.py -m ...`: two jobs in one process, each with its own W&B offline run named after
    its overrides (hydra.job.override_dirname); each Lightning INFO line printed once, not twice."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        f"data.path={traces}",
        "logger=wandb",
        "model.net.d_model=16,32",
        "trainer.max_steps=2",
        *[o for o in TINY if "d_model" not in o],
        f"hydra.sweep.dir={tmp_path}",
    ]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / job / "predictor.safetensors").exists()
        assert len(list((tmp_path / job / "wandb").glob("offline-run-*"))) == 1
    assert not (tmp_path / "lightning_logs").exists()  # everything under the run directories
    names = set()
    for job in ("0", "1"):
        log = next((tmp_path / job / "wandb").glob("offline-run-*/run-*.wandb"))  # the process has ended: written
        names |= {r.run.display_name for r in records(log) if r.WhichOneof("record_type") == "run"}
    assert len(names) == 2 and all(n.startswith("train-token_ahead[") for n in names), names
    assert any("model.net.d_model=16" in n for n in names) and any("model.net.d_model=32" in n for n in names)
    out = res.stdout + res.stderr  # Hydra's console handler and, before the fix, Lightning's own
    assert out.count("`Trainer.fit` stopped: `max_steps=2` reached.") == 2, out[-3000:]  # once per job


@pytest.mark.slow
def test_train_and_evaluate_a_predictor_with_gate_inputs(traces, tmp_path):
    """model.net.gate_inputs: the batches carry the gate's picks, the predictor learns from them, the
    evaluation feeds them and times its predictions as layer_output; traces without them are refused."""
    from test_evaluate import _cfg as eval_cfg

    from predictor.evaluation import evaluate
    from predictor.export import load_predictor
    from predictor.training import train

    gated = random_traces(tmp_path / "gated", num_layers=L, num_experts=E, top_k=K, vocab_size=V, n_prompts=12,
                          gate_ahead=3, expert_shape={"hidden": 8, "intermediate": 8, "num_matrices": 3,
                                                      "dtype_bytes": 2}).path  # fmt: skip
    net = ["model=layer_ahead", "model.net.gate_inputs=2", "logger=none", "callbacks=none", *TINY]
    metrics = train(make_cfg([f"data.path={gated}", *net, "trainer.max_epochs=6", "model.optimizer.lr=0.03"],
                             tmp_path / "run"))
    # the synthetic gate's first pick is always routed (tests/synthetic.py), the routing otherwise random:
    # 0.25 without the picks (2 of 8), 0.5 + 0.5 x 1/7 with them learned
    assert metrics["final/val/recall@k"] > 0.45, metrics["final/val/recall@k"]
    model, meta = load_predictor(tmp_path / "run" / "predictor.safetensors", with_meta=True)
    assert model.config.gate_inputs == 2 and model.config.timing == "layer_output"
    ev = evaluate(eval_cfg([f"data.path={gated}", f"paths.output_dir={tmp_path / 'eval'}",
                            f"ckpt_path={tmp_path / 'run' / 'predictor.safetensors'}", "baselines=[gate_ahead]",
                            "simulate.prefetch=[predictor]", "simulate.capacities=[0.5]", "plots=false",
                            "wandb.enabled=false"]))  # fmt: skip
    assert ev["predictor/recall@2"] == pytest.approx(metrics["final/val/recall@k"], abs=1e-6)
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["scorers"]["predictor"]["mode"] == "layer_output"
    with pytest.raises(ValueError, match="record_gate_ahead=2"):
        train(make_cfg([f"data.path={traces}", *net], tmp_path / "refused"))
