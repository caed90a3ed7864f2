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
        out = m.layer_logits(ctx, torch.full((1, 3, 2), -1), 0)
        bad = sorted(n for n in sys.modules if n.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf'))
        print(json.dumps({{"bad": bad, "shape": list(out.shape)}}))
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bad"] == [] and out["shape"] == [1, 8]
