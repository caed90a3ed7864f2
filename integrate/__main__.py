"""`python -m integrate decode ...`: greedy generation with the model's experts offloaded.

(The trace-replay benchmark is `python -m benchmarks.bench_replay`, run from the repository root.)"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _capacity(text: str):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text  # a size such as "4GiB"


def decode(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from integrate.runtime import install

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()
    # routed_forward reproduces eager and grouped_mm bit for bit; on a GPU, generate() swaps grouped_mm
    # for batched_mm while decoding, so use eager there (reference and offloaded runs alike)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.set_experts_implementation("grouped_mm" if device == "cpu" else "eager")
    prompts = args.prompts or ["The quick brown fox"]
    encoded = [tok(p, return_tensors="pt").input_ids for p in prompts]
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    reference = None
    if args.check:  # the unpatched model's tokens, for an exactness check
        with torch.no_grad():
            reference = [model.generate(ids, **gen) for ids in encoded]
    rt = install(
        model,
        predictor=args.predictor,
        capacity=_capacity(args.capacity),
        policy=args.policy,
        device=device,
        prefetch=args.prefetch,
        per_layer=args.per_layer,
        budget=args.budget,
        threshold=args.threshold,
        max_inflight=args.max_inflight,
    )
    s = rt.spec
    print(
        f"{s.architecture}: {len(s.moe_layers)} MoE layers x {s.num_experts} experts "
        f"({s.expert_bytes / 2**20:.2f} MiB each), {rt.cache.pool.num_slots} slots on {rt.cache.device}, "
        f"policy {args.policy}, prefetch {type(rt.driver).__name__ if rt.driver else 'none'}"
    )
    mismatches = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, ids in enumerate(encoded):
            out = model.generate(ids.to(rt.cache.device), **gen).cpu()
            print(f"[{i}] {tok.decode(out[0][ids.shape[1] :], skip_special_tokens=True)!r}")
            if reference is not None and not torch.equal(out, reference[i]):
                mismatches += 1
                print(f"[{i}] MISMATCH with the unpatched model")
    wall = time.perf_counter() - t0
    print(rt.counters.summary())
    print(f"wall {wall:.2f} s for {len(encoded)} prompt(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rt.counters.as_dict(), f, indent=2)
    if reference is not None:
        print(
            "check: tokens identical to the unpatched model"
            if not mismatches
            else f"check: {mismatches} mismatch(es)"
        )
    rt.uninstall()
    return 1 if mismatches else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m integrate", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("decode", help="greedy generation with experts offloaded; prints the counters")
    d.add_argument("--model", default="data/demo/model")
    d.add_argument("--predictor", default=None, help="exported predictor (.safetensors)")
    d.add_argument("--capacity", default="0.25", help="fraction of experts, expert count, or size like 4GiB")
    d.add_argument("--policy", default="lru", choices=["lru", "lfu", "predictor"])
    d.add_argument(
        "--prefetch",
        default=None,
        choices=["none", "cooc", "predictor"],
        help="default: predictor if --predictor is given, else none",
    )
    d.add_argument("--per-layer", action="store_true", help="split the slots evenly per layer")
    d.add_argument("--budget", type=int, default=None, help="experts prefetched per layer (default top_k)")
    d.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="predictor prefetch only for experts with probability >= this",
    )
    d.add_argument("--max-inflight", type=int, default=8, help="prefetch copies on the copy stream at once")
    d.add_argument("--prompts", nargs="*", default=None)
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--device", default=None, help="default: cuda when available")
    d.add_argument("--check", action="store_true", help="also run the unpatched model and compare tokens")
    d.add_argument("--json", default=None, help="write the counters here")
    d.set_defaults(fn=decode)

    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
