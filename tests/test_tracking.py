"""Experiment tracking: the predictor and the evaluation report as W&B artifacts (read back from the offline
run logs), artifact references as evaluate.py's ckpt_path, the debug and hparams_search config groups,
the documented logger choices."""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from synthetic import TINY_NET, random_traces, train_cfg
from wandb_log import records, run_log

ROOT = Path(__file__).resolve().parents[1]
L, E, K, V = 3, 8, 2, 40
TINY = [*TINY_NET, "trainer.max_steps=3", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "t"
    return random_traces(path, num_layers=L, num_experts=E, top_k=K, vocab_size=V, n_prompts=12, lengths=(5, 20),
                         expert_shape={"hidden": 64, "intermediate": 32, "num_matrices": 3, "dtype_bytes": 2}).path


def artifacts(run_dir) -> dict:
    """{name: {"type", "files": {path: digest}, "metadata"}} of the artifacts an offline run logged."""
    out = {}
    for rec in records(run_log(run_dir)):
        if rec.WhichOneof("record_type") == "artifact":
            a = rec.artifact
            out[a.name] = {"type": a.type, "files": {c.path: c.digest for c in a.manifest.contents},
                           "metadata": json.loads(a.metadata or "{}")}
    return out


def md5_b64(path) -> str:
    return base64.b64encode(hashlib.md5(Path(path).read_bytes()).digest()).decode()


def eval_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


@pytest.fixture(scope="module")
def trained(traces, tmp_path_factory):
    """A tiny training run with the W&B logger (offline): its run directory."""
    from predictor.training import train

    out = tmp_path_factory.mktemp("train")
    return out, train(train_cfg([f"data.path={traces}", "logger=wandb", *TINY], out))


def test_training_logs_the_predictor_as_a_model_artifact(trained):
    trained, metrics = trained
    arts = artifacts(trained)
    art = arts["predictor-synthetic-token_ahead"]
    assert art["type"] == "model"
    assert art["files"] == {"predictor.safetensors": md5_b64(trained / "predictor.safetensors"),
                            "metrics.json": md5_b64(trained / "metrics.json")}
    assert art["metadata"]["source_model"] == "synthetic" and art["metadata"]["mode"] == "token_ahead"
    assert art["metadata"]["command"].startswith("python train.py data.path=")  # the card's command
    assert 0 <= art["metadata"]["metrics"][f"recall@{K}"] <= 1
    assert metrics["predictor_artifact"] == "predictor-synthetic-token_ahead"


class LocalArtifact:
    """What `run.use_artifact` returns online, served from a local directory (no W&B server here)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def download(self, root=None):
        shutil.copytree(self.folder, root, dirs_exist_ok=True)
        return root


def test_evaluation_uses_an_artifact_and_logs_its_report(trained, traces, tmp_path, monkeypatch):
    """ckpt_path=wandb-artifact://...: the run records it with use_artifact(name, type="model") (the W&B
    server is replaced by a local directory holding the training artifact's files), evaluates the file
    it downloads, and logs report.json / report.md / plots as an "evaluation" artifact."""
    import wandb

    from predictor.evaluation import evaluate

    trained = trained[0]
    local = tmp_path / "artifact"
    local.mkdir()
    for name in artifacts(trained)["predictor-synthetic-token_ahead"]["files"]:
        shutil.copy(trained / name, local / name)
    used = []

    def use_artifact(run, name, type=None, **_):
        used.append((name, type))
        return LocalArtifact(local)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "use_artifact", use_artifact)
    out = tmp_path / "eval"
    cfg = eval_cfg([f"data.path={traces}", f"paths.output_dir={out}", "wandb.mode=offline", "simulate.enabled=false",
                    "ckpt_path=wandb-artifact://predictor-synthetic-token_ahead", "plots=false"])
    metrics = evaluate(cfg)
    assert used == [("predictor-synthetic-token_ahead:latest", "model")]
    assert 0 <= metrics[f"predictor/recall@{K}"] <= 1
    report = json.loads((out / "report.json").read_text())
    assert report["ckpt_path"] == "wandb-artifact://predictor-synthetic-token_ahead"
    assert Path(report["predictor_file"]) == out / "artifacts" / "predictor.safetensors"
    art = artifacts(out)["evaluation-predictor-synthetic-token_ahead"]
    assert art["type"] == "evaluation" and sorted(art["files"]) == ["report.json", "report.md"]
    assert art["files"]["report.json"] == md5_b64(out / "report.json")
    assert wandb.run is None  # finished


def test_an_evaluation_logs_its_metrics_table_and_plots_at_one_step(traces, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from predictor.evaluation import evaluate

    out = tmp_path / "eval"
    evaluate(eval_cfg([f"data.path={traces}", f"paths.output_dir={out}", "wandb.mode=offline", "baselines=[frequency]",
                       "simulate.capacities=[0.25]", "simulate.max_sequences=3", "simulate.zero_latency_capacities=[]"]))
    steps = [{i.key or i.nested_key[0] for i in r.history.item}
             for r in records(run_log(out)) if r.WhichOneof("record_type") == "history"]  # fmt: skip
    assert len(steps) == 1, steps  # were five: the metrics, the table, each plot
    assert {"simulation", "hit_rate_vs_capacity", "frequency/recall@2"} <= steps[0]
    assert any(k.endswith("/gap_closed") for k in steps[0])


def test_artifact_reference_offline_is_a_clear_error(traces, tmp_path):
    from predictor.evaluation import evaluate
    from predictor.tracking import parse_artifact_ref

    cfg = eval_cfg([f"data.path={traces}", f"paths.output_dir={tmp_path}", "wandb.mode=offline",
                    "simulate.enabled=false", "baselines=[frequency]", "ckpt_path=wandb-artifact://me/proj/pred:v3"])
    with pytest.raises(ValueError, match="W&B runs offline.*WANDB_MODE=online.*wandb artifact get me/proj/pred:v3"):
        evaluate(cfg)
    # without a run (wandb.enabled=false) the public API went to the network: no key, a raw UsageError;
    # with one, a 20 s wait
    cfg = eval_cfg([f"data.path={traces}", f"paths.output_dir={tmp_path}", "wandb.mode=offline", "wandb.enabled=false",
                    "simulate.enabled=false", "baselines=[frequency]", "ckpt_path=wandb-artifact://me/proj/pred:v3"])
    with pytest.raises(ValueError, match="W&B runs offline.*wandb artifact get me/proj/pred:v3"):
        evaluate(cfg)
    assert parse_artifact_ref("wandb-artifact://pred") == "pred:latest"
    from predictor.tracking import report_artifact_name  # each run's checkpoint an artifact of its own

    assert report_artifact_name("runs/A/checkpoints/last.ckpt", "t") != report_artifact_name("runs/B/checkpoints/last.ckpt", "t")
    assert report_artifact_name("runs/A/predictor.safetensors", "t") == "evaluation-A-predictor"
    with pytest.raises(ValueError, match="wandb-artifact://\\[<entity>/<project>/\\]<name>"):
        parse_artifact_ref("wandb-artifact://a/b")


def test_documented_logger_choices_compose():
    """Every `logger=` choice the conf/train.yaml header documents composes, `~logger` removes the logger,
    and `logger=null` is what Hydra refuses (so the header does not offer it)."""
    header = "".join(line for line in (ROOT / "conf" / "train.yaml").read_text().splitlines(True) if line.startswith("#"))
    choices = re.search(r"\[logger=([\w|]+)\]", header).group(1).split("|")
    assert set(choices) == {p.stem for p in (ROOT / "conf" / "logger").glob("*.yaml")}
    assert "~logger" in header and "logger=null" not in header.replace("`logger=null` is not", "")
    for choice in choices:
        assert train_cfg([f"logger={choice}"], Path("/x")).get("logger") is not None or choice == "none"
    assert train_cfg(["~logger"], Path("/x")).get("logger") is None
    with pytest.raises(Exception, match="Config group override must be a string or a list"):
        train_cfg(["logger=null"], Path("/x"))


@pytest.mark.parametrize("debug", ["default", "fdr", "limit", "overfit", "profiler"])
def test_debug_configs(debug):
    cfg = train_cfg([f"debug={debug}"], Path("/x"))
    assert cfg.task_name == "debug" and not cfg.get("logger") and cfg.trainer.detect_anomaly
    want = {"fdr": ("fast_dev_run", True), "limit": ("limit_train_batches", 5), "overfit": ("overfit_batches", 3),
            "profiler": ("profiler", "simple"), "default": ("max_epochs", 1)}[debug]
    assert cfg.trainer[want[0]] == want[1]


@pytest.mark.slow
def test_debug_fdr_trains(traces, tmp_path):
    from predictor.training import train

    metrics = train(train_cfg([f"data.path={traces}", "debug=fdr", *TINY_NET], tmp_path))
    assert "final/val/recall@k" in metrics and not (tmp_path / "predictor.safetensors").exists()


@pytest.mark.slow
def test_optuna_sweep(traces, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[sweep]'")
    cmd = [sys.executable, str(ROOT / "train.py"), "hparams_search=optuna", "hydra.sweeper.n_trials=2",
           "hydra.sweeper.sampler.n_startup_trials=2", f"data.path={traces}", "logger=csv", *TINY,
           "model.net.n_heads=2", f"hydra.sweep.dir={tmp_path}"]
    res = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import yaml

    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert 0.0 <= result["best_value"] <= 1.0 and "model.optimizer.lr" in result["best_params"]
    assert (tmp_path / "0" / "predictor.safetensors").exists() and (tmp_path / "1" / "predictor.safetensors").exists()


def test_the_artifact_hint_offline_says_the_reference_needs_a_sync(tmp_path, caplog):
    """An offline run's artifact is on no server yet: its log line must not offer a reference that
    evaluate.py refuses offline (test_artifact_reference_offline_is_a_clear_error)."""
    import logging

    from predictor.tracking import log_predictor_artifact

    class Run:
        def __init__(self, offline):
            self.offline, self.logged = offline, []

        def log_artifact(self, art):
            self.logged.append(art.name)

    (tmp_path / "predictor.safetensors").write_bytes(b"weights")
    for offline in (True, False):
        caplog.clear()
        run = Run(offline)
        with caplog.at_level(logging.INFO, logger="predictor.tracking"):
            log_predictor_artifact(run, tmp_path / "predictor.safetensors", {"mode": "token_ahead", "source_model": "m"})
        assert run.logged == ["predictor-m-token_ahead"]
        assert "ckpt_path=wandb-artifact://predictor-m-token_ahead:latest" in caplog.text
        assert ("once synced (`wandb sync`)" in caplog.text) == offline
