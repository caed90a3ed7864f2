"""`python -m predictor.importers {vllm,sglang,jsonl,parquet} IN [IN ...] OUT --tokenizer NAME ...`"""

from __future__ import annotations

import argparse
import time

from predictor.cli import positive_int
from predictor.importers import FORMATS, import_traces
from predictor.importers.common import Model, parse_layers


def _layers(text: str) -> list[int]:
    try:
        return parse_layers(text)
    except ValueError as e:  # argparse would print its own "invalid value" instead of what is wrong
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m predictor.importers",
                                 description="Import routing traces from vLLM, SGLang, or JSONL / Parquet rows.")
    sub = ap.add_subparsers(dest="format", required=True)
    for fmt in FORMATS:
        p = sub.add_parser(fmt, help=f"import {fmt}")
        p.add_argument("inputs", nargs="+" if fmt == "sglang" else 1,
                       help="dump files or directories of them" if fmt == "sglang" else "input file")
        p.add_argument("out", help="trace directory to write")
        p.add_argument("--tokenizer", required=True,
                       help="the tokenizer whose ids the input holds (as given to collect.py): the token space")
        p.add_argument("--model", default=None, help="source model name (default: the file's, else --tokenizer)")
        p.add_argument("--architecture", default=None, help="model_type, e.g. deepseek_v2 (default: the file's)")
        p.add_argument("--num-experts", type=positive_int, default=None, help="routed experts per MoE layer (E)")
        p.add_argument("--num-layers", type=positive_int, default=None, help="decoder layers, dense ones included")
        p.add_argument("--moe-layers", type=_layers, default=None, metavar="SPEC",
                       help="decoder-layer indices of the MoE layers, e.g. 1-26 (default: from the file)")
        p.add_argument("--vocab-size", type=positive_int, default=None, help="the tokenizer's vocabulary size")
        p.add_argument("--num-shared-experts", type=int, default=0)
        p.add_argument("--limit", type=positive_int, default=None, help="import only the first N sequences")
        p.add_argument("--overwrite", action="store_true", help="replace an existing trace set at OUT")
        if fmt == "sglang":
            p.add_argument("--rank", type=int, default=None, help="only this rank's records; required when the dumps hold "
                           "several (tensor parallel ranks all record the same passes: pass --rank 0)")
            p.add_argument("--link-by-order", action="store_true",
                           help="without request ids, resolve ambiguous sequences by SGLang's batch order")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    model = Model(tokenizer=args.tokenizer, source_model=args.model, architecture=args.architecture,
                  num_experts=args.num_experts, num_layers=args.num_layers, moe_layers=args.moe_layers,
                  vocab_size=args.vocab_size, num_shared_experts=args.num_shared_experts)
    options = {"rank": args.rank, "by_order": args.link_by_order} if args.format == "sglang" else {}
    start = time.perf_counter()
    ts = import_traces(args.format, args.inputs, args.out, model, overwrite=args.overwrite, limit=args.limit,
                       **options)
    m = ts.meta
    print(f"wrote {ts.path}: {m.num_sequences:,} sequences, {m.num_tokens:,} tokens, {m.num_moe_layers} MoE "
          f"layers {m.moe_layers[0]}..{m.moe_layers[-1]} of {m.num_layers}, top-{m.top_k} of {m.num_experts} "
          f"experts, token space {m.token_space}, {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
