"""The evaluation report's Markdown tables and plots, and the progress bars of evaluate / stats."""

import io
import logging
import sys

import matplotlib
import numpy as np
from rich.console import Console

from predictor.evaluation_plots import REFERENCES, capacity_series, draw_lines, make_plots, merge_equal
from predictor.evaluation_report import markdown
from predictor.progress import progress_bars

CAPS = (0.05, 0.25, 0.5)


def _run(policy, cap, hit, stall, timing="timed"):
    return {"policy": policy, "capacity": cap, "hit_rate": hit, "stall_ms_per_token": stall, "timing": timing,
            "scope": "global", "slots": 4, "tokens_per_s": 250.0, "bytes_moved": 1e9, "prefetch_issued": 3,
            "prefetch_used": 2, "prefetch_late": 1, "prefetch_wasted": 0, "accesses_per_s": 1e6, "gap_closed": None}


def _report():
    runs = []
    for i, cap in enumerate(CAPS):
        runs += [
            _run("lru", cap, 0.2 + 0.2 * i, 0.04 - 0.01 * i),
            _run("belady", cap, 0.4 + 0.2 * i, 0.03 - 0.01 * i),
            _run("oracle_schedule", cap, 1.0, 0.0),
            _run("lower_bound", cap, 0.4 + 0.2 * i, 0.0),  # Belady's hits: drawn on the stall plot only
            _run("cooccurrence+scheduler", cap, 0.3 + 0.1 * i, 0.035),
            _run("moe_infinity+scheduler", cap, 0.3 + 0.1 * i, 0.035),  # the same points: one line, "a = b"
            _run("predictor", cap, 0.7 + 0.1 * i, 0.01),
            _run("predictor+scheduler", cap, 0.6 + 0.1 * i, 0.012),
            _run("oracle", cap, 1.0, 0.0),
        ]
    runs.append(_run("all_resident", 1.0, 1.0, 0.0, timing="reference"))
    def metrics(scale):
        return {"recall@2": 0.6 * scale, "recall@2/layer": [v * scale for v in (0.5, 0.6, 0.7)], "f1_micro": 0.5,
                "f1_macro_layers": 0.5, "pr_auc": 0.6, "moebeyond/accuracy": 0.9, "moebeyond/f1_macro01": 0.7,
                "position_buckets": ["0", "1+"], "recall@2/position": [0.4, None]}  # fmt: skip

    return {
        "data": {"path": "t", "source_model": "tiny", "split": "val", "sequences": 3, "tokens": 40,
                 "num_moe_layers": 3, "num_experts": 8, "top_k": 2, "train_data": "t", "train_sequences": 9},
        "ckpt_path": "p.safetensors", "budget": 2, "window": 2, "elapsed_s": 1.0,
        "time_model": {"preset": "auto", "link": "pcie4", "expert_bytes": 1e6, "bandwidth_GBps": 25.0,
                       "copy_ms": 0.04, "compute_ms_per_layer": 1.0, "prediction_ms": 0.2},
        "scorers": {name: {"mode": "token_ahead", "lookahead": None, "score_seconds": 1.0, "tokens_per_s": 40.0,
                           "metrics": metrics(s)}
                    for name, s in (("frequency", 0.8), ("predictor", 1.2), ("oracle", 1 / 0.7))},
        "simulation": runs,
    }  # fmt: skip


def test_capacity_series_level_lines_and_stall_only_bound():
    hit = capacity_series(_report(), "hit_rate", 100.0)
    assert "lower_bound" not in hit and np.allclose(hit["lru"], [(5.0, 20.0), (25.0, 40.0), (50.0, 60.0)])
    assert hit["all_resident"] == [(5.0, 100.0), (25.0, 100.0), (50.0, 100.0)]  # a level line over the capacities
    assert capacity_series(_report(), "stall_ms_per_token", 1.0)["lower_bound"] == [(5.0, 0.0), (25.0, 0.0), (50.0, 0.0)]


def test_merge_equal_joins_only_identical_series():
    merged = merge_equal({"a": [(0, 1.0)], "b": [(0, 1.0)], "c": [(0, 1.1)], "d": [(1, 1.0)]}, tol=1e-3)
    assert list(merged) == ["a = b", "c", "d"]


def test_draw_lines_predictor_first_references_apart_distinct_styles():
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    handles = draw_lines(ax, capacity_series(_report(), "hit_rate", 100.0), plt.cm.tab20.colors)
    labels = [h.get_label() for h in handles]
    assert labels[:2] == ["predictor", "predictor+scheduler"]
    header = labels.index("references (not competitors):")
    competitors, references = handles[:header], handles[header + 1:]
    assert "cooccurrence+scheduler =\nmoe_infinity+scheduler" in labels[:header]  # merged and wrapped
    assert [h.get_label() for h in references] == ["belady", "oracle_schedule = oracle =\nall_resident"]
    for h in references:
        assert h.get_linestyle() != "-" and h.get_color() in {grey for _, grey, _ in REFERENCES.values()}
    colors = [h.get_color() for h in competitors]
    markers = [h.get_marker() for h in competitors]
    assert len(set(colors)) == len(colors) and len(set(markers)) == len(markers)
    assert competitors[0].get_linewidth() > max(h.get_linewidth() for h in competitors[2:])  # the predictor stands out
    assert competitors[0].get_zorder() > max(h.get_zorder() for h in competitors[2:] + references)
    plt.close(fig)


def test_make_plots_and_markdown_tables(tmp_path):
    report = _report()
    files = make_plots(report, tmp_path)
    assert [f.name for f in files] == ["hit_rate_vs_capacity.png", "stall_vs_capacity.png", "recall_per_layer.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = markdown(report)
    lines = md.splitlines()
    hit = lines[lines.index("### Hit rate (%)") + 2:]
    assert [c.strip() for c in hit[0].strip("|").split("|")] == ["policy", "5%", "25%", "50%"]
    assert hit[1].startswith("|:") and hit[1].rstrip().endswith(":|")  # names left, numbers right
    row = next(line for line in hit if line.startswith("| predictor+scheduler"))
    assert [c.strip() for c in row.strip("|").split("|")] == ["predictor+scheduler", "60.0", "70.0", "80.0"]
    assert "`all_resident` (every expert on the GPU from the start): stall 0.00 ms/token" in md
    quality = next(line for line in lines if line.startswith("| predictor "))
    assert [c.strip() for c in quality.strip("|").split("|")][:3] == ["predictor", "token_ahead", "72.0"]
    head = next(line for line in lines if line.startswith("| scorer "))
    ece = [c.strip() for c in head.strip("|").split("|")].index("ECE")
    assert [c.strip() for c in quality.strip("|").split("|")][ece] == "–"  # a report written before the ECE column
    position = next(line for line in lines if line.startswith("| scorer") and line.rstrip().endswith("1+ |"))
    assert lines[lines.index(position) + 2].replace(" ", "") == "|frequency|40.0|—|"  # None: no rows there
    assert "hybrid miss" not in md  # no CPU time in this time model
    report["time_model"] |= {"cpu_expert_ms": 0.13, "cpu_async": True, "cpu_handoff_ms": 0.05, "cpu_host_share": 0.25}
    assert ("A hybrid miss takes 0.13 ms on the host CPU, on a pool of its own (round trip 0.05 ms; the host thread "
            "loses 25% of the pool's time).") in markdown(report)
    report["time_model"]["cpu_async"] = False
    assert "A hybrid miss takes 0.13 ms on the host CPU, on the host thread." in markdown(report)


def test_progress_bars_silent_off_a_terminal_and_logs_above_the_bar():
    piped = Console(file=io.StringIO())
    with progress_bars(piped) as bars:
        assert list(bars.track([1, 2, 3], description="scoring x")) == [1, 2, 3]
    assert piped.file.getvalue() == ""

    term = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=100)
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with progress_bars(term) as bars:
            assert handler.stream is not sys.__stderr__ and hasattr(handler.stream, "rich_proxied_file")
            for i in bars.track(range(3), description="scoring x"):
                logging.getLogger("t").warning("row %d done", i)
        assert handler.stream is sys.stderr  # restored
    finally:
        root.removeHandler(handler)
    text = term.file.getvalue()
    assert "scoring x" in text and "row 2 done" in text  # log lines go through rich, above the bar
    with progress_bars(term, enabled=False) as bars:
        list(bars.track(range(3), description="off"))
    assert "off" not in term.file.getvalue()


def test_a_stdout_that_is_no_terminal_keeps_its_log_lines_under_a_bar(capsys):
    """`python evaluate.py | tee log` from a terminal: the bars on stderr, the log lines still on stdout (rich
    sent them through its stderr console, so the piped log lost every line logged while a bar showed)."""
    term = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=100)
    handler = logging.StreamHandler(sys.stdout)  # pytest's captured stdout: no terminal
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with progress_bars(term) as bars:
            for i in bars.track(range(3), description="scoring x"):
                logging.getLogger("t").warning("row %d done", i)
                print("printed", i)
    finally:
        root.removeHandler(handler)
    out = capsys.readouterr().out
    assert "row 2 done" in out and "printed 2" in out and "row 2 done" not in term.file.getvalue()


def test_progress_bar_default_console_is_stderr(capsys):
    with progress_bars() as bars:
        list(bars.track(range(5), description="quiet"))
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal
