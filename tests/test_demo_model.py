"""The embedded demo: committed model, prompts and traces agree with each other, and the recipe runs."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from predictor.traces import load_traces
from tools import train_demo_model

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
L, E, K = 4, 8, 2


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO / "model")
    model = AutoModelForCausalLM.from_pretrained(DEMO / "model", dtype=torch.float32).eval()
    return model, tok


def test_model_config_and_tokenizer(demo):
    model, tok = demo
    c = model.config
    assert c.model_type == "olmoe"
    assert (c.num_hidden_layers, c.num_experts, c.num_experts_per_tok) == (L, E, K)
    assert c.vocab_size == len(tok)
    for name in ("bos", "eos", "pad"):
        tid = getattr(tok, f"{name}_token_id")
        assert tid is not None and 0 <= tid < c.vocab_size
        assert getattr(c, f"{name}_token_id") == tid
    assert tok("Hello")["input_ids"][0] == tok.bos_token_id  # encoding prepends bos, as in training


def test_model_generates(demo):
    model, tok = demo
    ids = tok("Question: Tom has 3 apples and buys 5 more.", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert out.shape[1] > ids.shape[1] and text.strip()


def test_prompts_fit():
    rows = [json.loads(line) for line in open(DEMO / "prompts.jsonl")]
    assert len(rows) >= 1000
    assert len({r["prompt_id"] for r in rows}) == len(rows)
    assert all(r["text"].strip() for r in rows)


def test_traces_match_model(demo):
    model, tok = demo
    ts = load_traces(DEMO / "traces")
    m = ts.meta
    assert (m.num_moe_layers, m.num_experts, m.top_k) == (L, E, K)
    assert m.vocab_size == len(tok) and m.architecture.lower().startswith("olmoe")
    assert ts.meta.num_tokens >= 100_000
    prompt_ids = {json.loads(line)["prompt_id"] for line in open(DEMO / "prompts.jsonl")}
    assert set(ts.prompt_ids.tolist()) <= prompt_ids
    # the recorded prefill routing is what the committed model routes for those tokens
    rec = ts.record(0)
    ids = torch.as_tensor(rec.token_ids[: rec.num_prefill])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    again = np.stack([lg.topk(K, -1).indices.numpy() for lg in logits], 1)
    same = (np.sort(again, -1) == np.sort(rec.experts[: rec.num_prefill], -1)).all(-1).mean()
    assert same > 0.95  # the recording dtype may flip a few near-ties


def _tiny_corpora(root: Path) -> Path:
    (root / "tinyshakespeare").mkdir(parents=True)
    (root / "tinyshakespeare" / "input.txt").write_text(
        "\n\n".join(f"ROMEO:\nSpeech number {i} of the play,\nwith words and more words." for i in range(120))
    )
    (root / "gsm8k").mkdir()
    for split, n in (("train", 40), ("test", 10)):
        with open(root / "gsm8k" / f"{split}.jsonl", "w") as f:
            f.writelines(
                json.dumps(
                    {
                        "question": f"Ann has {i} pens and buys {i + 2}. How many?",
                        "answer": f"{i}+{i + 2}=<<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n#### {2 * i + 2}",
                    }
                )
                + "\n"
                for i in range(n)
            )
    (root / "humaneval").mkdir()
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.writelines(
            json.dumps(
                {
                    "prompt": f'def f{i}(x):\n    """Add {i}."""\n',
                    "canonical_solution": f"    return x + {i}\n",
                    "test": f"\n\ndef check(c):\n    assert c(1) == {i + 1}\n" * 3,
                }
            )
            + "\n"
            for i in range(10)
        )
    return root


def test_recipe_trains_and_saves_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    corpora = _tiny_corpora(tmp_path / "corpora")
    cfg = train_demo_model.RecipeConfig(
        vocab_size=300,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_experts=4,
        top_k=2,
        intermediate_size=32,
        seq_len=32,
        batch_size=2,
        warmup=2,
    )
    out = train_demo_model.train_demo(tmp_path / "model", cfg, steps=3, corpora=corpora, log=lambda m: None)
    info = json.loads((out / "recipe.json").read_text())
    assert info["steps"] == 3 and info["recipe"]["num_experts"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "olmoe" and model.config.vocab_size == len(tok) == 300
    assert model.dtype == torch.bfloat16
    ids = tok("ROMEO:", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]

    # --steps runs repeat exactly: same tokenizer, same weights
    again = train_demo_model.train_demo(tmp_path / "again", cfg, steps=3, corpora=corpora, log=lambda m: None)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (out / name).read_bytes() == (again / name).read_bytes()
    # an --out holding other files (a downloaded model's shards, say) is refused before training; an earlier
    # recipe's output is replaced whole
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "model-00001-of-00002.safetensors").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds files this recipe did not write: pass --overwrite"):
        train_demo_model.train_demo(tmp_path / "theirs", cfg, steps=3, corpora=corpora, log=lambda m: None)
    assert (tmp_path / "theirs" / "model-00001-of-00002.safetensors").read_text() == "keep me"
    (again / "stale.txt").write_text("from before")
    train_demo_model.train_demo(again, cfg, steps=3, corpora=corpora, log=lambda m: None)
    assert not (again / "stale.txt").exists() and (again / "recipe.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no hidden leftovers

    prompts = train_demo_model.make_prompts(tok, corpora, max_tokens=24)
    assert len(prompts) > 10
    assert max(len(tok(p["text"])["input_ids"]) for p in prompts) <= 24
