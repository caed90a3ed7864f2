"""The replay benchmark's command line (benchmarks/bench_replay.py): its flags, and their checks before
anything is built (a bad capacity, token count, dtype, device or `--sim` preset is an error naming the
flag, not a traceback after every row has run)."""

from __future__ import annotations

import argparse

from benchmarks.replay_sim import load_preset
from integrate.runtime.cache import MAX_INFLIGHT
from integrate.runtime.drivers import check_settings
from predictor.cli import resolve_device

DESCRIPTION = "Trace-replay benchmark: real expert transfers, routing forced from a recorded trace."
METHODS = ("lru", "cooc", "predictor", "hybrid", "oracle", "resident")
NEEDS_MODEL = ("gate",)  # drivers that read the real model's hidden states: never run by the replay


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_replay", description=DESCRIPTION,
    )
    ap.add_argument("--traces", default=None, help="trace directory or .npz; default: synthetic routing")
    ap.add_argument("--predictor", nargs="+", default=None, help="exported predictor file(s): one row each")
    ap.add_argument("--device", default=None)
    ap.add_argument("--capacities", type=float, nargs="+", default=[0.10, 0.25])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + NEEDS_MODEL)
    ap.add_argument("--max-tokens", type=int, default=256, help="timed tokens per method and capacity")
    ap.add_argument("--warmup", type=int, default=32, help="untimed tokens first (fill the cache)")
    ap.add_argument("--dense-mb", type=float, default=64.0, help="per-layer dense stand-in weights (MB)")
    ap.add_argument(
        "--dense-ms",
        type=float,
        nargs="+",
        default=[0.0],
        help="extra fixed device time per layer standing in for attention (CUDA only); "
        "several values run in turn on the same store",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument(
        "--threshold",
        type=float,
        nargs="+",
        default=None,
        help="predictor prefetch only for experts with probability >= this (default: the schedule's); "
        "several values: one row each",
    )
    ap.add_argument("--schedule", default="scheduler", choices=("naive", "scheduler", "scheduler_load"),
                    help="part-1 policy the predictor, hybrid and oracle rows run under (predictor/simulate/policy.py)")
    ap.add_argument("--eviction", default=None, choices=("learned", "predictor"),
                    help="the predictor, hybrid and oracle rows' eviction instead of the schedule's")
    ap.add_argument("--hybrid-run", nargs="+", default=["thread"], choices=("thread", "pool"),
                    help="where the hybrid rows' host experts compute: this thread, or a pool in the stream's order "
                         "(both: one row each)")
    ap.add_argument("--loop", action="store_true", help="routed experts one fetch at a time (the old path)")
    ap.add_argument("--sim", default=None, metavar="PRESET", help="also print the simulator's figures per row")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (the host experts' too)")
    ap.add_argument("--predictor-device", default=None,
                    help="where the predictors run (default: --device); worker: in a worker process on the host CPU")
    ap.add_argument("--max-inflight", type=int, default=None,
                    help=f"prefetch copies in flight (default: the schedule's for its rows, else {MAX_INFLIGHT})")
    ap.add_argument("--layers", type=int, default=None, help="scale down: first N MoE layers")
    ap.add_argument("--experts", type=int, default=None, help="scale down: expert ids folded modulo N")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--intermediate", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--save-npz", default=None, help="only write the replay slice to this .npz and exit")
    ap.add_argument("--save-tokens", type=int, default=None, help="tokens kept by --save-npz")
    return ap


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """The flags that need no data: errors name them (`ap.error`, exit 2)."""
    if not all(0 < c <= 1 for c in args.capacities):
        ap.error(f"--capacities {args.capacities}: fractions of all experts, in (0, 1]")
    if args.max_tokens < 1 or args.warmup < 0:
        ap.error(f"--max-tokens {args.max_tokens}, --warmup {args.warmup}: timed tokens >= 1, warm-up tokens >= 0")
    if 0 in (args.layers, args.experts):
        ap.error(f"--layers {args.layers}, --experts {args.experts}: scaled down to 0 is nothing to replay")
    if args.save_npz and any(v is not None for v in (args.layers, args.experts, args.hidden, args.intermediate)):
        ap.error("--save-npz writes the slice as read: scale it down when replaying it")
    try:  # one this machine has ("auto" when not given), as the rows will use it
        args.device = str(resolve_device(args.device or "auto", "--device"))
        if args.predictor_device not in (None, "worker"):
            resolve_device(args.predictor_device, "--predictor-device")
    except ValueError as e:
        ap.error(str(e))


def check_settings_for(ap: argparse.ArgumentParser, args, data) -> dict | None:
    """The prefetch settings against the (scaled) data, and the `--sim` preset: before
    the expert store is built, and the preset before any row runs (used after them). Returns the preset."""
    try:
        for t in args.threshold or [0.0]:
            check_settings(budget=args.budget, threshold=t, max_inflight=args.max_inflight, num_experts=data.num_experts)
        return load_preset(args.sim) if args.sim else None
    except Exception as e:  # (a ValueError, Hydra's missing-config error)
        ap.error(str(e).splitlines()[0])
