"""`python -m integrate decode ...`: generation (greedy, or sampled) with the model's experts offloaded.

(The trace-replay benchmark is `python -m benchmarks.bench_replay`, run from the repository root.)"""

from __future__ import annotations

import argparse
import time

from predictor.atomic import write_json_atomic
from predictor.cli import positive_int


def _generation(args, pad_token_id) -> dict:
    """generate() settings: greedy, or sampled with --do-sample (temperature, top-p, top-k)."""
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, pad_token_id=pad_token_id)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.do_sample:
        gen.update({k: v for k, v in sampling.items() if v is not None})
    elif any(v is not None for v in sampling.values()):
        raise ValueError("--temperature, --top-p and --top-k need --do-sample")
    return gen


DEFAULTS = dict(policy="lru", threshold=0.0, max_inflight=None, hybrid=False)  # max_inflight: the cache's


def _settings(args) -> dict:
    """The cache settings: a --schedule's (integrate.runtime.drivers.schedule_settings), else the
    defaults; flags given explicitly override either."""
    from integrate.runtime.cache import MAX_INFLIGHT
    from integrate.runtime.drivers import schedule_settings

    base = DEFAULTS | {"max_inflight": MAX_INFLIGHT}  # imported here: the module loads torch
    if args.schedule:
        base.update({k: v for k, v in schedule_settings(args.schedule).items() if v is not None})
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}  # --hybrid: None, thread or pool
    return base | given


def decode(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from integrate.runtime import install
    from predictor.cli import check_model_ref
    from predictor.token_space import tokenizer_space

    if args.threads:
        torch.set_num_threads(args.threads)
    check_model_ref(args.model, "--model")  # a local path that is not there, named as one
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:  # batches need a pad token; generate() masks it out
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only generation continues every row from its last column
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()
    # routed_forward reproduces eager and grouped_mm bit for bit; on a GPU, generate() swaps grouped_mm
    # for batched_mm while decoding, so use eager there (reference and offloaded runs alike)
    device = args.device  # resolved by main()
    model.set_experts_implementation("grouped_mm" if device == "cpu" else "eager")
    prompts = args.prompts or ["The quick brown fox"]
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    encoded = [tok(b, return_tensors="pt", padding=True) for b in batches]
    gen = _generation(args, tok.pad_token_id)

    def generate(enc, where):
        torch.manual_seed(args.seed)  # the same seed for every batch and run: sampled runs stay comparable
        with torch.no_grad():
            return model.generate(
                input_ids=enc.input_ids.to(where), attention_mask=enc.attention_mask.to(where), **gen
            ).cpu()

    reference = None
    if args.check:  # the unpatched model on the run's device: across devices the kernels round differently
        model.to(device)
        reference = [generate(enc, device) for enc in encoded]
        model.to("cpu")
    methods = args.prefetch or ["predictor" if args.predictor else "none"]
    picks = ", ".join(f"{k} {gen[k]}" for k in ("temperature", "top_p", "top_k") if k in gen)
    mode = f"sampling (seed {args.seed}{', ' + picks if picks else ''})" if args.do_sample else "greedy"
    settings = _settings(args)
    results, failed = {}, False
    for method in methods:
        rt = install(
            model,
            predictor=args.predictor,
            capacity=args.capacity,  # a count, a fraction or a size: resolve_capacity reads the text
            policy=settings["policy"],
            device=device,
            prefetch=method,
            per_layer=args.per_layer,
            budget=args.budget,
            # a schedule's admission cut is a predictor's: cooc and gate get it only from --threshold itself
            threshold=settings["threshold"] if method == "predictor" or args.threshold is not None else 0.0,
            max_inflight=settings["max_inflight"],
            hybrid=settings["hybrid"],
            predictor_device=args.predictor_device,
            token_space=tokenizer_space(tok),
            predictor_worker={"off": False, "async": True, "wait": "wait"}[args.predictor_worker],
        )
        s = rt.spec
        print(
            f"{s.architecture}: {len(s.moe_layers)} MoE layers x {s.num_experts} experts "
            f"({s.expert_bytes / 2**20:.2f} MiB each), {rt.cache.pool.num_slots} slots on {rt.cache.device}, "
            f"policy {settings['policy']}, prefetch {method} ({type(rt.driver).__name__ if rt.driver else '-'}), "
            f"batch {args.batch_size}, {mode}"
        )
        mismatches = 0
        t0 = time.perf_counter()
        for i, enc in enumerate(encoded):
            out = generate(enc, rt.cache.device)
            for r, row in enumerate(out):
                text = tok.decode(row[enc.input_ids.shape[1] :], skip_special_tokens=True)
                print(f"[{i * args.batch_size + r}] {text!r}")
            if reference is not None and not torch.equal(out, reference[i]):
                mismatches += 1
                print(f"[batch {i}] MISMATCH with the unpatched model")
        wall = time.perf_counter() - t0
        print(rt.counters.summary())
        print(f"wall {wall:.2f} s for {len(prompts)} prompt(s)")
        if reference is not None:
            print(
                "check: tokens identical to the unpatched model"
                if not mismatches
                else f"check: {mismatches} mismatch(es)"
            )
        results[method] = rt.counters.as_dict()
        failed |= mismatches > 0
        rt.uninstall()
    if len(methods) > 1:
        print(compare(results))
    if args.json:
        write_json_atomic(args.json, results[methods[0]] if len(methods) == 1 else results)
    return 1 if failed else 0


def compare(results: dict[str, dict]) -> str:
    """One row per prefetch method: the prediction recall next to what it bought."""
    lines = [
        f"{'prefetch':<10} {'recall':>7} {'hit rate':>8} {'pf issued/used/wasted':>22} {'pred ms/step':>12} {'tokens/s':>9}"
    ]
    for method, c in results.items():
        recall = f"{c['prediction_recall']:.1%}" if c["routed_scored"] else "-"
        pf = f"{c['prefetches_issued']}/{c['prefetches_used']}/{c['prefetches_wasted']}"
        lines.append(
            f"{method:<10} {recall:>7} {c['hit_rate']:>8.1%} {pf:>22} {c['predictor_ms_per_step']:>12.3f} {c['tokens_per_s']:>9.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m integrate", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("decode", help="generation with experts offloaded; prints the counters")
    d.add_argument("--model", default="data/demo/model", help="local path or hub name of a MoE causal LM (default: the embedded demo model)")
    d.add_argument("--predictor", default=None, help="exported predictor (.safetensors)")
    d.add_argument("--capacity", default="0.25", help="fraction of experts, expert count, or size like 4GiB")
    d.add_argument("--schedule", default=None, choices=["naive", "scheduler", "scheduler_load"],
                   help="a part-1 scheduling policy's cache settings (eviction, probability cut, copies in "
                        "flight; scheduler: the learned eviction); --policy, --threshold, --max-inflight and "
                        "--hybrid override them")
    d.add_argument("--policy", default=None, choices=["lru", "lfu", "predictor", "learned"], help="default: lru")
    d.add_argument(
        "--prefetch",
        nargs="+",
        default=None,
        choices=["none", "cooc", "predictor", "gate"],
        help="one or more (each runs in turn, then a table compares their prediction recall); "
        "gate: the next layer's router on the previous layer's hidden state; "
        "default: predictor if --predictor is given, else none",
    )
    d.add_argument("--per-layer", action="store_true", help="split the slots evenly per layer")
    d.add_argument("--budget", type=int, default=None, help="experts prefetched per layer (default top_k)")
    d.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="predictor prefetch only for experts with probability >= this (default 0)",
    )
    d.add_argument("--max-inflight", type=int, default=None, help="prefetch copies on the copy stream at once (default 8)")
    d.add_argument("--hybrid", nargs="?", const="thread", choices=("thread", "pool"), default=None,
                   help="compute a miss on the host CPU when that beats its copy: on the calling thread (thread, "
                        "the default) or a pool thread in the stream's order (pool)")
    d.add_argument("--predictor-device", default=None,
                   help="where the predictor runs (default: --device); cpu: off the GPU's launch queue at batch 1")
    d.add_argument("--predictor-worker", choices=("off", "async", "wait"), default="off",
                   help="run the predictor in a worker process on another host core (async: its picks are "
                        "prefetched when they are back; wait: waited for, as the in-process driver's)")
    d.add_argument("--prompts", nargs="*", default=None)
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--batch-size", type=int, default=1, help="prompts per generate() call (left-padded)")
    d.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    d.add_argument("--temperature", type=float, default=None, help="with --do-sample")
    d.add_argument("--top-p", type=float, default=None, help="with --do-sample")
    d.add_argument("--top-k", type=int, default=None, help="with --do-sample")
    d.add_argument("--seed", type=int, default=0, help="torch.manual_seed before every generate() call")
    d.add_argument("--device", default=None, help="default: cuda when available")
    d.add_argument("--threads", type=positive_int, default=None,
                   help="torch's host threads (default: torch's own, one per core; the model's CPU work, a "
                        "--hybrid miss's expert; on cores other jobs share, 1 is often faster)")
    d.add_argument(
        "--check", action="store_true",
        help="also run the unpatched model on --device (the whole model must fit there) and compare tokens"
    )
    d.add_argument("--json", default=None, help="write the counters here (one object per method if several)")
    d.set_defaults(fn=decode)

    args = ap.parse_args(argv)
    if args.cmd == "decode":  # bad settings fail here, before the model loads
        from integrate.runtime.drivers import check_settings
        from predictor.cli import resolve_device

        try:
            args.device = str(resolve_device(args.device or "auto", "--device"))  # what decode() runs on
            if args.predictor_device is not None:
                resolve_device(args.predictor_device, "--predictor-device")
            s = _settings(args)
            check_settings(budget=args.budget, threshold=s["threshold"], max_inflight=s["max_inflight"])
            if args.batch_size < 1:
                raise ValueError(f"--batch-size {args.batch_size}: prompts per generate() call, must be >= 1")
            _generation(args, pad_token_id=None)  # the sampling flags
        except ValueError as e:
            ap.error(str(e))
    return args.fn(args)


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
