"""The trace replay's tables (benchmarks/bench_replay.py): one line per row, failed rows included, and
measured against simulated with each row against LRU and the oracle schedule of its run."""

from __future__ import annotations

HEADER = (
    f"{'dense ms':>8} {'method':<22} {'capacity':>8} {'tokens/s':>9} {'stall ms/tok':>12} {'hit rate':>8} "
    f"{'host':>5} {'pf issued/used/wasted':>22} {'recall':>7} {'GB/tok':>7} {'pred ms/step':>12}"
)


def row_name(r: dict) -> str:
    name = r["method"] + ("/pool" if r.get("hybrid_run") == "pool" else "")
    name += f":{r['predictor']}" if r.get("predictor") else ""
    if r.get("threshold_set") and r.get("threshold") is not None:
        name += f"@p{r['threshold']:g}"
    return name


def format_row(r: dict) -> str:
    if "error" in r:
        cap = "all" if r["method"] == "resident" else f"{r['capacity']:.0%}"
        return f"{r.get('dense_ms', 0):>8.1f} {row_name(r):<22} {cap:>8} FAILED: {r['error']}"
    pf = f"{r['prefetches_issued']}/{r['prefetches_used']}/{r['prefetches_wasted']}"
    recall = f"{r['prediction_recall']:.1%}" if r.get("routed_scored") else "-"
    cap = "all" if r["method"] == "resident" else f"{r['capacity']:.0%}"
    return (
        f"{r.get('dense_ms', 0):>8.1f} {row_name(r):<22} {cap:>8} {r['tokens_per_s']:>9.2f} "
        f"{r['stall_ms_per_token']:>12.2f} {r['hit_rate']:>8.1%} {r.get('host_experts', 0):>5} {pf:>22} {recall:>7} "
        f"{r['gb_moved_per_token']:>7.3f} {r['predictor_ms_per_step']:>12.3f}"
    )


def format_table(rows: list[dict]) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in rows])


def format_sim(rows: list[dict]) -> str:
    """Measured vs simulated tokens/s and stall per row, the error, and each row against LRU and the oracle
    of the same run (same dense ms and capacity)."""
    out = [f"{'dense ms':>8} {'method':<22} {'capacity':>8} {'tok/s meas.':>11} {'tok/s sim.':>10} {'error':>7} "
           f"{'stall meas.':>11} {'stall sim.':>10} {'vs LRU':>7} {'vs oracle':>9}"]
    rows = [r for r in rows if "error" not in r]

    def same(r, m):  # the row of method m in r's run (same dense ms and capacity)
        return next((q for q in rows if q["method"] == m and q.get("predictor") is None
                     and q.get("dense_ms") == r.get("dense_ms") and q["capacity"] == r["capacity"]), None)

    for r in rows:
        lru, oracle = same(r, "lru"), same(r, "oracle")
        vs = {k: f"{r['tokens_per_s'] / q['tokens_per_s']:.2f}x" if q else "-" for k, q in (("lru", lru), ("oracle", oracle))}
        s_tps, s_stall = r.get("sim_tokens_per_s"), r.get("sim_stall_ms_per_token")
        sim = (f"{s_tps:>10.2f} {s_tps / r['tokens_per_s'] - 1:>+7.1%}" if s_tps else f"{'-':>10} {'-':>7}")
        cap = "all" if r["method"] == "resident" else f"{r['capacity']:.0%}"
        out.append(f"{r.get('dense_ms', 0):>8.1f} {row_name(r):<22} {cap:>8} {r['tokens_per_s']:>11.2f} {sim} "
                   f"{r['stall_ms_per_token']:>11.2f} {(f'{s_stall:.2f}' if s_stall is not None else '-'):>10} "
                   f"{vs['lru']:>7} {vs['oracle']:>9}")
    return "\n".join(out)
