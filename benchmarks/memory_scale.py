"""Peak memory of each pipeline stage on a synthetic trace set, at two sizes (issue #16, "Memory at scale").

    python -m benchmarks.memory_scale [--tokens 2e6 2e7] [--out DIR] [--keep] [--stages write stats evaluate train]
        [--max-steps 50] [--eval-sequences 200] [--sim-sequences 50]

For every size: a synthetic trace set shaped like DeepSeek-V2-Lite (26 MoE layers, top-6 of 64 experts,
a Zipf-like vocabulary of 17,000 ids, prompts of 8-1,024 tokens, routing that depends on the token id
half of the time) is written through the incremental `TraceWriter` (what the MoE-Beyond import does),
then run through `python -m predictor.stats` (per-layer statistics over every row; the count-based
baselines fitted on every train row and scored on the first `--eval-sequences` held-out rows),
`python evaluate.py` (the same baselines plus co-occurrence, MoE-Infinity and the oracle, scored on
`--eval-sequences` rows; the simulator replays the first `--sim-sequences`) and one training epoch of
the default predictor capped at `--max-steps` steps. Each stage runs in its own process; its peak
resident memory is that process's `ru_maxrss` (os.wait4), its children included, and its peak
anonymous memory (RssAnon, sampled every 50 ms from /proc): RSS also counts pages of memory-mapped
files the process has touched (libraries, the trace set), which the kernel can drop. The routing-bank
baselines are left out: they hold every train row by design (predictor/baselines.py).

The data go to a folder `memory_scale-<tokens>` under `--out` (default: a new temporary directory),
deleted at the end unless `--keep`; `--out` itself is deleted only when this run created it. 2 x 10^7
tokens take about 5.4 GB of disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from predictor.atomic import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
VOCAB, LAYERS, EXPERTS, TOP_K = 17_000, 26, 64, 6
BASELINES = ["frequency", "previous_token", "token_table", "cooccurrence_token"]
STAGES = ("write", "stats", "evaluate", "train")


def synthetic_rows(tokens: int, seed: int = 0):
    """TraceRecords of `tokens` tokens in all: Zipf-like token ids; each (token, layer) routes to its
    token's own expert set half of the time, else to one of 4,096 random sets."""
    from predictor.traces import TraceRecord

    rng = np.random.default_rng(seed)
    sets = np.argsort(rng.random((4096, EXPERTS)), axis=-1)[:, :TOP_K].astype(np.uint8)  # distinct ids
    p = 1.0 / (np.arange(VOCAB) + 10.0) ** 1.1
    cdf = np.cumsum(p / p.sum())
    layer = np.arange(LAYERS)
    done, pid = 0, 0
    while done < tokens:
        T = int(min(tokens - done, np.clip(rng.lognormal(4.3, 0.9), 8, 1024)))
        ids = np.minimum(np.searchsorted(cdf, rng.random(T)), VOCAB - 1)
        own = (ids[:, None] * 31 + layer[None] * 7) % len(sets)
        pick = np.where(rng.random((T, LAYERS)) < 0.5, own, rng.integers(0, len(sets), (T, LAYERS)))
        yield TraceRecord(prompt_id=pid, token_ids=ids.astype(np.int32), experts=sets[pick], num_prefill=T)
        done, pid = done + T, pid + 1


def write_synthetic(path: Path, tokens: int, seed: int = 0) -> None:
    """The `write` stage: the rows through TraceWriter, as the streaming MoE-Beyond import writes them."""
    from predictor.moebeyond import deepseek_v2_lite_meta
    from predictor.trace_writer import TraceWriter

    meta = deepseek_v2_lite_meta()
    meta.vocab_file, meta.vocab_size, meta.tokenizer = None, VOCAB, f"synthetic-zipf-{VOCAB}"
    meta.prompt_source, meta.recording = "synthetic (benchmarks/memory_scale.py)", {"mode": "synthetic", "seed": seed}
    with TraceWriter(path, meta, overwrite=True, source="synthetic") as writer:  # only ever a trace set
        for rec in synthetic_rows(tokens, seed):
            writer.append(rec)
    m = writer.result.meta
    print(f"wrote {path}: {m.num_sequences:,} rows, {m.num_tokens:,} tokens")


def commands(work: Path, args) -> dict[str, list[str]]:
    traces, py = work / "traces", sys.executable
    return {
        "write": [py, "-m", "benchmarks.memory_scale", "_write", str(traces), str(args.n), str(args.seed)],
        "stats": [py, "-m", "predictor.stats", str(traces), "--baselines", *BASELINES,
                  "--max-sequences", str(args.eval_sequences), "--json", str(work / "stats.json")],
        "evaluate": [py, "evaluate.py", f"data.path={traces}", f"max_sequences={args.eval_sequences}",
                     f"simulate.max_sequences={args.sim_sequences}",
                     f"baselines=[{','.join(BASELINES)},cooccurrence,moe_infinity,oracle]",
                     "simulate.capacities=[0.1]", "simulate.workers=1", "threads=1", "plots=false",
                     "wandb.enabled=false", f"hydra.run.dir={work / 'evaluate'}"],
        "train": [py, "train.py", f"data.path={traces}", "trainer.max_epochs=1", f"trainer.max_steps={args.max_steps}",
                  "trainer.limit_val_batches=0", "validate=false", "export=false", "logger=none", "callbacks=none",
                  "threads=1", f"hydra.run.dir={work / 'train'}"],
    }


def run_stage(name: str, cmd: list[str], log: Path) -> dict:
    """Run one stage in its own process -> {peak_rss_mb, seconds, rc}; output goes to `log`."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        anon = [0]
        sampler = threading.Thread(target=_sample_anon, args=(proc.pid, anon), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (and its waited-for children's)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.join()
    result = {"stage": name, "peak_rss_mb": usage.ru_maxrss / 1024, "peak_anon_mb": anon[0] / 1024,
              "seconds": time.perf_counter() - start, "rc": proc.returncode, "command": " ".join(cmd)}
    if proc.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        print(f"[{name}] failed with exit code {proc.returncode}; the end of {log}:\n{tail}", file=sys.stderr)
    return result


def _sample_anon(pid: int, peak: list[int]) -> None:
    """Largest RssAnon (kB) of process `pid` until it exits (its /proc entry lasts until it is reaped)."""
    while True:
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            return
        if fields.get("State", "").split()[:1] == ["Z"] or "RssAnon" not in fields:
            return
        peak[0] = max(peak[0], int(fields["RssAnon"].split()[0]))
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_write"]:  # the write stage, in its own process
        write_synthetic(Path(argv[1]), int(argv[2]), int(argv[3]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=float, nargs="+", default=[2e6, 2e7], help="trace-set sizes in tokens")
    ap.add_argument("--out", type=Path, default=None, help="where the data go (default: a new temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the generated trace sets and run folders")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--max-steps", type=int, default=50, help="training steps (one epoch, capped)")
    ap.add_argument("--eval-sequences", type=int, default=200, help="held-out rows scored by stats and evaluate")
    ap.add_argument("--sim-sequences", type=int, default=50, help="evaluation rows the simulator replays")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if "write" not in args.stages and args.out is None:
        ap.error("without the write stage the trace sets must already be under --out (from a run with --keep)")
    created = args.out is None or not args.out.exists()
    out = Path(tempfile.mkdtemp(prefix="memory_scale-")) if args.out is None else args.out
    out.mkdir(parents=True, exist_ok=True)
    print(f"data under {out} (free: {shutil.disk_usage(out).free / 2**30:.0f} GiB)", flush=True)
    results = []
    try:
        for tokens in args.tokens:
            args.n = int(tokens)
            work = out / f"memory_scale-{args.n}"
            ours = not work.exists()  # a folder already there (an earlier run's, or the user's) is left in place
            work.mkdir(parents=True, exist_ok=True)
            cmds = commands(work, args)
            for stage in args.stages:
                r = run_stage(stage, cmds[stage], work / f"{stage}.log")
                r["tokens"] = args.n
                results.append(r)
                print(f"{args.n:>12,} tokens  {stage:<9} peak RSS {r['peak_rss_mb']:6.0f} MB (anonymous "
                      f"{r['peak_anon_mb']:5.0f} MB)  {r['seconds']:7.1f} s"
                      + ("" if r["rc"] == 0 else f"  FAILED (exit {r['rc']})"), flush=True)
            if not args.keep and ours:  # only a folder this run made: not an earlier run's kept set, nor the user's
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.keep and created:
            shutil.rmtree(out, ignore_errors=True)
    report(results, args)
    return int(any(r["rc"] for r in results))


def report(results: list[dict], args) -> None:
    sizes = sorted({r["tokens"] for r in results})
    print("\npeak RSS (peak anonymous) in MB per stage")
    print("| stage | " + " | ".join(f"{n:,} tokens" for n in sizes) + (" | RSS growth |" if len(sizes) > 1 else " |"))
    print("| --- " * (len(sizes) + 1 + (len(sizes) > 1)) + "|")
    for stage in args.stages:
        ok = {r["tokens"]: r for r in results if r["stage"] == stage and r["rc"] == 0}
        cells = [f"{ok[n]['peak_rss_mb']:,.0f} ({ok[n]['peak_anon_mb']:,.0f})" if n in ok else "failed" for n in sizes]
        if len(sizes) > 1 and {sizes[0], sizes[-1]} <= set(ok):
            cells.append(f"{ok[sizes[-1]]['peak_rss_mb'] / ok[sizes[0]]['peak_rss_mb']:.2f}x")
        print(f"| {stage} | " + " | ".join(cells) + " |")
    for r in results:
        print(f"{r['tokens']:,} {r['stage']}: {r['command']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, results)


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
