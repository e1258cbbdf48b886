"""`wb report`'s time-breakdown figure: runs trained with --timeline (a `trace.json`) get, per rank, the median
step split into busy, exposed communication and idle time (`wb profile analyze`, profiling/analyze.py)."""

from __future__ import annotations

from gpu_workbench.profiling.analyze import analyze_run
from gpu_workbench.profiling.errors import UsageError

PARTS = (("busy_ms", "busy (compute)"), ("exposed_ms", "exposed communication"), ("idle_ms", "idle"))


def breakdowns(runs) -> list[tuple[str, int, dict]]:
    """[(run name, rank, its medians)] of the runs whose trace can be analysed (two steps at least)."""
    rows = []
    for run in runs:
        if not (run.path / "trace.json").is_file():
            continue
        try:
            result = analyze_run(run.path)
        except UsageError:   # a trace without two complete steps: nothing to break down
            continue
        rows += [(run.path.name, rank, medians) for rank, medians in result["ranks"].items()]
    return rows


def figure(runs, out, machine: str) -> str | None:
    """time_breakdown.png: one stacked bar per (run, rank); None where no run has a timeline."""
    from gpu_workbench.cli.plots import pyplot

    rows = breakdowns(runs)
    if not rows:
        return None
    fig, ax = pyplot().subplots(figsize=(8, 0.45 * len(rows) + 1.6), dpi=110, layout="constrained")
    fig.suptitle(f"median step time per rank (host timeline: wb profile analyze)\n{machine}", fontsize=10)
    labels = [f"{name} rank {rank}" for name, rank, _ in rows]
    left = [0.0] * len(rows)
    for key, label in PARTS:
        widths = [medians[key] for _, _, medians in rows]
        ax.barh(labels, widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (the median of each part; hidden communication counts as busy)")
    # the legend above the bars, and the saved figure cut to what is drawn: no empty band at any row count
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(PARTS), frameon=False)
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(out / "time_breakdown.png", bbox_inches="tight", pad_inches=0.1)
    pyplot().close(fig)
    return "time_breakdown.png"


def table(runs) -> list[list[str]]:
    """The figure's numbers as a markdown table's rows (header first); [] without a timeline."""
    rows = breakdowns(runs)
    if not rows:
        return []
    head = ["run", "rank", "step ms", "busy ms", "comm ms", "exposed comm ms", "idle ms"]
    keys = ("step_ms", "busy_ms", "comm_ms", "exposed_ms", "idle_ms")
    return [head] + [[name, str(rank), *(f"{m[k]:.2f}" for k in keys)] for name, rank, m in rows]
