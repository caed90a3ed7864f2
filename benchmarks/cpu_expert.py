"""Host CPU time of one routed expert at batch 1 (the hybrid policy's `cpu_expert_ms`).

    python -m benchmarks.cpu_expert [--hidden 2048 --intermediate 1408] [--threads 1 2] [--repeat 50]

An expert is read from host memory as the offloading store keeps it (bf16, gate and up stacked as
one [2I, H] matrix, down [H, I]) and applied to one token: down(silu(gate x) * up x). Batch-1
decode reads every weight once per token, so the time is bound by memory bandwidth; the script
prints ms per expert and the bandwidth it reached for bf16 weights (computed as torch does on this
CPU) and for weights kept in fp32 (twice the bytes, no conversion). Best of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from predictor.cli import positive_int


def make_experts(n: int, hidden: int, inter: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` random experts as the store keeps them: (gate and up stacked [2I, H], down [H, I])."""
    return [
        (torch.randn(2 * inter, hidden).mul_(0.02).to(dtype), torch.randn(hidden, inter).mul_(0.02).to(dtype))
        for _ in range(n)
    ]


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert on `x`: down(silu(gate x) * up x)."""
    g, u = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, down)


def time_expert(hidden: int, inter: int, dtype: torch.dtype, threads: int, repeat: int) -> tuple[float, float]:
    """(best ms per expert, GB/s of weights read) over `repeat` runs on distinct experts."""
    torch.set_num_threads(threads)
    n = 8  # cycle through several experts so the caches do not hold one expert's weights
    experts = make_experts(n, hidden, inter, dtype)
    x = torch.randn(1, hidden).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeat + n):
            t0 = time.perf_counter()
            expert_forward(x, *experts[i % n]).float().sum().item()
            if i >= n:  # the first pass warms up allocators and kernels
                best = min(best, time.perf_counter() - t0)
    nbytes = 3 * hidden * inter * torch.empty((), dtype=dtype).element_size()
    return best * 1e3, nbytes / best / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_expert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=positive_int, default=2048)
    ap.add_argument("--intermediate", type=positive_int, default=1408)
    ap.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=positive_int, default=50)
    args = ap.parse_args(argv)
    print(f"expert {args.hidden} x {args.intermediate} (gate, up, down); {torch.get_num_threads()} threads available")
    print(f"{'dtype':>8} {'threads':>7} {'ms/expert':>10} {'GB/s':>7}")
    for dtype in (torch.bfloat16, torch.float32):
        for threads in args.threads:
            ms, gbps = time_expert(args.hidden, args.intermediate, dtype, threads, args.repeat)
            print(f"{str(dtype).removeprefix('torch.'):>8} {threads:>7} {ms:>10.3f} {gbps:>7.1f}")


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
