"""What one decode token of predictor serving costs: the trunk's `step` and, for layer_ahead, each
per-layer `logits` call (on CUDA also through the runtime's captured graphs; for a predictor without
depth attention also through the running sums the runtime uses on the host, predictor/layer_steps.py),
on replayed routing.

    python -m benchmarks.predictor_cost --predictor RUN/predictor.safetensors --traces SLICE.npz
        [--device cuda] [--threads 1] [--tokens 16] [--profile] [--worker]

The replay's "predictor ms/step" is this cost plus the readback of the picks; on the H200 the
layer_ahead h=1 predictor's came to 19-21 ms per token against the 3-11 ms per token that perfect
prediction wins over LRU (docs/RESULTS.md), so this is the number prefetch must beat. `--profile`
prints the operators that take the per-layer calls' time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.replay_data import load_replay_data
from predictor.cli import positive_int, resolve_device
from predictor.export import load_predictor
from predictor.layer_steps import supports


def _ms(fn, sync) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def measure(model, tokens: list, experts: list, device: torch.device, n: int, path: str = "eager") -> dict:
    """Median step and per-layer call times (ms) over the replayed tokens after the first 3; `path` runs
    the per-layer calls as model.logits ("eager"), captured graphs ("graphs") or running sums ("sums")."""
    from integrate.runtime.graphed import GraphedLayerLogits
    from predictor.layer_steps import LayerSteps

    c = model.config
    L, layer_ahead = c.num_layers, c.mode == "layer_ahead"
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    layer_logits = {"graphs": GraphedLayerLogits, "sums": LayerSteps}[path](model) if path != "eager" else (
        lambda ctx, cur, layer, state: model.logits(ctx, cur, slice(layer, layer + 1), state))
    steps, layers, done = [], [], 0
    with torch.no_grad():
        for ids, ex in zip(tokens, experts):
            if done >= n + 3:
                break
            state, prev = model.init_state(1), None
            for t in range(len(ids)):
                if done >= n + 3:
                    break
                tok = torch.tensor([int(ids[t])], device=device)
                t0 = time.perf_counter()
                ctx = model.step(state, tok, prev)
                sync()
                steps.append((time.perf_counter() - t0) * 1e3)
                if layer_ahead:  # as the runtime: layers < h at the step (no routing), then layer l + h per routed l
                    t_layers = 0.0
                    for layer in range(L):
                        cur = torch.as_tensor(ex[t][None, None, : max(0, layer - c.lookahead + 1)], device=device)
                        t_layers += _ms(lambda: layer_logits(ctx, cur, layer, state), sync)  # noqa: B023
                    layers.append(t_layers / L)
                prev = torch.as_tensor(ex[t][None], device=device)
                done += 1
    med = lambda xs: sorted(xs[3:])[len(xs[3:]) // 2] if len(xs) > 3 else float("nan")  # noqa: E731
    out = {"step_ms": med(steps)}
    if layer_ahead:
        out["layer_ms"] = med(layers)
        out["token_ms"] = out["step_ms"] + out["layer_ms"] * L
    return out


def measure_worker(model, tokens: list, experts: list, n: int) -> dict:
    """The predictor in a worker process (integrate/runtime/predictor_worker.py), medians in ms over the
    replayed tokens after the first 3: the host thread's time to send one layer's routing, the round trip
    until that layer's picks are back (what a layer's picks lag its routing), and the host's time to take
    picks that are back and to look and find none (the runtime looks twice per layer: at `routed` and at
    `layer_done`), and the round trip of a token's first picks (layers < h), which wait for the trunk's
    step. Host time per layer: send + take + look; the simulator's `prediction_ms` is the round trip, its
    `prediction_step_ms` the token's round trip less that."""
    from integrate.runtime.predictor_worker import PredictorWorker

    c = model.config
    L, h = c.num_layers, c.lookahead
    worker = PredictorWorker(model, c.top_k)
    sends, trips, takes, looks, steps, done = [], [], [], [], [], 0
    try:
        for ids, ex in zip(tokens, experts):
            if done >= n + 3:
                break
            worker.send("reset")
            prev = np.full((1, L, c.top_k), -1, dtype=np.int64)
            for t in range(len(ids)):
                if done >= n + 3:
                    break
                if done == 3:  # the first 3 tokens warm up
                    for xs in (sends, trips, takes, looks, steps):
                        xs.clear()
                t0 = time.perf_counter()
                worker.send("token", t, np.array([int(ids[t])]), prev)
                got = 0
                while got < min(h, L):  # the token's picks for layers < h: one call may bring several
                    got += len(worker.replies(wait=True))
                steps.append((time.perf_counter() - t0) * 1e3)
                for layer in range(L - h):
                    t0 = time.perf_counter()
                    worker.send("routed", t, layer, np.asarray(ex[t][None, layer], dtype=np.int64))
                    t1 = time.perf_counter()
                    if t % 2:  # the round trip
                        worker.replies(wait=True)
                        trips.append((time.perf_counter() - t0) * 1e3)
                    else:  # the host's side of taking the picks once they are back; busy until then, as the
                        back = []  # runtime's host thread is (not asleep), looking every 5 ms
                        while not back:
                            t2 = time.perf_counter()
                            while time.perf_counter() - t2 < 0.005:
                                pass
                            t2 = time.perf_counter()
                            back = worker.replies()
                            t3 = time.perf_counter()
                        worker.replies()
                        takes.append((t3 - t2) * 1e3)
                        looks.append((time.perf_counter() - t3) * 1e3)
                    sends.append((t1 - t0) * 1e3)
                prev = np.asarray(ex[t][None], dtype=np.int64)
                done += 1
    finally:
        worker.close()
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
    out = {"send_ms": med(sends), "round_trip_ms": med(trips), "take_ms": med(takes), "look_ms": med(looks),
           "token_round_trip_ms": med(steps)}
    return {**out, "host_per_layer_ms": out["send_ms"] + out["take_ms"] + out["look_ms"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.predictor_cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predictor", required=True)
    ap.add_argument("--traces", required=True, help="trace directory or replay slice (.npz)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--tokens", type=positive_int, default=16, help="timed tokens (after 3 warm-up)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--worker", action="store_true", help="also the per-layer messages with the predictor in a "
                    "worker process (layer_ahead): the host thread's time per layer and the picks' round trip")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device, "--device")  # one this machine has, before any work
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    model = load_predictor(args.predictor).to(device).eval()
    data = load_replay_data(args.traces)
    c = model.config
    print(f"{args.predictor}: {c.mode}" + (f" h={c.lookahead}" if c.mode == "layer_ahead" else "")
          + f", contributors {list(c.contributors)}, on {device} ({args.threads} threads)")
    timed = max(0, sum(len(t) for t in data.tokens) - 3)  # past the 3 warm-up tokens
    if timed < args.tokens:
        print(f"--tokens {args.tokens}: the traces hold {timed} tokens past the warm-up; those are timed")
    res = measure(model, data.tokens, data.experts, device, args.tokens)
    print("eager: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    if device.type == "cuda" and c.mode == "layer_ahead":
        res = measure(model, data.tokens, data.experts, device, args.tokens, path="graphs")
        print("captured graphs (the runtime's path): " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    if device.type != "cuda" and supports(model):
        res = measure(model, data.tokens, data.experts, device, args.tokens, path="sums")
        print("running sums (the runtime's host path): " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts, record_shapes=True) as prof:
            measure(model, data.tokens, data.experts, device, 2)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12))
    if args.worker and c.mode != "layer_ahead":
        print(f"--worker: the worker's per-layer messages are a layer_ahead predictor's; this one is {c.mode}")
    elif args.worker:  # the worker runs a host copy (the model stays where it is)
        res = measure_worker(model, data.tokens, data.experts, args.tokens)
        print("worker process (per layer): " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
