"""Run prompts through vLLM with routed-expert capture; save what `python -m predictor.importers vllm` reads.

    # in-process engine (vLLM installed here; loads the model):
    python -m tools.vllm_client --model deepseek-ai/DeepSeek-V2-Lite-Chat --prompts prompts.jsonl \
        --out routed.jsonl --max-tokens 128 [--temperature 0.8] [--engine-args '{"tensor_parallel_size": 2}']
    # a server started with `vllm serve MODEL --enable-return-routed-experts` (prefix caching left on, as
    # vLLM's routed-experts return requires; older releases advised turning it off: pass
    # --engine-args '{"enable_prefix_caching": false}' in-process if yours does):
    python -m tools.vllm_client --server http://localhost:8000 --model MODEL --prompts prompts.txt --out routed.jsonl
    # then
    python -m predictor.importers vllm routed.jsonl data/big/traces/my-set --tokenizer MODEL

Prompts: as collect.py reads them (predictor/prompts.py): a .txt file (one per line, or paragraphs when it
has blank lines) or .jsonl (field `text`, `question` or `prompt`; ids from `prompt_id` when present, else
the line order). They are sent as completion text as they are: apply a
chat template first if the model needs one. vLLM is imported only when the in-process engine runs;
the saving part (`rows_from_request_output`, `row_from_completion_choice`, `write_output`) needs numpy
only. Output: JSON Lines, a header then one line per completion (format in predictor/importers/vllm.py),
written to a temporary file and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from predictor.atomic import atomic_path
from predictor.prompts import load_prompts  # as collect.py reads them

FORMAT = "moe-prefetch/vllm-routed-experts"  # predictor/importers/vllm.py reads it
VERSION = 1
EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")  # the HF config's name for E


def encode_npy(arr) -> str:
    """An int array as base64 `.npy` bytes: the encoding vLLM's server uses for `routed_experts`."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def geometry(hf_config) -> dict:
    """Layers, experts, top_k, model type and vocabulary size from an HF config (object or dict)."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
    experts = next((get(k) for k in EXPERT_KEYS if get(k) is not None), None)
    return {"num_layers": get("num_hidden_layers"), "num_experts": experts, "top_k": get("num_experts_per_tok"),
            "architecture": get("model_type"), "vocab_size": get("vocab_size")}


def header(model: str, tokenizer: str, geo: dict | None, engine: str, sampling: dict, prompts: str = "",
           routed_experts_prompt_start: int = 0, vllm_version: str | None = None) -> dict:
    return {"format": FORMAT, "version": VERSION, "model": model, "tokenizer": tokenizer, "geometry": geo or {},
            "client": engine, "sampling": sampling, "prompts": prompts, "vllm_version": vllm_version,
            "routed_experts_prompt_start": routed_experts_prompt_start}


def rows_from_request_output(prompt_id: int, output) -> list[dict]:
    """One line per completion of a `vllm.RequestOutput` (`LLM.generate`'s result)."""
    rows = []
    for completion in output.outputs:
        routed = getattr(completion, "routed_experts", None)
        rows.append({"prompt_id": int(prompt_id), "prompt_token_ids": [int(t) for t in output.prompt_token_ids],
                     "output_token_ids": [int(t) for t in completion.token_ids],
                     "routed_experts": None if routed is None else encode_npy(routed),
                     "finish_reason": completion.finish_reason})
    return rows


def row_from_completion_choice(prompt_id: int, choice: dict) -> dict:
    """One line from a /v1/completions response choice (requested with `return_token_ids: true`)."""
    for key in ("prompt_token_ids", "token_ids"):
        if choice.get(key) is None:
            raise ValueError(f"prompt {prompt_id}: the response has no {key!r}; is this vLLM with return_token_ids?")
    return {"prompt_id": int(prompt_id), "prompt_token_ids": choice["prompt_token_ids"],
            "output_token_ids": choice["token_ids"], "routed_experts": choice.get("routed_experts"),
            "finish_reason": choice.get("finish_reason")}


def write_output(path: str | Path, head: dict, rows: Iterable[dict]) -> Path:
    """Header and rows as JSON Lines at `path`, atomically (a temporary sibling renamed when complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for obj in (head, *rows):
            f.write(json.dumps(obj) + "\n")
    return path


def run_engine(args, prompts: list[tuple[int, str]]) -> tuple[dict, list[dict]]:
    try:
        import vllm  # only here: the saving part must not need vLLM
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise SystemExit(f"vLLM is not importable here ({e}): `pip install vllm`, or use --server URL") from None

    llm = LLM(model=args.model, tokenizer=args.tokenizer, enable_return_routed_experts=True,
              **json.loads(args.engine_args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    outputs = llm.generate([text for _, text in prompts], params)
    hf = llm.llm_engine.model_config.hf_text_config
    rows = [row for (pid, _), out in zip(prompts, outputs) for row in rows_from_request_output(pid, out)]
    return header(args.model, args.tokenizer or args.model, geometry(hf), "llm", _sampling(args), args.prompts,
                  vllm_version=vllm.__version__), rows


def run_server(args, prompts: list[tuple[int, str]]) -> tuple[dict, list[dict]]:
    rows = []
    for pid, text in prompts:
        body = {"model": args.model, "prompt": text, "return_token_ids": True, **_sampling(args)}
        req = urllib.request.Request(f"{args.server.rstrip('/')}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=args.timeout) as r:
            rows.append(row_from_completion_choice(pid, json.loads(r.read())["choices"][0]))
    geo = geometry(json.loads(Path(args.hf_config).read_text())) if args.hf_config else None
    return header(args.model, args.tokenizer or args.model, geo, "server", _sampling(args), args.prompts), rows


def _sampling(args) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.vllm_client", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model name or path (the server's served name with --server)")
    ap.add_argument("--tokenizer", default=None, help="default: --model")
    ap.add_argument("--prompts", required=True, help=".txt or .jsonl, read as collect.py reads them (predictor/prompts.py)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--server", default=None, help="URL of a running `vllm serve` (default: run vLLM in this process)")
    ap.add_argument("--hf-config", default=None, help="with --server: the model's config.json, for the geometry")
    ap.add_argument("--engine-args", default="{}", help="JSON of extra vllm.LLM arguments")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request (--server)")
    args = ap.parse_args(argv)
    prompts = load_prompts(args.prompts)
    head, rows = (run_server if args.server else run_engine)(args, prompts)
    print(write_output(args.out, head, rows), f"{len(rows)} completions")
    return 0


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
