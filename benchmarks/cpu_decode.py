"""Host overhead of the offloading runtime on CPU: greedy decoding of the embedded demo model, each
configuration against the unpatched model in the same run.

    python -m benchmarks.cpu_decode [--predictor <run>/predictor.safetensors] [--tokens 64] [--repeats 3]

Every configuration gets its own copy of the model; the runs are interleaved (unpatched, then each
configuration, repeated), and each reports its best time, so a load that drifts during the run
touches every configuration alike. On CPU an expert "copy" is a host memcpy: this measures the
runtime's per-layer and per-expert host work, not transfer stalls. Tokens are checked identical.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from predictor.cli import check_model_ref

CONFIGS = {  # name -> install() keywords
    "all resident": dict(capacity=1.0),
    "LRU 25 %": dict(capacity=0.25),
    "co-occurrence 25 %": dict(capacity=0.25, prefetch="cooc"),
    "predictor 25 %": dict(capacity=0.25, policy="predictor", prefetch="predictor"),
    # the predictor in a worker process on another core (needs a second free core to mean anything)
    "predictor 25 %, worker process": dict(capacity=0.25, policy="predictor", prefetch="predictor",
                                           predictor_worker=True),
    "hybrid 25 % (misses from the host store)": dict(capacity=0.25, hybrid=True),
}


def predictor_step_ms(path: str, repeats: int, steps: int = 50) -> float:
    """The predictor's incremental step (`step`: the trunk for one decode token) alone, best of `repeats`."""
    from predictor.export import load_predictor

    model = load_predictor(path)
    L, k = model.config.num_layers, model.config.top_k
    state, prev = model.init_state(1), None
    for t in range(8):  # warm-up: the KV cache and the RoPE table
        model.step(state, torch.tensor([t + 1]), prev)
        prev = torch.zeros(1, L, k, dtype=torch.long)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for t in range(steps):
            model.step(state, torch.tensor([t + 1]), prev)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="data/demo/model")
    ap.add_argument("--predictor", default=None, help="exported predictor for the 'predictor' row (skipped without)")
    ap.add_argument("--prompt", default="The quick brown fox")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1 or args.threads < 1:
        ap.error("--tokens, --repeats and --threads must be >= 1")
    try:
        check_model_ref(args.model, "--model")  # a local path that is not there, named as one
    except FileNotFoundError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from integrate.runtime import install

    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()
    base.set_experts_implementation("grouped_mm")
    ids = tok(args.prompt, return_tensors="pt").input_ids
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    models = {"unpatched": (base, None)}
    for name, kw in CONFIGS.items():
        if kw.get("prefetch") == "predictor" and not args.predictor:
            continue
        m = copy.deepcopy(base)
        models[name] = (m, install(m, device="cpu", predictor=args.predictor if "predictor" in name else None, **kw))

    try:
        def run(model) -> tuple[float, torch.Tensor]:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, **gen)
            return time.perf_counter() - t0, out

        ref = run(base)[1]  # also the warm-up of the unpatched model
        best = {}
        for name, (m, _) in models.items():
            out = run(m)[1]  # warm-up
            if not torch.equal(out, ref):
                raise SystemExit(f"{name}: tokens differ from the unpatched model")
        for rt in (r for _, r in models.values() if r is not None):
            rt.counters.reset()
        for _ in range(args.repeats):
            for name, (m, _) in models.items():
                best[name] = min(best.get(name, float("inf")), run(m)[0])
        print(f"{args.model}, {args.tokens} greedy tokens, {args.threads} thread(s), best of {args.repeats} (interleaved)")
        print(f"unpatched: {best['unpatched'] / args.tokens * 1e3:.2f} ms per token")
        if args.predictor:
            print(f"predictor step alone: {predictor_step_ms(args.predictor, args.repeats):.3f} ms (best of {args.repeats} x 50 steps)")
        for name in (n for n, kw in CONFIGS.items() if kw.get("prefetch") == "predictor"):
            pred = models.get(name, (None, None))[1]
            if pred is not None and pred.counters.predictor_steps:
                c, base_ms = pred.counters, best["unpatched"] / args.tokens * 1e3
                inside = c.predictor_ms / c.predictor_steps
                # inside decoding the step finds its weights evicted by the model's forward: it costs more than alone;
                # with a worker the host thread pays only the messages
                print(f"{name}: the predictor's host-thread time {inside:.3f} ms per token (mean of the timed runs; "
                      f"late picks {c.predictions_late}); the row's ceiling with everything else free: "
                      f"{base_ms / (base_ms + inside):.3f}")
        print("| configuration | tokens/s | × unpatched | hit rate | prefetches issued / used |")
        print("| --- | --- | --- | --- | --- |")
        for name, (_, rt) in models.items():
            tps = args.tokens / best[name]
            ratio = best["unpatched"] / best[name]
            if rt is None:
                print(f"| {name} | {tps:.1f} | 1 | – | – |")
                continue
            c = rt.counters
            hit = c.hits / max(1, c.hits + c.misses)
            print(f"| {name} | {tps:.1f} | {ratio:.3f} | {hit:.1%} | {c.prefetches_issued} / {c.prefetches_used} |")
    finally:
        for rt in (r for _, r in models.values() if r is not None):
            rt.uninstall()  # a predictor worker's process ends here, also after a failed run
    return 0


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
