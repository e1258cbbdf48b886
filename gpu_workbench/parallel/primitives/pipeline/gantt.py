"""Gantt chart of one pipeline step: the measured spans of each rank beside the simulator's prediction.

    draw_gantt(json.loads(Path("runs/x/pipeline.json").read_text()), "runs/x/gantt.png")

`pipeline.json` (written by the pipeline recipe) holds, per rank, `[kind, micro-batch, stage, start_ms,
end_ms]` spans: F forward, B backward (input gradient for zero-bubble), W weight gradient, and for the
measured step also S / R, waits on sends and receives. matplotlib is imported here, when a chart is drawn.
"""

from __future__ import annotations

from pathlib import Path

COLORS = {"F": "#55A868", "B": "#C44E52", "W": "#8172B2", "S": "#64B5CD", "R": "#CCCCCC"}
LABELS = {"F": "forward", "B": "backward", "W": "weight grad", "S": "send wait", "R": "recv wait"}


def draw_gantt(timeline: dict, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")   # files only
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = [("measured", timeline["measured"], "ms"), ("predicted (simulator, measured costs)",
                                                          timeline["predicted"], "ms")]
    pp = int(timeline["pp"])
    fig, axes = plt.subplots(2, 1, figsize=(11, 1.2 + 1.1 * pp), sharex=True)
    for ax, (title, ranks, unit) in zip(axes, panels, strict=True):
        for r, spans in ranks.items():
            y = int(r)
            for kind, mb, stage, start, end in spans:
                if kind in "SR" and end - start < 1e-3:
                    continue
                height = 0.35 if kind in "SR" else 0.8
                ax.barh(y, end - start, left=start, height=height, color=COLORS.get(kind, "#999999"),
                        edgecolor="black" if kind in "FBW" else "none", linewidth=0.4)
                if kind in "FBW" and end - start > 0:
                    label = f"{mb}" if timeline.get("virtual_stages", 1) == 1 else f"{mb}.{stage}"
                    ax.text(start + (end - start) / 2, y, label, ha="center", va="center", fontsize=6)
        bubble = timeline.get(f"bubble_fraction_{title.split()[0]}")
        ax.set_title(f"{title}: bubble {bubble:.3f}" if bubble is not None else title, fontsize=9)
        ax.set_yticks(range(pp), [f"rank {r}" for r in range(pp)])
        ax.invert_yaxis()
        ax.set_xlabel(f"time ({unit})")
    fig.suptitle(f"{timeline['schedule']}: pp={pp}, m={timeline['microbatches']}, v={timeline.get('virtual_stages', 1)}"
                 f" (labels: micro-batch{'' if timeline.get('virtual_stages', 1) == 1 else '.stage'})", fontsize=10)
    fig.legend(handles=[Patch(color=c, label=LABELS[k]) for k, c in COLORS.items()], loc="lower center", ncol=5,
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
