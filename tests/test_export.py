"""Predictor export: round trip, self-describing metadata, loads without Hydra/Lightning."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from synthetic import tiny_predictor

from predictor.export import PredictorFileError, export_predictor, load_predictor, read_predictor_meta

ROOT = Path(__file__).resolve().parents[1]


def tiny(mode="layer_ahead", **overrides):
    return tiny_predictor(mode=mode, **overrides)


@pytest.mark.parametrize(
    "mode,overrides",
    [
        ("token_ahead", {}),
        ("layer_ahead", {}),
        ("layer_ahead", {"depth_last": True, "memory_heads": 2, "memory_head_dim": 4, "memory_size": 3}),
        ("layer_ahead", {"depth_last": True, "bank_size": 2}),  # the routing bank's int16 rows travel too
    ],
)
def test_round_trip(tmp_path, mode, overrides):
    model = tiny(mode, **overrides)
    path = export_predictor(
        model,
        tmp_path / "p.safetensors",
        {"source_model": "tiny", "metrics": {"val/recall@k": torch.tensor(0.5)}},
    )
    loaded, meta = load_predictor(path, with_meta=True)
    assert loaded.config == model.config
    assert meta["source_model"] == "tiny" and meta["mode"] == mode and meta["num_experts"] == 8
    assert meta["metrics"]["val/recall@k"] == 0.5
    ids = torch.randint(0, 40, (2, 5))
    ex = torch.randint(0, 8, (2, 5, 3, 2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, ex), model(ids, ex))
    if model.bank is not None:
        assert loaded.bank.experts.dtype == torch.int16
        torch.testing.assert_close(loaded.bank.experts, model.bank.experts)
        assert loaded.bank.width == model.bank.width == 2
    cfg, meta2 = read_predictor_meta(path)
    assert cfg == model.config and meta2 == meta


def test_not_a_predictor(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(PredictorFileError, match="format"):
        load_predictor(tmp_path / "x.safetensors")
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(PredictorFileError):
        load_predictor(tmp_path / "junk.safetensors")


def test_loads_without_hydra_or_lightning(tmp_path):
    path = export_predictor(tiny(), tmp_path / "p.safetensors", {"source_model": "tiny"})
    code = textwrap.dedent(f"""
        import sys, json, torch
        from predictor.export import load_predictor
        m = load_predictor({str(path)!r})
        state = m.init_state(1)
        ctx = m.step(state, torch.tensor([3]), None)
        out = m.logits(ctx, torch.full((1, 1, 3, 2), -1), slice(0, 1), state)[:, 0, 0]
        bad = sorted(n for n in sys.modules if n.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf'))
        print(json.dumps({{"bad": bad, "shape": list(out.shape)}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bad"] == [] and out["shape"] == [1, 8]


LEGACY = ROOT / "tests" / "data" / "legacy"


@pytest.mark.parametrize("name", ["token_memory", "layer_h2_plain", "layer_bank_recent"])
def test_files_from_before_the_redesign_load_and_predict_the_same(name):
    """Exported by the pre-redesign model (flat attribute names, bank_entries and extra in the config):
    they load, and give the logits they gave then."""
    model = load_predictor(LEGACY / f"{name}.safetensors")
    saved = torch.load(LEGACY / f"{name}.expected.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(saved["ids"], saved["experts"]), saved["logits"], atol=1e-5, rtol=1e-4)


def test_checkpoint_of_a_compiled_run_loads_and_exports(tmp_path):
    """A `compile: true` run's checkpoint holds `net._orig_mod.` keys: the one loader strips them."""
    model = tiny("layer_ahead", bank_size=2)
    state = {f"net._orig_mod.{k}": v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"net": model.config.to_dict()}, "state_dict": state}, ckpt)
    loaded = load_predictor(ckpt)
    ids, ex = torch.randint(0, 40, (1, 4)), torch.randint(0, 8, (1, 4, 3, 2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, ex), model(ids, ex))
    compiled = torch.compile(model)  # exporting the wrapper writes the plain module's names
    path = export_predictor(compiled, tmp_path / "p.safetensors")
    assert load_predictor(path).bank.rows == model.bank.rows
    torch.save({"hyper_parameters": {}, "state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(PredictorFileError, match="not a PredictorLitModule checkpoint"):
        load_predictor(tmp_path / "other.ckpt")


def test_non_finite_weights_are_refused(tmp_path):
    model = tiny("token_ahead")
    with torch.no_grad():
        model.head.out.weight[0, 0] = float("nan")
    path = export_predictor(model, tmp_path / "p.safetensors")
    with pytest.raises(PredictorFileError, match="non-finite weights in \\['head.out.weight'\\]"):
        load_predictor(path)


def test_a_tensor_of_the_wrong_shape_or_metadata_of_the_wrong_type_is_named(tmp_path):
    """Each was a bare RuntimeError or AttributeError naming no file, or (meta) loaded and failed later."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = export_predictor(tiny("token_ahead"), tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        md, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = "head.out.weight"
    save_file({**state, key: torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])}, str(tmp_path / "s.safetensors"), md)
    with pytest.raises(PredictorFileError, match=rf"s.safetensors: tensors that do not fit its config: .* size mismatch for {key}: "):
        load_predictor(tmp_path / "s.safetensors")
    for field in ("predictor_config", "meta"):
        save_file(state, str(tmp_path / "m.safetensors"), {**md, field: "[1, 2]"})
        with pytest.raises(PredictorFileError, match=f"m.safetensors: metadata '{field}' must be a JSON object, got list"):
            load_predictor(tmp_path / "m.safetensors")


def test_the_reuse_hazard_travels_in_the_file_and_the_cli_adds_it(tmp_path):
    """A predictor file carries the learned eviction's reuse hazard beside its weights; a file made
    without one loads with None, `--hazard-traces` adds the one of its train split, and a file with half
    of it, or one for another L or E, is refused by name."""
    import numpy as np
    from safetensors.torch import load_file, save_file
    from synthetic import random_traces

    from predictor.export import HAZARD_KEYS, fit_reuse_hazard, main
    from predictor.simulate.policy import ReuseHazard

    model = tiny()  # L = 3, E = 8, k = 2
    plain = export_predictor(model, tmp_path / "plain.safetensors")
    assert load_predictor(plain).reuse_hazard is None
    hazard = ReuseHazard(np.array([[0.3, 0.2, 0.1]] * 3), np.linspace(0.5, 2.0, 24).reshape(3, 8))
    loaded = load_predictor(export_predictor(model, tmp_path / "h.safetensors", hazard=hazard))
    np.testing.assert_allclose(loaded.reuse_hazard.rate, hazard.rate, rtol=1e-6)
    np.testing.assert_allclose(loaded.reuse_hazard.factor, hazard.factor, rtol=1e-6)
    assert set(load_file(str(tmp_path / "h.safetensors"))) - set(model.state_dict()) == set(HAZARD_KEYS)
    again = load_predictor(export_predictor(loaded, tmp_path / "again.safetensors"))  # kept on re-export
    np.testing.assert_allclose(again.reuse_hazard.factor, hazard.factor, rtol=1e-6)

    traces = random_traces(tmp_path / "tr", num_layers=3, num_experts=8, top_k=2, vocab_size=40, n_prompts=12)
    assert main([str(plain), str(tmp_path / "added.safetensors"), "--hazard-traces", str(traces.path)]) == 0
    added = load_predictor(tmp_path / "added.safetensors")
    want = fit_reuse_hazard({"split_seed": 0}, traces.path)
    np.testing.assert_allclose(added.reuse_hazard.rate, want.rate, rtol=1e-6)
    with pytest.raises(ValueError, match="records no traces path"):
        fit_reuse_hazard({})
    # another set than its own, even of its shape, splits other prompts: its "train" rows held some of its val ones
    from predictor.splits import trace_fingerprint

    other = random_traces(tmp_path / "other", num_layers=3, num_experts=8, top_k=2, vocab_size=40, n_prompts=12, seed=5)
    with pytest.raises(ValueError, match=f"traces {other.path} are not the set the predictor was trained on"):
        fit_reuse_hazard({"traces_fingerprint": trace_fingerprint(traces), "traces": str(traces.path)}, other.path)
    with pytest.raises(ValueError, match=r"have L, E = \(3, 8\); the predictor's were \(4, 8\)"):
        fit_reuse_hazard({"num_layers": 4, "num_experts": 8}, traces.path)
    # the file's own traces, as a training run records them (its fingerprint, L, E): --hazard-traces meta fits
    from predictor.data import TraceDataModule

    described = TraceDataModule(str(traces.path), window=4, context=1, batch_tokens=64, max_batch_size=2).describe()
    recorded = export_predictor(model, tmp_path / "recorded.safetensors", described)
    assert main([str(recorded), str(tmp_path / "refit.safetensors"), "--hazard-traces", "meta"]) == 0
    np.testing.assert_allclose(load_predictor(tmp_path / "refit.safetensors").reuse_hazard.rate, want.rate, rtol=1e-6)
    # OUT the file inside a run folder given as IN: IN itself (it would be rewritten in place)
    (tmp_path / "run").mkdir()
    export_predictor(model, tmp_path / "run" / "predictor.safetensors")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "run"), str(tmp_path / "run" / "predictor.safetensors"), "--overwrite"])

    state = load_file(str(tmp_path / "h.safetensors"))
    del state[HAZARD_KEYS[1]]
    save_file(state, str(tmp_path / "half.safetensors"), metadata=_metadata(tmp_path / "h.safetensors"))
    with pytest.raises(PredictorFileError, match="half.safetensors.*reuse_hazard.factor"):
        load_predictor(tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match=r"factor must be \(L=3, E=8\)"):
        export_predictor(model, tmp_path / "bad.safetensors", hazard=ReuseHazard(hazard.rate, np.ones((3, 4))))


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_the_calibration_travels_in_the_file(capsys):
    import numpy as np
    from safetensors.torch import load_file, save_file

    from predictor.calibration import KEYS, Calibration

    model = tiny()
    cal = Calibration(np.array([0.05, 0.4, 0.9]), np.array([0.02, 0.55, 0.97]))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = export_predictor(model, Path(d) / "c.safetensors", calibration=cal)
        loaded = load_predictor(path)
        np.testing.assert_allclose(loaded.calibration.calibrated, cal.calibrated, rtol=1e-6)
        assert load_predictor(export_predictor(loaded, Path(d) / "again.safetensors")).calibration is not None
        assert read_predictor_meta(path)[0] == model.config
        from predictor.export import main

        assert main([str(path), str(Path(d) / "raw.safetensors"), "--drop-calibration"]) == 0
        assert load_predictor(Path(d) / "raw.safetensors").calibration is None  # the same weights, raw
        # an existing OUT is never replaced unasked, IN never, and a folder is named as one
        (Path(d) / "notes.safetensors").write_text("mine")
        for out, extra, message in (("notes.safetensors", [], "exists: pass --overwrite"),
                                    ("c.safetensors", ["--overwrite"], "is IN itself"), (".", [], "is a directory")):
            with pytest.raises(SystemExit):
                main([str(path), str(Path(d) / out), *extra])
            assert message in capsys.readouterr().err
        assert (Path(d) / "notes.safetensors").read_text() == "mine"
        assert main([str(path), str(Path(d) / "notes.safetensors"), "--overwrite"]) == 0
        from predictor.evaluation import load_model

        (Path(d) / "run").mkdir()
        export_predictor(model, Path(d) / "run" / "predictor.safetensors")
        assert read_predictor_meta(Path(d) / "run")[0] == model.config  # a folder names its predictor file
        assert load_model(Path(d) / "run").config == model.config
        with pytest.raises(FileNotFoundError, match=r"ckpt_path: no predictor file at .* \(a folder without"):
            load_model(Path(d))
        from predictor.checkpoint import CheckpointError, load_checkpoint

        with pytest.raises(CheckpointError, match="a safetensors file .an exported predictor.*checkpoints/last.ckpt"):
            load_checkpoint(path)  # resume and train=false read a .ckpt: a predictor file is named as such
        state = load_file(str(path))
        del state[KEYS[0]]
        save_file(state, str(Path(d) / "half.safetensors"), metadata=_metadata(path))
        with pytest.raises(PredictorFileError, match="calibration.raw"):
            load_predictor(Path(d) / "half.safetensors")


def test_a_command_lines_bad_input_prints_its_message_alone(tmp_path):
    """A user error (here a missing file) exits 2 with `<command>: error: <message>` and no traceback,
    as argparse does; MOE_PREFETCH_TRACEBACK=1 brings the traceback back."""
    import os

    cmd = [sys.executable, "-m", "predictor.export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out.safetensors")]
    env = {**os.environ, "MOE_PREFETCH_TRACEBACK": "0"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"predictor.export: error: no predictor file at {tmp_path / 'missing.ckpt'}"
    env["MOE_PREFETCH_TRACEBACK"] = "1"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr
    assert not (tmp_path / "out.safetensors").exists()
