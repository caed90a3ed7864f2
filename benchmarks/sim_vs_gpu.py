"""Measured vs simulated: the runtime's GPU trace replay against a calibrated time model.

    python -m benchmarks.sim_vs_gpu [--preset h200_replay] [--replay-json RUN.json ...] [--traces DIR]
        [--predictor FILE ...] [--fit] [sim.KEY=VALUE ...]

Rows come from replay runs (`python -m benchmarks.bench_replay ... --json RUN.json`), by default the
runs the preset names (`calibration.runs`), or the preset's own `calibration.rows` list. The simulator
replays each row's held-out tokens (its warm-up, then its timed tokens) under the row's own settings
and what the run measured for it (benchmarks/replay_sim.py: link, host time per expert, predictor time
per step), and prints measured and simulated tokens/s and stall, and the error. Rows without a
predictor (LRU, oracle schedule, all resident, hybrid) are the fitted ones: `--fit` grid-searches the
GPU and host costs for the smallest worst-case error over them. Predictor rows are the test: the
simulator must agree with them, and with their sign against LRU, without being fitted to them.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from benchmarks.replay_data import load_replay_data
from benchmarks.replay_sim import RowSimulator, load_preset
from benchmarks.replay_table import row_name

GRID = {  # the fitted costs and the values --fit tries
    "host_layer_ms": [0.2, 0.4, 0.6],
    "host_route_ms": [0.0, 0.2, 0.4],
    "host_expert_ms": [0.02, 0.05],
    "copy_issue_ms": [0.0, 0.03],
    "compute_ms_per_layer": [0.05, 0.1, 0.2],
    "expert_ms": [0.01, 0.02],
}
ROOT = Path(__file__).resolve().parents[1]
FITTED = ("lru", "oracle", "resident", "hybrid")  # methods the costs are fitted to (hybrid: without a predictor,
# on the host thread; the pool's round trip is not among the fitted costs)


def preset_rows(sim: dict) -> list[dict]:
    """The preset's calibration rows as replay rows: [dense ms, method, capacity, tokens/s, stall]."""
    cal = sim["calibration"]
    return [
        dict(dense_ms=d, method=m, capacity=c, tokens_per_s=t, stall_ms_per_token=s, max_inflight=8, threshold=0.0)
        for d, m, c, t, s in cal["rows"]
    ]


def json_rows(paths: list[str], runs: list[dict] | None = None) -> list[dict]:
    """The rows of replay runs (bench_replay --json; `runs`: those files, already read), each tagged with its
    file; failed rows left out."""
    rows = []
    for path, run in zip(paths, runs or [json.loads(Path(p).read_text()) for p in paths]):
        for r in run["rows"]:
            if "error" in r:
                print(f"{Path(path).name}: {r['method']} at {r['capacity']:.0%} failed in the run: {r['error']}")
                continue
            rows.append({**r, "run": Path(path).stem})
    return rows


def fitted(r: dict) -> bool:
    return r["method"] in FITTED and not r.get("predictor") and r.get("hybrid_run", "thread") == "thread"


def table(rs: RowSimulator, rows: list[dict]) -> tuple[list[tuple], float]:
    """(lines, worst |error| over the fitted rows)."""
    lines, worst = [], 0.0
    for r in rows:
        if r.get("predictor") and r["predictor"] not in rs.scores:
            print(f"skipped {r['method']}:{r['predictor']} at {r['capacity']:.0%}: its predictor was not given "
                  f"(--predictor {r['predictor']}=FILE)")
            continue
        got = rs.row(r)
        if got is None:
            continue
        s_tps, s_stall = got
        err = s_tps / r["tokens_per_s"] - 1
        if fitted(r):
            worst = max(worst, abs(err))
        lines.append((r, s_tps, s_stall, err))
    return lines, worst


def fit(rs: RowSimulator, rows: list[dict]) -> dict:
    base, best = rs.base, (float("inf"), None)
    calib = [r for r in rows if fitted(r)]
    for values in itertools.product(*GRID.values()):
        rs.base = base.with_overrides(**dict(zip(GRID, values)))
        _, worst = table(rs, calib)
        if worst < best[0]:
            best = (worst, dict(zip(GRID, values)))
    rs.base = base.with_overrides(**best[1])
    print(f"fitted to {len(calib)} rows: worst-case error {best[0]:.1%} with {best[1]}")
    return best[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sim_vs_gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="h100_replay", help="conf/sim preset (its costs; its rows without --replay-json)")
    ap.add_argument("--replay-json", nargs="*", default=[], help="rows measured by bench_replay --json")
    ap.add_argument("--traces", default="data/big/deepseek-v2-lite-puffin")
    ap.add_argument("--predictor", nargs="*", default=[], help="the predictors the replay rows ran, as LABEL=FILE "
                    "or FILE (label: the file's stem, or its folder's name for predictor.safetensors); rows "
                    "of a predictor not given are skipped, with a note")
    ap.add_argument("--fit", action="store_true", help="grid-search the host and GPU costs first")
    ap.add_argument("overrides", nargs="*", help="sim.KEY=VALUE overrides of the preset")
    args = ap.parse_args(argv)
    sim = load_preset(args.preset, args.overrides)
    runs = args.replay_json or [str(ROOT / f) for f in sim.get("calibration", {}).get("runs", [])]
    read = [json.loads(Path(p).read_text()) for p in runs]
    rows = json_rows(runs, read) if runs else preset_rows(sim)
    cal = sim.get("calibration", {})
    warmup, tokens = cal.get("warmup", 16), cal.get("tokens", 48)
    counts = {(run["warmup"], run["max_tokens"]) for run in read if "warmup" in run}
    if len(counts) > 1:
        ap.error(f"--replay-json: runs of different token counts (warm-up, timed) {sorted(counts)}: compare them apart")
    if counts:  # the tokens the runs replayed (their JSON says; the preset's for runs written before it did)
        warmup, tokens = counts.pop()
    data = load_replay_data(args.traces)
    predictors = {}
    if args.predictor:
        from predictor.export import load_predictor

        for arg in args.predictor:
            label, sep, path = arg.partition("=")
            if not sep or Path(arg).exists() or "/" in label:  # a plain path (which may hold a '=')
                label, path = "", arg
            p = Path(path)
            predictors[label or (p.parent.name if p.stem == "predictor" else p.stem)] = load_predictor(p).eval()
    rs = RowSimulator(data, sim, warmup, tokens, sim["links"][sim["link"]], sim.get("cpu_expert_ms") or 0.0,
                      None, predictors)
    if args.fit:
        fit(rs, rows)
    lines, worst = table(rs, rows)
    print(f"{'run':<12} {'dense ms':>8} {'method':<22} {'capacity':>8} {'tok/s meas.':>11} {'tok/s sim.':>10} "
          f"{'error':>7} {'stall meas.':>11} {'stall sim.':>10}  vs LRU (meas. / sim.)")
    for r, s_tps, s_stall, err in lines:
        lru = next((q for q in lines if q[0]["method"] == "lru" and q[0].get("run") == r.get("run")
                    and q[0]["dense_ms"] == r["dense_ms"] and q[0]["capacity"] == r["capacity"]), None)
        vs = f"{r['tokens_per_s'] / lru[0]['tokens_per_s']:.2f}x / {s_tps / lru[1]:.2f}x" if lru else ""
        name = row_name(r) + ("" if fitted(r) else " *")
        cap = "all" if r["method"] == "resident" else f"{r['capacity']:.0%}"
        print(f"{r.get('run', 'preset'):<12} {r['dense_ms']:>8g} {name:<22} {cap:>8} {r['tokens_per_s']:>11.2f} "
              f"{s_tps:>10.2f} {err:>+7.1%} {r['stall_ms_per_token']:>11.1f} {s_stall:>10.1f}  {vs}")
    n = sum(fitted(r) for r, *_ in lines)
    print(f"worst error over the {n} fitted rows: {worst:.1%} (target: within 15 %); * = not fitted (a test)")


if __name__ == "__main__":
    from predictor.cli import run

    run(main)
