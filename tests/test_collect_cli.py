"""collect.py / collect(cfg): prompt sources, the real Hydra config, an end-to-end CLI run."""

import json
import os
import subprocess
import sys

import pytest
from tiny_models import tiny_moe_model, tiny_tokenizer

from integrate.collect_job import collect
from predictor.prompts import load_prompts
from predictor.token_space import tokenizer_space
from predictor.traces import load_traces

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
TEXTS = ["the quick brown fox", "experts route tokens to experts", "hello world", "jumps over the lazy dog"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-olmoe")
    tiny_moe_model("olmoe").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_txt_prompts_by_line_and_by_paragraph(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first prompt\nsecond prompt\n\n")
    assert load_prompts(str(lines)) == [(0, "first prompt"), (1, "second prompt")]
    paras = tmp_path / "paras.txt"
    paras.write_text("one\ncontinued\n\ntwo\n")
    assert load_prompts(str(paras)) == [(0, "one\ncontinued"), (1, "two")]
    assert load_prompts(str(paras), txt_split="line") == [(0, "one"), (1, "continued"), (2, "two")]


def test_jsonl_and_dataset_prompts(tmp_path):
    import datasets

    f = tmp_path / "p.jsonl"
    f.write_text(
        "\n".join(json.dumps(r) for r in [{"prompt_id": 7, "text": "a"}, {"prompt_id": 9, "text": "b"}])
    )
    assert load_prompts(str(f)) == [(7, "a"), (9, "b")]
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "why?", "answer": "because"}) + "\n")
    assert load_prompts(str(q)) == [(0, "why?")]
    with pytest.raises(KeyError, match=r"no field 'body'; fields are \['answer', 'question'\]"):
        load_prompts(str(q), field="body")
    datasets.Dataset.from_dict({"question": ["x", "y"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(str(tmp_path / "ds")) == [(0, "x"), (1, "y")]
    # JSON strings may hold line breaks other than \n unescaped (Puffin's prompts.jsonl has U+2028): a line
    # ends at \n alone, in .jsonl and in a .txt read line by line (CRLF files too)
    odd = ["a\u2028b", "c\x85d", "e\x0cf\x1cg"]
    u = tmp_path / "u.jsonl"
    u.write_text("\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in odd) + "\r\n", encoding="utf-8")
    assert load_prompts(str(u)) == list(enumerate(odd))
    t = tmp_path / "u.txt"
    t.write_text("\r\n".join(odd) + "\r\n", encoding="utf-8", newline="")
    assert load_prompts(str(t)) == list(enumerate(odd))
    t.write_bytes("\ufeffone\rtwo\rthree\r".encode())  # CR alone ends a .txt line; a byte-order mark is no text
    assert load_prompts(str(t)) == [(0, "one"), (1, "two"), (2, "three")]
    u.write_bytes("\ufeff".encode() + json.dumps({"text": "a"}).encode() + b"\n")  # nor in a .jsonl
    assert load_prompts(str(u)) == [(0, "a")]


def test_hydra_config_composes_with_overrides():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf" / "collect"), version_base="1.3"):
        cfg = compose("collect", overrides=["model=some/hub-name", "generate.max_new_tokens=8"])
    assert cfg.model == "some/hub-name" and cfg.prompts.endswith("data/demo/prompts.jsonl")
    assert cfg.generate.max_new_tokens == 8 and cfg.batch_size == 8


def test_collect_in_process(tiny_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(TEXTS))
    cfg = {
        "model": str(tiny_dir),
        "prompts": str(prompts),
        "out": str(tmp_path / "t"),
        "batch_size": 3,
        "chat_template": False,
        "device": "cpu",
    }
    ts = collect(cfg)
    assert len(ts) == len(TEXTS) and ts.meta.recording["mode"] == "prefill"
    assert all(r.num_prefill == r.num_tokens for r in ts)
    # the token space an engine import names with --tokenizer <the same name> (predictor/importers)
    assert ts.meta.token_space == tokenizer_space(str(tiny_dir))
    with pytest.raises(FileExistsError, match="overwrite=true"):
        collect(cfg)
    assert ts.meta.source_model == str(tiny_dir)  # outside the project's root: as given
    # under it: relative to it, as the bundled traces name the demo model on every machine
    ts = collect({**cfg, "root_dir": str(tmp_path.parent), "out": str(tmp_path / "u")})
    assert ts.meta.source_model == ts.meta.tokenizer == str(tiny_dir.relative_to(tmp_path.parent))
    assert ts.meta.prompt_source == str(prompts.relative_to(tmp_path.parent))


def test_overwrite_of_a_foreign_directory_is_refused_before_loading(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "paper.tex").write_text("keep me")
    cfg = {"model": str(tmp_path / "no-such-model"), "prompts": "unused", "out": str(out), "overwrite": True}
    with pytest.raises(ValueError, match="refusing to overwrite .*results: not a trace dataset"):
        collect(cfg)  # refused before the (missing) model would load
    assert (out / "paper.tex").read_text() == "keep me"


def test_right_padding_with_generation_is_refused_before_loading(tmp_path):
    cfg = {"model": str(tmp_path / "no-such-model"), "prompts": "unused", "out": str(tmp_path / "t"),
           "padding_side": "right", "generate": {"max_new_tokens": 3}}  # fmt: skip
    with pytest.raises(ValueError, match="padding_side=right: generation .* needs left padding"):
        collect(cfg)  # refused before the (missing) model would load


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", 0, "batch_size=0: must be an int >= 1"),
    ("max_prompts", 0, "max_prompts=0: must be an int >= 1 or null"),  # read as "no limit" before
    ("max_prompt_tokens", 0, "max_prompt_tokens=0: must be an int >= 1 or null"),
    ("generate", {"max_new_tokens": -2}, "generate.max_new_tokens=-2: must be an int >= 0"),
    ("generate", {"max_new_tokens": 2, "do_sample": True, "temperature": 0}, "generate.temperature=0: must be > 0"),
    ("generate", {"max_new_tokens": 2, "do_sample": True, "top_p": 0}, r"generate.top_p=0: must lie in \(0, 1\]"),
    ("generate", {"max_new_tokens": 2, "do_sample": True, "temperature": "abc"}, "generate.temperature='abc': must be a number"),
    ("max_prompts", 2.5, "max_prompts=2.5: must be an int >= 1 or null"),  # (1e3, a whole float from Hydra, passes)
])  # fmt: skip
def test_bad_sizes_and_sampling_settings_are_named_before_loading(tmp_path, key, value, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    cfg = {"model": str(tmp_path / "no-such-model"), "prompts": str(prompts), "out": str(tmp_path / "t"), key: value}
    with pytest.raises(ValueError, match=message):
        collect(cfg)  # refused before the (missing) model would load


def test_record_gate_ahead_outside_k_to_e_is_refused_before_the_weights_load(tiny_dir, tmp_path, monkeypatch):
    """The gate's picks per layer lie in [top_k, num_experts]: read from the model's config (a skeleton on the
    meta device), not after a large load, and named by the setting (it was the trace meta's key, after)."""
    from transformers import AutoConfig

    import integrate.collect_job as job

    config = AutoConfig.from_pretrained(tiny_dir)
    k, E = config.num_experts_per_tok, config.num_experts
    monkeypatch.setattr(job, "load_moe_model", lambda *a, **kw: pytest.fail("the weights were loaded"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    for picks in (k - 1, E + 1):
        cfg = {"model": str(tiny_dir), "prompts": str(prompts), "out": str(tmp_path / "t"), "record_gate_ahead": picks}
        with pytest.raises(ValueError, match=rf"record_gate_ahead={picks}: .* \[{k}, {E}\] for "):
            collect(cfg)


def test_a_bad_prompts_file_fails_before_the_model_loads(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "a"}\n{not json}\n')
    with pytest.raises(ValueError, match="p.jsonl: line 2: not JSON"):
        collect({"model": "someone/some-moe", "prompts": str(prompts), "out": str(tmp_path / "t")})  # (offline: no load)


def test_cli_records_generation(tiny_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_id": 10 + i, "text": t}) for i, t in enumerate(TEXTS)))
    out = tmp_path / "traces"
    cmd = [
        sys.executable,
        str(ROOT / "collect.py"),
        f"model={tiny_dir}",
        f"prompts={prompts}",
        f"out={out}",
        "batch_size=2",
        "max_prompt_tokens=6",
        "generate.max_new_tokens=3",
        "device=cpu",
        "dtype=float32",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ts = load_traces(out)
    meta = ts.meta
    assert meta.architecture == "olmoe" and meta.recording["mode"] == "generate"
    assert isinstance(meta.recording["generation_config"], dict)  # the checkpoint's own settings generate() used
    assert meta.recording["chat_template"] is True  # the tiny tokenizer has one: default auto turns it on
    assert sorted(ts.prompt_ids.tolist()) == [10, 11, 12, 13]
    tok = tiny_tokenizer()
    for rec in ts:
        assert rec.num_tokens == rec.num_prefill + 3  # 3 decode rows (the tiny model never emits eos here)
        assert tok.decode(rec.token_ids[: rec.num_prefill]).endswith("assistant: ")
