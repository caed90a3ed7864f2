"""The evaluation report's plots: hit rate and stall against capacity, recall@top_k per MoE layer.

What makes them readable:
- capacity and hit rate in percent; stall in ms per token, with its share of the all-resident time
  per token on the right axis;
- ceilings and bounds (oracle schedule, Belady, lower bound, oracle prefetch, all resident) are grey
  dashed reference lines, listed apart at the end of the legend, never styled as competitors; the
  lower bound only on the stall plot (its hit rate is Belady's);
- every competitor its own colour and marker: a colour pair per family (the name before "+"), the
  dark shade for the family itself, the light one for its +policy variants; hollow markers, so points
  that overlap stay visible; the predictor red, thick, filled, first in the legend and drawn on top;
- series with the same points are drawn once and labelled "a = b", so no line hides another;
- the legend sits outside the axes.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from predictor.atomic import atomic_path

# ceilings and bounds: (line style, grey level, marker)
REFERENCES = {
    "oracle_schedule": ("--", "0.15", "o"),
    "oracle_schedule_token": ((0, (4, 1.5)), "0.25", "o"),
    "belady": ("-.", "0.3", "s"),
    "lower_bound": ((0, (1, 1.5)), "0.4", "v"),
    "oracle": ((0, (6, 2, 1, 2)), "0.5", "D"),
    "all_resident": ((0, (3, 2)), "0.6", "^"),
}
STALL_ONLY = {"lower_bound"}
PREDICTOR = "predictor"
PREDICTOR_PAIR = 6  # tab20's red pair
PAIRS = (0, 2, 4, 8, 10, 12, 16, 18)  # tab20's (dark, light) pairs without red (the predictor's) and grey
MARKERS = "osD^vPX*h<>pd8H"


class _Styles:
    """(colour, marker) per policy, assigned in drawing order."""

    def __init__(self, colors):
        self.colors, self.families, self.markers = colors, {}, {}

    def __call__(self, policy: str):
        family = policy.split("+")[0]
        pair = PREDICTOR_PAIR if family == PREDICTOR else self.families.setdefault(
            family, PAIRS[len(self.families) % len(PAIRS)])  # fmt: skip
        marker = self.markers.setdefault(policy, MARKERS[len(self.markers) % len(MARKERS)])
        return self.colors[pair + ("+" in policy)], marker


def merge_equal(series: dict[str, list], tol: float) -> dict[str, list]:
    """Series whose points agree within `tol` become one, labelled "a = b" (first name's style)."""
    groups: list[tuple[list[str], list]] = []
    for name, pts in series.items():
        for names, other in groups:
            close = [x == u and abs(y - v) <= tol for (x, y), (u, v) in zip(pts, other)]
            if len(other) == len(pts) and all(close):
                names.append(name)
                break
        else:
            groups.append(([name], pts))
    return {" = ".join(names): pts for names, pts in groups}


def _wrap(label: str) -> str:  # merged labels over several legend lines, so the legend stays narrow
    return textwrap.fill(label, 34, break_long_words=False, break_on_hyphens=False)


def draw_lines(ax, series: dict[str, list], colors) -> list:
    """Competitors (predictor first) and references on `ax`; returns the legend handles in order."""
    from matplotlib.lines import Line2D

    span = max((abs(y) for pts in series.values() for _, y in pts), default=0.0) or 1.0
    tol = 5e-4 * span
    comp = merge_equal({p: v for p, v in series.items() if p not in REFERENCES}, tol)
    refs = merge_equal({p: v for p, v in series.items() if p in REFERENCES}, tol)
    styles, handles = _Styles(colors), []
    for label, pts in sorted(comp.items(), key=lambda item: not item[0].startswith(PREDICTOR)):
        first = label.split(" = ")[0]
        color, marker = styles(first)
        ours = first.startswith(PREDICTOR)
        (line,) = ax.plot(*zip(*pts), color=color, marker=marker, lw=2.8 if ours else 1.5, ms=8 if ours else 6,
                          mfc=color if ours else "none", mew=1.5, zorder=4 if ours else 3,
                          label=_wrap(label))  # fmt: skip
        handles.append(line)
    if refs:
        handles.append(Line2D([], [], ls="none", label="references (not competitors):"))
    for label, pts in refs.items():
        ls, grey, marker = REFERENCES[label.split(" = ")[0]]
        (line,) = ax.plot(*zip(*pts), ls=ls, color=grey, lw=1.5, marker=marker, ms=4, mfc="none", zorder=2,
                          label=_wrap(label))  # fmt: skip
        handles.append(line)
    return handles


def capacity_series(report: dict, key: str, scale: float) -> dict[str, list]:
    """{policy: [(capacity %, scale * value)]} of the timed runs; the capacity-independent reference
    rows (all resident) as a level line over the plotted capacities."""
    out: dict[str, list] = {}
    for r in report["simulation"]:
        if r["timing"] == "timed" and not (key == "hit_rate" and r["policy"] in STALL_ONLY):
            out.setdefault(r["policy"], []).append((100 * r["capacity"], scale * r[key]))
    caps = sorted({x for pts in out.values() for x, _ in pts})
    for r in report["simulation"]:
        if r["timing"] == "reference" and caps:
            out[r["policy"]] = [(x, scale * r[key]) for x in caps]
    return {p: sorted(pts) for p, pts in out.items()}


def make_plots(report: dict, out_dir: Path) -> list[Path]:
    """hit_rate_vs_capacity.png, stall_vs_capacity.png (with simulation rows) and recall_per_layer.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    out_dir, files, d = Path(out_dir), [], report["data"]
    colors = plt.cm.tab20.colors
    where = f"split {d['split']}, {d['tokens']:,} tokens"

    def save(fig, handles, name):
        fig.legend(handles=handles, loc="outside right upper", fontsize=7.5)
        with atomic_path(out_dir / name) as tmp:  # the suffix stays: savefig picks PNG from it
            fig.savefig(tmp, dpi=120)
        plt.close(fig)
        files.append(out_dir / name)

    if any(r["timing"] == "timed" for r in report["simulation"]):
        tm = report["time_model"]
        resident = next((r for r in report["simulation"] if r["timing"] == "reference"), None)
        for key, what, name in (("hit_rate", "hit rate", "hit_rate_vs_capacity.png"),
                                ("stall_ms_per_token", "stall per token", "stall_vs_capacity.png")):  # fmt: skip
            series = capacity_series(report, key, 100.0 if key == "hit_rate" else 1.0)
            fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
            handles = draw_lines(ax, series, colors)
            ax.set_xticks(sorted({x for pts in series.values() for x, _ in pts}))
            ax.xaxis.set_major_formatter(PercentFormatter(100, decimals=0))
            ax.set_xlabel("capacity (% of all L x E routed experts the GPU holds)")
            if key == "hit_rate":
                ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
                ax.set_ylabel("hit rate (% of routed experts on the GPU in time)")
            else:
                ax.set_ylabel("stall per token (ms)")
                token_ms = 1e3 / resident["tokens_per_s"] if resident and resident["tokens_per_s"] > 0 else 0
                if token_ms > 0:
                    right = ax.secondary_yaxis("right", functions=(lambda ms, t=token_ms: 100 * ms / t,
                                                                   lambda pct, t=token_ms: pct * t / 100))  # fmt: skip
                    right.yaxis.set_major_formatter(PercentFormatter(100))
                    right.set_ylabel(f"% of the all-resident {token_ms:.3g} ms per token")
            subtitle = f"{tm['preset']} time model, {tm['link']}; {where}"
            ax.set_title(f"{d['source_model']}: {what} vs capacity\n{subtitle}", fontsize=10)
            ax.grid(alpha=0.3)
            save(fig, handles, name)
    if report["scorers"]:
        k = d["top_k"]
        series = {name: [(layer, 100 * v) for layer, v in enumerate(s["metrics"][f"recall@{k}/layer"])]
                  for name, s in report["scorers"].items()}  # fmt: skip
        fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
        handles = draw_lines(ax, series, colors)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
        ax.set_xlabel("MoE layer (0 = the first MoE layer)")
        ax.set_ylabel(f"recall@{k} (% of routed experts in the top {k})")
        ax.set_title(f"{d['source_model']}: recall@{k} per MoE layer\n{where}", fontsize=10)
        ax.grid(alpha=0.3)
        save(fig, handles, "recall_per_layer.png")
    return files
