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
