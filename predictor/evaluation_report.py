"""The evaluation report: report.json, report.md, PNG plots (evaluation_plots.py), and the W&B log of the same."""

from __future__ import annotations

import math
from pathlib import Path

from predictor.atomic import write_json_atomic, write_text_atomic
from predictor.evaluation_plots import make_plots

METRIC_NOTES = """\
- **recall@k**: of the true routed experts of a (token, layer), the fraction inside the predicted
  top-k; averaged over all (token, layer). With k = top_k it equals precision@k.
- **F1** (positive class, micro and macro over layers) at the decoding its header names (top-k per
  layer, k = top_k unless `metrics.decode_k` says otherwise, or `metrics.threshold`); **PR-AUC**
  (positive class, average precision over 1000 probability bins) and **ECE** (expected calibration
  error over ten bins) of the predictor's sigmoid, of a baseline's own estimates of P(routed)
  (frequency, token table, co-occurrence token, routing bank) or odds (gate); the other baselines'
  scores only rank: mapped to s / (1 + s) for PR-AUC, no ECE (–).
- *MoE-Beyond columns*, for comparison only: element-wise accuracy over all E experts (a
  non-activated expert left unpredicted counts as correct: an all-zero predictor scores 1 - k/E)
  and the macro F1 over the classes {0, 1}.
- *oracle* knows the true experts one token ahead: the ceiling the time model leaves to any predictor.
- **Hit rate**: routed experts found on the device when their layer runs, over all routed
  experts; a prefetch still queued or in flight then is a miss. **Stall**: time a layer waits
  for its experts, per token. Capacity: fraction of all L x E routed experts the device holds.
"""


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _table(rows: list[list[str]], columns: list[str], text_columns: int = 1) -> list[str]:
    """A Markdown table of preformatted cells (pandas + tabulate): the first `text_columns` columns
    left-aligned, the numbers right-aligned."""
    import pandas as pd

    align = ["left"] * text_columns + ["right"] * (len(columns) - text_columns)
    frame = pd.DataFrame(rows, columns=columns)
    return frame.to_markdown(index=False, disable_numparse=True, colalign=align).splitlines()


def markdown(report: dict) -> str:
    d = report["data"]
    k = d["top_k"]
    lines = [
        "# Evaluation report",
        "",
        f"Traces `{d['path']}` ({d['source_model']}), split `{d['split']}`: {d['sequences']} sequences, "
        f"{d['tokens']} tokens, L={d['num_moe_layers']} E={d['num_experts']} k={k}. "
        f"Fitted on `{d['train_data']}`" + (f", split `{d['train_split']}`" if d.get("train_split") else "")
        + f" ({d['train_sequences']} sequences). Predictor: "
        + (f"`{report['ckpt_path']}`." if report.get("ckpt_path") else "none (baselines only)."),
        "",
        METRIC_NOTES,
        "## Prediction quality (%)",
        "",
    ]
    scorers = report["scorers"]
    if scorers:
        any_m = next(iter(scorers.values()))["metrics"]
        ks = sorted(int(key.split("@")[1]) for key in any_m if key.startswith("recall@") and "/" not in key)
        decoding = f", {report['f1_decoding']}" if report.get("f1_decoding") else ""
        head = [
            "scorer",
            "mode",
            *[f"recall@{x}" for x in ks],
            f"F1 micro{decoding}",
            f"F1 macro (layers){decoding}",
            "PR-AUC",
            "ECE",
            "*MoE-Beyond acc.*",
            "*MoE-Beyond {0,1}-F1*",
            "tokens/s",
        ]
        rows = []
        for name, s in scorers.items():
            m = s["metrics"]
            mode = s["mode"] + (f" h={s['lookahead']}" if s["lookahead"] else "")
            cells = [
                name,
                mode,
                *[_pct(m[f"recall@{x}"]) for x in ks],
                _pct(m["f1_micro"]),
                _pct(m["f1_macro_layers"]),
                _pct(m["pr_auc"]),
                (_pct(m["ece"]) if "ece" in m else "–")  # scores that only rank (or reports before it)
                + (f" → {_pct(m['ece_calibrated'])}" if "ece_calibrated" in m else ""),  # its calibrated probabilities
                _pct(m["moebeyond/accuracy"]),
                _pct(m["moebeyond/f1_macro01"]),
                f"{s['tokens_per_s']:.0f}",
            ]
            rows.append(cells)
        lines += _table(rows, head, text_columns=2)
        if d.get("score_workers", 1) > 1:
            lines += ["", f"(tokens/s: each scorer's own, measured while {d['score_workers']} scorers and the "
                          "replays shared the machine)"]
        buckets = any_m["position_buckets"]
        lines += ["", f"### recall@{k} by position in the sequence (%)", ""]
        rows = [[name, *(_pct(x) for x in s["metrics"][f"recall@{k}/position"])] for name, s in scorers.items()]
        lines += _table(rows, ["scorer", *buckets])
    runs = report["simulation"]
    if runs:
        tm = report["time_model"]
        lines += [
            "",
            f"## Cache simulator: `{tm['preset']}` preset, {tm['link']}",
            "",
            f"Expert {tm['expert_bytes'] / 1e6:.1f} MB, {tm['bandwidth_GBps']} GB/s -> {tm['copy_ms']:.3f} ms per copy "
            f"(one link shared by demand and prefetch copies; a started copy is not pre-empted); GPU per MoE layer "
            f"{tm['compute_ms_per_layer']} ms fixed + {tm.get('expert_ms', 0)} ms per routed expert; host per layer "
            f"{tm.get('host_layer_ms', 0)} ms, per expert {tm.get('host_expert_ms', 0)} ms, per copy "
            f"{tm.get('copy_issue_ms', 0)} ms; prediction usable {tm['prediction_ms']} ms after its inputs. "
            + (f"A hybrid miss takes {tm['cpu_expert_ms']} ms on the host CPU, "
               + (f"on a pool of its own (round trip {tm.get('cpu_handoff_ms', 0)} ms; the host thread loses "
                  f"{tm.get('cpu_host_share', 0):.0%} of the pool's time). " if tm.get("cpu_async")
                  else "on the host thread. ") if tm.get("cpu_expert_ms") else "")
            + "Capacity "
            f"scope: {runs[0]['scope']}. Naive prefetch budget: {report['budget']} experts per (token, layer); "
            f"token_ahead window: {report.get('window') or 'whole token'} layers.",
            "",
            "References (not competitors): `oracle_schedule` knows the future routing (Belady eviction, each miss "
            "copied as soon as its victim's slot is free); `oracle_schedule_token` the same knowing only the "
            "running token (its copies from the token's start, Belady's next uses inside it, the learned reuse "
            "hazard past it): a heuristic reference for what a predictor of the running token allows, not a "
            "bound; `lower_bound`: Belady's misses with every copy hidden "
            "behind the rest of the step, for schedules that copy every expert they run (hybrid ones can pass "
            "it). `gap_closed` is the share of the stall between LRU and the oracle "
            "schedule that a policy removes; `time_gap_closed` the same share of the gap in time per token, "
            "where the host time a policy adds (its predictor's) counts.",
            "",
        ]
        for r in (r for r in runs if r["timing"] == "reference"):
            lines += [f"`{r['policy']}` (every expert on the GPU from the start): stall {r['stall_ms_per_token']:.2f} "
                      f"ms/token, {r['tokens_per_s']:.1f} tokens/s.", ""]
        if tm["copy_ms"] > 0:
            per_token = d["num_moe_layers"] * tm["compute_ms_per_layer"] / tm["copy_ms"]
            lines += [
                f"While the GPU computes one token the copy engine moves at most {per_token:.1f} experts; a token "
                f"routes {d['num_moe_layers'] * k}. Every miss beyond that budget stalls, however well it is predicted.",
                "",
            ]
        lines += _capacity_table(runs, "timed", "hit_rate", "Hit rate (%)", _pct)
        lines += _capacity_table(
            runs, "timed", "stall_ms_per_token", "Stall per token (ms)", lambda x: f"{x:.2f}"
        )
        if any(r.get("gap_closed") is not None for r in runs):
            lines += _capacity_table(
                runs, "timed", "gap_closed", "Share of the LRU -> oracle schedule stall gap closed (%)", _pct
            )
            lines += _capacity_table(  # the host time a predictor adds counts here; in stall it even hides copies
                runs, "timed", "time_gap_closed", "The same share of the gap in time per token (%)", _pct
            )
        lines += _detail_table(runs)
        if any(r["timing"] == "zero_latency" for r in runs):
            lines += _capacity_table(
                runs,
                "zero_latency",
                "hit_rate",
                "Zero-latency mode (MoE-Beyond's simulator: prediction inserted just before use, instant copies), hit rate (%)",
                _pct,
            )
    lines += ["", f"Evaluation took {report['elapsed_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def _capacity_table(runs, timing, key, title, fmt) -> list[str]:
    rows = [r for r in runs if r["timing"] == timing]
    caps = sorted({r["capacity"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    table = {(r["policy"], r["capacity"]): r.get(key) for r in rows}
    cells = [[p, *(fmt(table[(p, c)]) if table.get((p, c)) is not None else "—" for c in caps)] for p in policies]
    return ["", f"### {title}", "", *_table(cells, ["policy", *(f"{100 * c:g}%" for c in caps)])]


def _detail_table(runs) -> list[str]:
    head = ["policy", "capacity", "slots", "hit %", "stall ms/token", "tokens/s", "GB moved", "prefetch issued",
            "used", "late", "wasted", "sim accesses/s"]  # fmt: skip
    rows = [
        [r["policy"], f"{100 * r['capacity']:g}%", str(r["slots"]), _pct(r["hit_rate"]), f"{r['stall_ms_per_token']:.2f}",
         f"{r['tokens_per_s']:.1f}", f"{r['bytes_moved'] / 1e9:.1f}", str(r["prefetch_issued"]), str(r["prefetch_used"]),
         str(r["prefetch_late"]), str(r["prefetch_wasted"]), f"{r['accesses_per_s'] / 1e6:.2f}M"]  # fmt: skip
        for r in runs
        if r["timing"] == "timed"
    ]
    return ["", "### Details per run", "", *_table(rows, head)]


def write_report(report: dict, out_dir: Path, plots: bool = True) -> dict:
    """Write report.json, report.md (and PNGs); returns {"json", "md", "plots": [...]} paths."""
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "report.json", report, indent=1)
    write_text_atomic(out_dir / "report.md", markdown(report))
    pngs = make_plots(report, out_dir) if plots else []
    return {"json": out_dir / "report.json", "md": out_dir / "report.md", "plots": pngs}


def log_wandb(run, metrics: dict, report: dict, files: dict) -> None:
    """Log the metrics, the simulation table and the plots to `run` (predictor/tracking.py eval_run starts
    and finishes it), and the report files as an "evaluation" artifact."""
    import wandb

    from predictor.tracking import log_report_artifact, report_artifact_name

    cols = ["timing", "policy", "capacity", "slots", "scope", "hit_rate", "stall_ms_per_token", "tokens_per_s",
            "gap_closed", "time_gap_closed", "bytes_moved", "prefetch_issued", "prefetch_used", "prefetch_late",
            "prefetch_wasted"]  # fmt: skip
    logged = dict(metrics)  # one step: one evaluation
    if report["simulation"]:
        logged["simulation"] = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in report["simulation"]])
    logged.update({Path(path).stem: wandb.Image(str(path)) for path in files["plots"]})
    run.log(logged)
    run.save(str(files["md"]), base_path=str(Path(files["md"]).parent), policy="now")
    meta = {"ckpt_path": report.get("ckpt_path"), "data": report["data"]}
    log_report_artifact(run, files, report_artifact_name(report.get("ckpt_path"), report["data"]["path"]), meta)
