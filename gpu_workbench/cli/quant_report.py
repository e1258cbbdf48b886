"""`wb report`'s quantisation figure: runs whose directory holds a `quant_eval.json` (`wb quant eval ... --json
RUN_DIR/quant_eval.json`) get their held-out loss per mode beside float, and each layer's output SQNR."""

from __future__ import annotations

import json
from pathlib import Path

from gpu_workbench.parallel.runtime.errors import UserError

FILE = "quant_eval.json"


def read(run_dir: Path) -> dict | None:
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(report, dict) or not {"fp", "modes"} <= set(report):
        raise UserError(f"{path}: not a `wb quant eval` report (needs \"fp\" and \"modes\")")
    return report


def figure(runs, out: Path, machine: str) -> str | None:
    """quant_eval.png: left, held-out loss (fp and each mode) per run; right, per-layer SQNR per run and mode."""
    from gpu_workbench.cli.plots import pyplot

    found = [(run, report) for run in runs if (report := read(run.path)) is not None]
    if not found:
        return None
    fig, (loss_ax, sqnr_ax) = pyplot().subplots(1, 2, figsize=(11, 4.2), dpi=110)
    fig.suptitle(f"quantisation accuracy on the held-out split (wb quant eval)\n{machine}", fontsize=10)
    modes = ["fp", *dict.fromkeys(m for _, r in found for m in r["modes"])]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(found))]
        losses = [(r["fp"] if mode == "fp" else r["modes"].get(mode, {})).get("loss") for _, r in found]
        loss_ax.bar(xs, [v or 0 for v in losses], width=width, label=mode)
    loss_ax.set_xticks(range(len(found)), [run.path.name for run, _ in found], rotation=30, ha="right")
    every = [r["fp"]["loss"] for _, r in found] + [m["loss"] for _, r in found for m in r["modes"].values()]
    low, high = min(every), max(every)
    pad = max(high - low, 1e-4 * high)
    loss_ax.set_ylim(low - 2 * pad, high + pad)   # the deltas are what matters: zoom onto them
    loss_ax.set_ylabel("held-out loss (nats/token)")
    loss_ax.legend(fontsize=8)
    for run, r in found:
        for mode, m in r["modes"].items():
            sqnr_ax.plot([layer["sqnr_db"] for layer in m["layers"]], marker="o", ms=3,
                         label=f"{run.path.name} {mode}")
    sqnr_ax.set_xlabel("quantised layer (blocks, in order)")
    sqnr_ax.set_ylabel("output SQNR (dB)")
    sqnr_ax.legend(fontsize=7)
    for ax in (loss_ax, sqnr_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "quant_eval.png")
    pyplot().close(fig)
    return "quant_eval.png"
