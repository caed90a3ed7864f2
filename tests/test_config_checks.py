"""Settings that used to be accepted silently now fail with an error naming the key or flag."""

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from synthetic import TINY_NET, random_traces, tiny_predictor, train_cfg

from predictor.config import PredictorConfigError
from predictor.config_schema import ConfigKeyError, check_config
from predictor.simulate import time_model_from_config

ROOT = Path(__file__).resolve().parents[1]
L, E, K, V = 3, 8, 2, 40


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "t"
    return random_traces(path, num_layers=L, num_experts=E, top_k=K, vocab_size=V, n_prompts=10).path


def _compose(name: str, overrides: list[str], conf: Path = ROOT / "conf"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(name, overrides=overrides)


# ------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize("override, key", [("+foo=1", "foo"), ("+trainer.max_epoch=3", "trainer.max_epoch"),
                                           ("+data.windw=8", "data.windw"), ("+model.optimizer.lrr=1", "model.optimizer.lrr"),
                                           ("+callbacks.lr_monitor.every=2", "callbacks.lr_monitor.every")])
def test_train_refuses_unknown_keys(traces, tmp_path, override, key):
    from predictor.training import train

    with pytest.raises(ConfigKeyError, match=f"unknown key '{key}'"):
        train(train_cfg([f"data.path={traces}", "logger=none", override], tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_known_keys_and_target_parameters_pass(tmp_path):
    for overrides in ([], ["experiment=deepseek_v2_lite_puffin_layer_ahead"], ["logger=many", "callbacks=early_stopping"],
                      ["trainer=ddp"], ["logger=none"], ["~logger"], ["+trainer.accumulate_grad_batches=2"],
                      ["+logger.wandb.notes=x"], ["+callbacks.es={_target_: lightning.pytorch.callbacks.EarlyStopping,"
                                                   " monitor: val/loss}"]):
        check_config(train_cfg(overrides, tmp_path), "train")
    check_config(_compose("evaluate", ["data=puffin", "sim=deepseek_v2_lite", "+sim.links.nvlink=900"]), "evaluate")
    for preset in ("auto", "deepseek_v2_lite", "olmoe", "h100_replay"):  # every time-model key set without a '+'
        cfg = _compose("evaluate", [f"sim={preset}", "sim.cpu_expert_ms=0.13", "sim.host_layer_ms=0.5"])
        tm = time_model_from_config(cfg.sim, {"hidden": 8, "intermediate": 4})
        assert (tm.cpu_expert_ms, tm.host_layer_ms) == (0.13, 0.5)
    check_config(_compose("collect", [], ROOT / "conf" / "collect"), "collect/collect")


def test_model_net_keys_stay_with_predictor_config(traces, tmp_path):
    from predictor.training import train

    with pytest.raises(Exception, match="unexpected keyword argument 'colour'"):
        train(train_cfg([f"data.path={traces}", "logger=none", "+model.net.colour=1"], tmp_path))


def test_evaluate_and_collect_refuse_unknown_keys(tmp_path):
    from integrate.collect_job import collect
    from predictor.evaluation import evaluate

    cfg = _compose("evaluate", [f"paths.output_dir={tmp_path}", "+simulate.budgets=4", "wandb.enabled=false"])
    with pytest.raises(ConfigKeyError, match="evaluate config: unknown key 'simulate.budgets'"):
        evaluate(cfg)
    with pytest.raises(ConfigKeyError, match="collect config: unknown key 'generate.max_new_token'"):
        collect({"model": "x", "prompts": "y", "out": str(tmp_path / "o"), "generate": {"max_new_token": 3}})
    with pytest.raises(ConfigKeyError, match="unknown key 'fooo'"):
        check_config(_compose("collect", ["+fooo=1"], ROOT / "conf" / "collect"), "collect/collect")


# ------------------------------------------------------------------ evaluate: prefetch names, budget


def _eval_cfg(traces, tmp_path, *extra):
    return _compose("evaluate", [f"data.path={traces}", f"paths.output_dir={tmp_path}", "baselines=[frequency]", "sim=mixtral_8x7b",
                                 "simulate.capacities=[0.5]", "simulate.demand_policies=[lru]", "plots=false",
                                 "wandb.enabled=false", *extra])


def test_evaluate_refuses_unknown_prefetch_names_and_budget_zero(traces, tmp_path):
    from predictor.evaluation import evaluate

    with pytest.raises(ValueError, match="simulate.prefetch: unknown 'coocurrence'"):
        evaluate(_eval_cfg(traces, tmp_path, "simulate.prefetch=[frequency,coocurrence]"))
    with pytest.raises(ValueError, match=r"simulate.budget=0: must be in \[1, 8\]"):
        evaluate(_eval_cfg(traces, tmp_path, "simulate.budget=0"))
    with pytest.raises(ValueError, match=r"simulate.budget=9: must be in \[1, 8\]"):
        evaluate(_eval_cfg(traces, tmp_path, "simulate.budget=9"))


# ------------------------------------------------------------------ lookahead >= L


def test_lookahead_at_or_beyond_the_moe_layers(traces, tmp_path):
    from safetensors.torch import load_file, save_file

    from predictor.evaluation import load_model
    from predictor.export import PredictorFileError, export_predictor
    from predictor.simulate import Predictions, build_accesses, simulate
    from predictor.stats import main as stats_main
    from predictor.traces import load_traces
    from predictor.training import train

    with pytest.raises(PredictorConfigError, match=r"model.net: .*key 'lookahead' must be below the number of "
                                                   r"MoE layers \(3\), got 3 \(the traces at .* have L, E, k = 3, 8, 2\)"):
        train(train_cfg([f"data.path={traces}", "logger=none", "model=layer_ahead", "model.net.lookahead=3",
                         *TINY_NET], tmp_path / "run"))
    # a predictor file claiming h >= L: evaluate (and the runtime) refuse it, naming the file
    path = export_predictor(tiny_predictor(num_layers=L, num_experts=E, top_k=K, vocab_size=V), tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
    md["predictor_config"] = json.dumps({**json.loads(md["predictor_config"]), "lookahead": 3})
    save_file(load_file(str(path)), str(path), metadata=md)
    with pytest.raises(PredictorFileError, match=rf"{path}: .*key 'lookahead' must be below the number of MoE layers"):
        load_model(path)
    # simulate: predictions with h >= L
    ts = load_traces(traces)
    recs = list(ts)
    acc = build_accesses(recs, L, E, K)
    from predictor.simulate.timing import TimeModel

    preds = Predictions(np.zeros((len(acc.keys), 1), dtype=np.int64), np.zeros((len(acc.keys), 1)), "layer_ahead", 3)
    with pytest.raises(PredictorConfigError, match="key 'Predictions.lookahead' must be below the number of MoE layers"):
        simulate(acc, TimeModel(1e6, 25.0, 1.0), "naive", 0.5, predictions=preds)
    with pytest.raises(PredictorConfigError, match="key '--lookahead' must be below the number of MoE layers"):
        stats_main([str(traces), "--lookahead", "3"])


# ------------------------------------------------------------------ data keys


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.split={train: 1.5, val: -0.5}"], r"data: key 'split': split fractions: 'train' = 1.5 must lie in \[0, 1\]"),
        (["data.split={train: 1.0, val: 0.0}"], r"data: key 'split' = .* leaves the 'val' split empty"),
        (["data.max_rows=0"], r"data: key 'max_rows' must be a positive int, got 0"),
        (["data.max_batch_size=0"], r"data: key 'max_batch_size' must be a positive int, got 0"),
    ],
)
def test_data_keys(traces, tmp_path, overrides, message):
    from predictor.training import train

    with pytest.raises(ValueError, match=message):
        train(train_cfg([f"data.path={traces}", "logger=none", *TINY_NET[-3:], *overrides], tmp_path))


# ------------------------------------------------------------------ CLI flags and runtime settings


@pytest.mark.parametrize("flags, message", [
    (["--threshold", "1.0"], r"threshold \(--threshold\) = 1.0: a probability, must lie in \[0, 1\)"),
    (["--threshold", "-0.1"], r"threshold \(--threshold\) = -0.1"),
    (["--max-inflight", "0"], r"max_inflight \(--max-inflight\) = 0"),
    (["--budget", "0"], r"budget \(--budget\) = 0"),
])
def test_decode_and_replay_flags(capsys, flags, message):
    from benchmarks.bench_replay import main as replay_main
    from integrate.__main__ import main as integrate_main

    for main, argv in ((integrate_main, ["decode", *flags]), (replay_main, ["--methods", "lru", *flags])):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert re.search(message, capsys.readouterr().err)


def test_replay_budget_beyond_the_experts(capsys):
    from benchmarks.bench_replay import main as replay_main
    from benchmarks.replay_data import synthetic_data

    E_syn = synthetic_data().num_experts
    with pytest.raises(SystemExit):
        replay_main(["--methods", "lru", "--budget", str(E_syn + 1)])
    assert f"budget (--budget) = {E_syn + 1}: experts prefetched per layer must lie in [1, {E_syn}]" in capsys.readouterr().err


def test_runtime_settings_and_predictor_shape():
    from integrate.runtime.drivers import check_settings, load_driver_predictor

    check_settings(budget=8, threshold=0.5, max_inflight=1, num_experts=8)
    with pytest.raises(ValueError, match=r"budget \(--budget\) = 9: experts prefetched per layer must lie in \[1, 8\]"):
        check_settings(budget=9, num_experts=8)
    model = tiny_predictor(num_layers=L, num_experts=E, top_k=K, vocab_size=V)
    assert load_driver_predictor(model, L, E, "cpu", top_k=K, vocab_size=V) is model
    with pytest.raises(ValueError, match="predictor is for top_k=2; the model routes top_k=4"):
        load_driver_predictor(model, L, E, "cpu", top_k=4)
    with pytest.raises(ValueError, match="predictor has vocab_size=40; the model's is 50"):
        load_driver_predictor(model, L, E, "cpu", top_k=K, vocab_size=50)


def test_expert_cache_refuses_max_inflight_zero():
    from integrate.runtime.cache import ExpertCache
    from integrate.runtime.store import ExpertStore

    store = ExpertStore.from_experts(lambda layer, e: {"w": torch.zeros(2, 2)}, 1, 2, pin=False)
    with pytest.raises(ValueError, match=r"max_inflight \(--max-inflight\) = 0"):
        ExpertCache(store, 1, "cpu", max_inflight=0)


# ------------------------------------------------------------------ MoE-Beyond --limit


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_moebeyond_limit_is_checked_and_recorded(tmp_path, capsys):
    from test_moebeyond import csv_text, good_member

    from predictor.moebeyond import import_moebeyond, main

    tar = _tar(tmp_path / "csv.tar.xz", {f"csv/prompt_{i}_data.csv": csv_text(*good_member(3, seed=i)).encode()
                                         for i in range(3)})
    for bad in (0, -2):
        with pytest.raises(SystemExit):
            main(["--src", str(tar), "--out", str(tmp_path / "o"), "--limit", str(bad)])
        assert f"--limit must be a positive number of prompts, got {bad}" in capsys.readouterr().err
        with pytest.raises(ValueError, match="--limit must be a positive number"):
            import_moebeyond(tar, tmp_path / "o", limit=bad)
    assert not (tmp_path / "o").exists()
    ts = import_moebeyond(tar, tmp_path / "o", limit=2)
    assert len(ts) == 2 and ts.meta.recording["limit"] == 2
    assert json.loads((tmp_path / "o" / "trace_meta.json").read_text())["recording"]["limit"] == 2
    assert import_moebeyond(tar, tmp_path / "all").meta.recording["limit"] is None


# ------------------------------------------------------------------ fast_dev_run, NaN weights


def test_fast_dev_run_exports_no_predictor(traces, tmp_path):
    from predictor.training import train

    train(train_cfg([f"data.path={traces}", "logger=none", "trainer.fast_dev_run=true", "trainer.enable_progress_bar=false",
                     *TINY_NET], tmp_path))
    assert not (tmp_path / "predictor.safetensors").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["fast_dev_run"] is True


def test_non_finite_checkpoint_weights_are_refused(tmp_path):
    from predictor.export import PredictorFileError, load_predictor

    model = tiny_predictor(num_layers=L, num_experts=E, top_k=K, vocab_size=V, mode="token_ahead")
    state = {f"net.{k}": v.clone() for k, v in model.state_dict().items()}
    state["net.head.out.weight"][0, 0] = float("inf")
    torch.save({"hyper_parameters": {"net": model.config.to_dict()}, "state_dict": state}, tmp_path / "x.ckpt")
    with pytest.raises(PredictorFileError, match=r"x.ckpt: non-finite weights in \['head.out.weight'\]"):
        load_predictor(tmp_path / "x.ckpt")
