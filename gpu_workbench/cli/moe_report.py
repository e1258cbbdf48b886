"""`wb report`'s mixture-of-experts figure: runs whose summary has a `moe` part (model.moe.experts > 0) get the
slots routed to each expert, one histogram per MoE layer, the mean and the load imbalance (max / mean) in
each panel's title."""

from __future__ import annotations

from pathlib import Path


def figure(runs, out: Path, machine: str) -> str | None:
    """moe_routing.png: a row per run with a moe part, a panel per MoE layer; None when no run has one."""
    from gpu_workbench.cli.plots import pyplot

    found = [run for run in runs if run.summary.get("moe_tokens_per_expert")]
    if not found:
        return None
    layers = max(len(run.summary["moe_tokens_per_expert"]) for run in found)
    fig, axes = pyplot().subplots(len(found), layers, figsize=(3.2 * layers + 1, 2.6 * len(found)), dpi=110,
                                  squeeze=False)
    fig.suptitle(f"slots routed to each expert (training and held-out forwards, every rank's tokens once)\n"
                 f"{machine}", fontsize=10)
    for row, run in zip(axes, found, strict=True):
        counts, imbalance = run.summary["moe_tokens_per_expert"], run.summary["moe_imbalance_max_over_mean"]
        for i, ax in enumerate(row):
            if i >= len(counts):
                ax.axis("off")
                continue
            ax.bar(range(len(counts[i])), counts[i])
            ax.axhline(sum(counts[i]) / len(counts[i]), color="k", lw=0.8, ls="--")
            ax.set_title(f"{run.label} MoE layer {i}: max/mean {imbalance[i]:.2f}", fontsize=8)
            ax.set_xlabel("expert", fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "moe_routing.png")
    pyplot().close(fig)
    return "moe_routing.png"
