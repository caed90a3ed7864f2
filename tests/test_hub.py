"""The predictor and trace sets on the Hub: save_pretrained / from_pretrained / push_to_hub, model and dataset
cards, hf:// trace sets. Offline (HF_HUB_OFFLINE=1): a local directory laid out as the HF cache stands in
for the Hub (tests/hub_standin.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_standin import LocalHub
from synthetic import random_traces, tiny_predictor

from predictor.export import PredictorFileError, export_predictor, load_predictor, read_predictor_meta
from predictor.model import ExpertPredictor

ROOT = Path(__file__).resolve().parents[1]
META = {
    "source_model": "deepseek-ai/DeepSeek-V2-Lite",
    "architecture": "deepseek_v2",
    "tokenizer": None,
    "vocab_file": "vocab.json",
    "token_space": "vocab:sha256:0123456789abcdef",
    "traces": "hf://datasets/someone/puffin-traces",
    "split": {"train": 0.8, "val": 0.2},
    "split_seed": 0,
    "val_split": "val",
    "metrics": {"recall@2": 0.751, "pr_auc": 0.62, "rows": 33090.0},
    "command": "python train.py experiment=deepseek_v2_lite_puffin_layer_ahead model.net.lookahead=1",
}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return LocalHub(tmp_path / "hub-cache").install(monkeypatch)


def same_logits(a, b):
    g = torch.Generator().manual_seed(3)
    ids, ex = torch.randint(0, 40, (2, 6), generator=g), torch.randint(0, 8, (2, 6, 3, 2), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(a(ids, ex), b(ids, ex))


def test_save_pretrained_writes_the_export_format_config_and_card(tmp_path):
    model = tiny_predictor(mode="layer_ahead", lookahead=2, bank_size=2)
    model.predictor_meta = dict(META)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "predictor.safetensors"]
    cfg, meta = read_predictor_meta(tmp_path / "m" / "predictor.safetensors")  # the one self-describing format
    assert cfg == model.config and meta["metrics"] == META["metrics"] and meta["command"] == META["command"]
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == model.config.to_dict()
    card = (tmp_path / "m" / "README.md").read_text()
    for text in ("deepseek-ai/DeepSeek-V2-Lite", "hf://datasets/someone/puffin-traces", "vocab.json",
                 "vocab:sha256:0123456789abcdef", "`layer_ahead`, lookahead h = 2", "| recall@2 | 75.1 % |",
                 "| rows | 33,090 |", f"Produced by `{META['command']}`", "library_name: moe-prefetch",
                 "- someone/puffin-traces"):
        assert text in card, text
    loaded = ExpertPredictor.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    assert loaded.bank.rows == model.bank.rows > 0  # bank buffers sized by the state dict
    assert loaded.predictor_meta["source_model"] == META["source_model"]
    same_logits(loaded, model)
    loaded.save_pretrained(tmp_path / "again")  # the meta travels on: the second card is the same
    assert (tmp_path / "again" / "README.md").read_text() == card


def test_the_card_of_a_predictor_with_gate_inputs_says_what_it_reads(tmp_path):
    model = tiny_predictor(mode="layer_ahead", lookahead=1, gate_inputs=3)
    model.predictor_meta = dict(META)
    model.save_pretrained(tmp_path / "g")
    card = (tmp_path / "g" / "README.md").read_text()
    assert "reads 3 gate picks per layer (`gate_inputs`; timing `layer_output`)" in card
    assert "the cross-layer gate's top-3 picks for layer l" in card
    assert read_predictor_meta(tmp_path / "g" / "predictor.safetensors")[1]["gate_inputs"] == 3


def test_from_pretrained_takes_exported_and_legacy_files(tmp_path):
    model = tiny_predictor(mode="token_ahead")
    path = export_predictor(model, tmp_path / "p.safetensors", {"source_model": "tiny"})
    loaded = ExpertPredictor.from_pretrained(path)
    same_logits(loaded, model)
    assert loaded.predictor_meta["source_model"] == "tiny"
    legacy = ROOT / "tests" / "data" / "legacy" / "layer_h2_plain.safetensors"  # pre-redesign tensor names
    assert ExpertPredictor.from_pretrained(legacy).config == load_predictor(legacy).config
    with pytest.raises(FileNotFoundError, match="no predictor directory or file at ./missing/p.safetensors"):
        ExpertPredictor.from_pretrained("./missing/p.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no predictor.safetensors"):
        ExpertPredictor.from_pretrained(tmp_path / "empty")


def test_config_json_must_agree_with_the_file(tmp_path):
    model = tiny_predictor(mode="layer_ahead")
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "lookahead": 2}))
    with pytest.raises(PredictorFileError, match=r"config.json disagrees with predictor.safetensors on \['lookahead'\]"):
        ExpertPredictor.from_pretrained(tmp_path / "m")


def test_a_broken_config_json_is_named(tmp_path):
    model = tiny_predictor(mode="layer_ahead")
    model.save_pretrained(tmp_path / "m")
    for text, why in (("{not json", "not valid JSON"), ("[1, 2]", "a JSON list, not an object")):
        (tmp_path / "m" / "config.json").write_text(text)
        with pytest.raises(PredictorFileError, match=f"config.json: {why}"):
            ExpertPredictor.from_pretrained(tmp_path / "m")


def test_push_to_hub_and_load_by_repo_name_offline(hub):
    model = tiny_predictor(mode="layer_ahead", memory_heads=1, memory_head_dim=4, memory_size=4)
    model.predictor_meta = dict(META)
    model.push_to_hub("someone/predictor")
    assert hub.commits[-1]["files"] == ["README.md", "config.json", "predictor.safetensors"]
    loaded = ExpertPredictor.from_pretrained("someone/predictor")  # hf_hub_download, offline, from the cache
    same_logits(loaded, model)
    assert loaded.predictor_meta["command"] == META["command"]
    with pytest.raises(FileNotFoundError, match="someone/nothing: no predictor repo on the Hub or in the HF cache"):
        ExpertPredictor.from_pretrained("someone/nothing")


def test_trace_set_on_the_hub_keeps_its_meta(tmp_path, hub):
    from huggingface_hub import DatasetCard

    from predictor.hub_traces import push_trace_set
    from predictor.traces import load_traces, write_traces

    ts = random_traces(tmp_path / "t", num_layers=3, num_experts=8, top_k=2, vocab_size=40, n_prompts=6,
                       prompt_source="synthetic prompts")
    meta = ts.meta
    meta.vocab_file = "vocab.json"
    ts = write_traces(tmp_path / "t", meta, list(ts), overwrite=True, max_shard_size="2KB",
                      extra_files={"vocab.json": [f"w{i}" for i in range(40)]})
    name = push_trace_set(ts.path, "someone/traces")
    assert name == "hf://datasets/someone/traces"
    snap = hub.snapshot("someone/traces", "dataset")
    card = DatasetCard.load(snap / "README.md")
    assert card.data.trace_meta == ts.meta.to_dict()  # the card carries trace_meta.json
    back = load_traces(name)  # by name, offline, from the cache
    assert back.meta == ts.meta and back.vocab() == ts.vocab() and len(back) == len(ts)
    for i in range(len(ts)):
        a, b = ts.record(i), back.record(i)
        assert a.prompt_id == b.prompt_id and np.array_equal(a.token_ids, b.token_ids)
        assert np.array_equal(a.experts, b.experts)
    shards = sorted(p.name for p in snap.glob("data-*.arrow"))
    assert len(shards) > 1
    (snap / "notes.md").write_text("added by hand")  # not the trace set's: a later push keeps it
    small = write_traces(tmp_path / "small", ts.meta, [ts.record(0)])  # fewer shards: stale ones must go
    push_trace_set(small.path, "someone/traces")
    assert (hub.snapshot("someone/traces", "dataset") / "notes.md").read_text() == "added by hand"
    assert len(load_traces(name)) == 1
    assert sorted(p.name for p in hub.snapshot("someone/traces", "dataset").glob("data-*.arrow")) == ["data-00000-of-00001.arrow"]
    with pytest.raises(FileNotFoundError, match="hf://datasets/someone/absent"):
        load_traces("hf://datasets/someone/absent")
    with pytest.raises(ValueError, match="hf://datasets/<owner>/<name>"):
        load_traces("hf://someone/traces")


def test_datamodule_reads_a_hub_trace_set(tmp_path, hub):
    from predictor.data import TraceDataModule
    from predictor.hub_traces import push_trace_set

    ts = random_traces(tmp_path / "t", num_layers=3, num_experts=8, top_k=2, vocab_size=40, n_prompts=6)
    name = push_trace_set(ts.path, "someone/dm-traces")
    dm = TraceDataModule(name, window=16, context=4, batch_tokens=64)
    assert dm.meta.num_moe_layers == 3 and dm.describe()["traces"] == name  # the card names the Hub set
    dm.setup()
    assert sum(len(v) for v in dm.indices.values()) == len(ts)


def test_hub_cli_save(tmp_path):
    from predictor.hub import main

    path = export_predictor(tiny_predictor(), tmp_path / "p.safetensors", dict(META))
    assert main(["save", str(path), str(tmp_path / "out")]) == 0
    assert "Produced by" in (tmp_path / "out" / "README.md").read_text()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my project")
    with pytest.raises(SystemExit):  # a folder's own README is never replaced unasked
        main(["save", str(path), str(mine)])
    assert (mine / "README.md").read_text() == "my project" and not (mine / "config.json").exists()
    assert main(["save", str(path), str(mine), "--overwrite"]) == 0
