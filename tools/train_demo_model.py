"""Recipe for the embedded demo model: a tiny OLMoE-architecture LM with its own tokenizer.

    python -m tools.train_demo_model train --out data/demo/model --minutes 12
    python -m tools.train_demo_model prompts --model data/demo/model --out data/demo/prompts.jsonl

(then `collect.py` records the traces and `python -m integrate.demo_report` checks that the routing
is learned; data/demo/README.md has the exact commands and the figures.)

Trained on CPU from three permissively licensed corpora of different kinds (Shakespeare, grade-school
maths, Python) so that routing has structure worth predicting. Held-out text (the last tenth of
Shakespeare, GSM8K test, every eighth HumanEval problem) never enters training; the demo prompts are
drawn from it. Everything is seeded. `--steps N` is the exactly repeatable form; `--minutes M` bounds
wall time instead (the CPU may be shared, so speed is unknown in advance): the learning-rate schedule
then follows elapsed time, and `recipe.json` records how many steps that came to.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from predictor.atomic import swap_into_place, write_text_atomic

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpora"
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2
DOMAINS = ("shakespeare", "gsm8k", "code")
MAX_PROMPT_TOKENS = 128  # bos included


@dataclass
class RecipeConfig:
    vocab_size: int = 3072
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    intermediate_size: int = 192
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    # twice OLMoE's 0.01, to keep all experts of a briefly trained tiny model in use (a choice, not tuned)
    aux_loss_coef: float = 0.02
    # sampling weights per domain; the code corpus is small, so it is revisited more often
    mix: tuple = (0.35, 0.45, 0.20)
    seed: int = 0


# ---------------------------------------------------------------- corpora


def load_corpora(root: Path = CORPORA) -> dict[str, dict[str, list[str]]]:
    """{domain: {"train": docs, "heldout": docs}}; the held-out part never enters training."""
    if not root.is_dir():
        raise FileNotFoundError(f"corpora not found at {root} (expected ../shared/data/corpora)")
    text = (root / "tinyshakespeare" / "input.txt").read_text()
    speeches = [s.strip() for s in text.split("\n\n") if s.strip()]
    cut = int(len(speeches) * 0.9)  # contiguous held-out tail: no speech from it is seen in training
    gsm = {
        split: [_gsm_doc(json.loads(line)) for line in open(root / "gsm8k" / f"{split}.jsonl")]
        for split in ("train", "test")
    }
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        code = [json.loads(line) for line in f]
    code_docs = [p["prompt"] + p["canonical_solution"] + p["test"] for p in code]
    return {
        "shakespeare": {"train": _group(speeches[:cut], 1200), "heldout": speeches[cut:]},
        "gsm8k": {"train": gsm["train"], "heldout": gsm["test"]},
        "code": {
            "train": [d for i, d in enumerate(code_docs) if i % 8],
            "heldout": [d for i, d in enumerate(code_docs) if i % 8 == 0],
        },
    }


def _gsm_doc(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer: {row['answer']}"


def _group(parts: list[str], chars: int) -> list[str]:
    """Consecutive speeches joined into documents of about `chars` characters."""
    docs, cur = [], []
    for p in parts:
        cur.append(p)
        if sum(map(len, cur)) >= chars:
            docs.append("\n\n".join(cur))
            cur = []
    return docs + (["\n\n".join(cur)] if cur else [])


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE with bos/pad/eos inside the vocab; encoding prepends bos, as in training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=1024,
    )


def token_streams(tokenizer, docs_by_domain: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """One flat id stream per domain: bos doc eos bos doc eos ..."""
    eos = tokenizer.eos_token_id
    out = {}
    for name, docs in docs_by_domain.items():
        ids = tokenizer(docs)["input_ids"]
        out[name] = np.concatenate([np.asarray(x + [eos], dtype=np.int32) for x in ids])
    return out


# ---------------------------------------------------------------- model + training


def model_config(cfg: RecipeConfig, tokenizer):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=1024,
        router_aux_loss_coef=cfg.aux_loss_coef,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sample_batch(streams: dict[str, np.ndarray], cfg: RecipeConfig, rng: np.random.Generator) -> torch.Tensor:
    names = list(DOMAINS)
    rows = []
    for d in rng.choice(len(names), size=cfg.batch_size, p=np.asarray(cfg.mix) / sum(cfg.mix)):
        s = streams[names[d]]
        start = rng.integers(0, len(s) - cfg.seq_len)
        rows.append(s[start : start + cfg.seq_len])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def lr_at(step: int, progress: float, cfg: RecipeConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine to a tenth by `progress` (0..1) of the run."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def eval_loss(model, streams: dict[str, np.ndarray], cfg: RecipeConfig, batches: int = 4) -> dict[str, float]:
    """Cross-entropy per domain on fixed held-out windows."""
    model.eval()
    rng = np.random.default_rng(1234)
    out = {}
    for name in DOMAINS:
        one = {n: streams[name] for n in DOMAINS}  # every domain slot draws from this one stream
        losses = [
            model(input_ids=(x := sample_batch(one, cfg, rng)), labels=x).loss.item() for _ in range(batches)
        ]
        out[name] = round(float(np.mean(losses)), 4)
    model.train()
    return out


def train_demo(
    out: str | Path,
    cfg: RecipeConfig,
    *,
    minutes: float | None = None,
    steps: int | None = None,
    corpora: Path = CORPORA,
    log=print,
    overwrite: bool = False,
) -> Path:
    """Train tokenizer and model, save both (bfloat16) plus recipe.json to `out`, whole or not at all (a
    sibling folder renamed into place). An `out` with other files than an earlier recipe's is refused
    unless `overwrite`, before any training: saving into it would replace or delete what is there.

    With `steps`, the run is exactly reproducible; with `minutes` (setup included), progress through
    the schedule is elapsed time over the budget, and the step count it came to is recorded.
    """
    from transformers import OlmoeForCausalLM

    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one of steps or minutes")
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or (any(out.iterdir()) and not (out / "recipe.json").is_file())):
        raise FileExistsError(f"--out {out} holds files this recipe did not write: pass --overwrite to replace it")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    corp = load_corpora(corpora)
    tokenizer = train_tokenizer([d for c in corp.values() for d in c["train"]], cfg.vocab_size)
    train_s = token_streams(tokenizer, {n: corp[n]["train"] for n in DOMAINS})
    held_s = token_streams(tokenizer, {n: corp[n]["heldout"] for n in DOMAINS})
    log(
        f"tokenizer: vocab {len(tokenizer)}; train tokens "
        + ", ".join(f"{n} {len(s)}" for n, s in train_s.items())
    )

    model = OlmoeForCausalLM(model_config(cfg, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f} M parameters")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    t_train = time.time()
    budget = None if minutes is None else max(1.0, minutes * 60 - (t_train - t0))
    step = 0

    def progress() -> float:
        return step / steps if budget is None else (time.time() - t_train) / budget

    while progress() < 1.0:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, progress(), cfg)
        x = sample_batch(train_s, cfg, rng)
        res = model(input_ids=x, labels=x, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(
                f"step {step} loss {res.loss.item():.3f} aux {res.aux_loss.item():.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s"
            )

    held = eval_loss(model, held_s, cfg)
    log(f"held-out loss per domain: {held}")
    out.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))  # whole before it is `out`
    info = {
        "recipe": asdict(cfg),
        "steps": step,
        "tokens_seen": step * cfg.batch_size * cfg.seq_len,
        "parameters": n_params,
        "train_seconds": round(time.time() - t0),
        "threads": torch.get_num_threads(),
        "heldout_loss": held,
        "train_tokens": {n: int(len(s)) for n, s in train_s.items()},
        "command": f"python -m tools.train_demo_model train --out {out} "
        + (f"--steps {steps}" if minutes is None else f"--minutes {minutes:g}"),
    }
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:  # nothing half-saved is left beside `out`, and `out` is put back (else the error names where it is)
        model.to(torch.bfloat16).save_pretrained(new)
        tokenizer.save_pretrained(new)
        write_text_atomic(new / "recipe.json", json.dumps(info, indent=2) + "\n")
        moved = swap_into_place(new, out, old)  # an earlier recipe's output, or what --overwrite gave up
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)  # ours (gone after a swap)
        raise
    if moved and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif moved:
        old.unlink(missing_ok=True)
    log(f"saved to {out} after {info['train_seconds']} s")
    return out


# ---------------------------------------------------------------- prompts


def make_prompts(tokenizer, corpora: Path = CORPORA, max_tokens: int = MAX_PROMPT_TOKENS) -> list[dict]:
    """Held-out text cut into chunks of at most `max_tokens` tokens (bos included), at line breaks.

    GSM8K contributes the first chunk of each test problem (question and start of the worked answer);
    Shakespeare and HumanEval are cut into consecutive chunks.
    """
    corp = load_corpora(corpora)
    texts = [_chunks(tokenizer, d, max_tokens)[0] for d in corp["gsm8k"]["heldout"]]
    for name in ("shakespeare", "code"):
        docs = corp[name]["heldout"] if name == "code" else _group(corp[name]["heldout"], 400)
        texts += [c for d in docs for c in _chunks(tokenizer, d, max_tokens)]
    return [{"prompt_id": i, "text": t} for i, t in enumerate(texts) if t.strip()]


def _chunks(tokenizer, doc: str, max_tokens: int) -> list[str]:
    out, cur = [], ""
    for line in doc.splitlines(keepends=True):
        if cur and len(tokenizer(cur + line)["input_ids"]) > max_tokens:
            out.append(cur)
            cur = ""
        cur += line
        while len(tokenizer(cur)["input_ids"]) > max_tokens:  # one overlong line: cut at a token boundary
            enc = tokenizer(cur, return_offsets_mapping=True)
            end = enc["offset_mapping"][max_tokens - 1][1]
            out.append(cur[:end])
            cur = cur[end:]
    return out + ([cur] if cur else [])


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.train_demo_model", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train tokenizer + model and save them (HF format, bfloat16)")
    t.add_argument("--out", default="data/demo/model")
    g = t.add_mutually_exclusive_group(required=True)
    g.add_argument(
        "--minutes",
        type=float,
        help="wall-time budget, setup included; recipe.json records the steps it came to",
    )
    g.add_argument("--steps", type=int, help="exact number of optimizer steps (reproducible)")
    # one thread: on busy shared cores more threads make spinning workers that slow every step (docs/RESULTS.md)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--overwrite", action="store_true", help="replace an --out that holds files the recipe did not write")
    p = sub.add_parser("prompts", help="write held-out demo prompts as jsonl {prompt_id, text}")
    p.add_argument("--model", default="data/demo/model", help="its tokenizer sets the chunk length")
    p.add_argument("--out", default="data/demo/prompts.jsonl")
    args = ap.parse_args(argv)

    if args.cmd == "train":
        torch.set_num_threads(args.threads)
        train_demo(
            args.out,
            RecipeConfig(),
            minutes=args.minutes,
            steps=args.steps,
            log=lambda m: print(m, flush=True),
            overwrite=args.overwrite,
        )
    else:
        from transformers import AutoTokenizer

        prompts = make_prompts(AutoTokenizer.from_pretrained(args.model))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out, "".join(json.dumps(r) + "\n" for r in prompts))
        print(f"wrote {len(prompts)} prompts to {args.out}")


if __name__ == "__main__":
    from predictor.cli import run

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(main)
