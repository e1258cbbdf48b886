"""`wb report`: rebuild the comparison report from run directories alone (nothing is re-run).

Reads each run's config.json, metrics.jsonl and summary.json (the run-directory format of
docs/ARCHITECTURE.md; summary.json through the typed RunSummary)
and writes `report.md` plus PNG figures: loss against step and against wall time, throughput,
model-state bytes per rank beside the ZeRO formula, peak memory per rank, the pipeline Gantt chart,
the async staleness histogram, and the kernel table when a `kernels.json` sits in the output folder.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from gpu_workbench.cli import moe_report, quant_report, timeline_report
from gpu_workbench.cli.plots import pyplot
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.flat_config import flatten_config
from gpu_workbench.parallel.runtime.summary import RunSummary

MIB = 1 << 20


@dataclass
class Run:
    path: Path
    summary: dict    # the RunSummary's fields, its optional parts (pipeline, comm, async_sgd) merged in
    config: dict
    metrics: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The recipe, with the model-parallel layout it ran under ("ddp tp=2 sp"), so two runs of one
        recipe stay apart in tables and legends."""
        dims = self.summary.get("parallel_dims") or {}
        layout = "".join(f" {d}={dims[d]}" for d in ("tp", "cp") if dims.get(d, 1) > 1)
        sp = " sp" if self.summary.get("tp_sequence_parallel") else ""
        return f"{self.summary.get('recipe', self.path.name)}{layout}{sp}{self._speed()}"

    def _speed(self) -> str:
        """How the step ran, where not the default: " compiled", " ac=selective", " bf16" (compiled vs eager,
        the checkpointing modes and the precisions side by side)."""
        s = self.summary
        ac = s.get("activation_checkpointing") or "none"
        return ((" compiled" if s.get("compiled") else "") + (f" ac={ac}" if ac != "none" else "")
                + (f" {s['precision']}" if s.get("precision", "fp32") != "fp32" else ""))


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not (path / "summary.json").is_file():
        raise UserError(f"{path} is not a finished run directory (no summary.json)")
    summary = RunSummary.load(path / "summary.json").flat()   # a garbled summary: a UserError naming it
    config_file, metrics_file = path / "config.json", path / "metrics.jsonl"
    config = _json_object(config_file, config_file.read_text()) if config_file.is_file() else {}
    metrics = [_json_object(f"{metrics_file}:{n}", line)
               for n, line in enumerate(metrics_file.read_text().splitlines(), 1) if line.strip()] \
        if metrics_file.is_file() else []
    return Run(path, summary, config, metrics)


def _json_object(where: str | Path, text: str) -> dict:
    """One JSON object of a run directory's files; anything else is a UserError naming file (and line)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: a JSON object is expected, got {type(value).__name__}")
    return value


def machine_label() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    import os

    return f"CPU {platform.machine()}, {os.cpu_count()} cores"


# ------------------------------------------------------------------------------------------ figures
def _figure(title: str, xlabel: str, ylabel: str, machine: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    ax.set_title(f"{title}\n{machine}", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name)
    pyplot().close(fig)
    return name


def _loss_figures(runs: list[Run], out: Path, machine: str) -> list[str]:
    names = []
    for x_key, xlabel, file in (("tokens", "tokens trained on", "loss_vs_tokens.png"),
                                ("elapsed_s", "wall time (s)", "loss_vs_time.png"),
                                ("step", "optimizer step (async: applied update)", "loss_vs_step.png")):
        fig, ax = _figure(f"training (and held-out) loss against {xlabel}", xlabel, "loss (nats/token)", machine)
        for i, run in enumerate(runs):
            points = [(m[x_key], m["loss"]) for m in run.metrics if x_key in m and "loss" in m]
            if points:   # equal losses draw one line over another: a style and marker per run keeps each visible
                line, = ax.plot(*zip(*points, strict=True), label=run.label, linewidth=1.4,
                                **_curve_style(i, len(points)))
                _held_out_curve(ax, run, x_key, line.get_color())
        targets = {r.summary.get("target_loss") for r in runs if r.summary.get("target_loss")}
        for t in targets:
            ax.axhline(t, color="grey", linestyle=":", linewidth=1)
        ax.legend(fontsize=8, title="distinct markers: equal curves overlap" if len(runs) > 1 else None,
                  title_fontsize=7)
        names.append(_save(fig, out, file))
    return names


DYNAMICS = (("step_time_s", "step time (s)"), ("grad_norm", "gradient norm (before clipping)"),
            ("lr", "learning rate"))


def _dynamics_figure(runs: list[Run], out: Path, machine: str) -> str:
    """Step time, gradient norm and learning rate against tokens, one panel each, every run's curve."""
    plt = pyplot()
    fig, axes = plt.subplots(len(DYNAMICS), 1, figsize=(8, 8), sharex=True)
    for ax, (key, label) in zip(axes, DYNAMICS, strict=True):
        for i, run in enumerate(runs):
            points = [(m["tokens"], m[key]) for m in run.metrics if "tokens" in m and m.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=run.label, linewidth=1.2, **_curve_style(i, len(points)))
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"step time, gradient norm, learning rate\n{machine}", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("tokens trained on")
    return _save(fig, out, "dynamics.png")


def _held_out_curve(ax, run: Run, x_key: str, color) -> None:
    """The run's evaluations (eval.every) beside its training loss: the same colour, open markers. An
    evaluation row's step is the last step run before it: plotted at that step's x."""
    points = [(m[x_key], m["val_loss"]) for m in run.metrics if "val_loss" in m and x_key in m]
    if points:
        ax.plot(*zip(*points, strict=True), label=f"{run.label} (held-out)", color=color, linestyle="--",
                marker="o", markerfacecolor="none", markersize=5, linewidth=1)


LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "x", "+", "*", "<", ">", "P")


def _curve_style(i: int, n_points: int) -> dict:
    """Run i's line style and marker (markers on ~12 points, offset per run so equal curves interleave)."""
    every = max(1, n_points // 12)
    return {"linestyle": LINE_STYLES[i % len(LINE_STYLES)], "marker": MARKERS[i % len(MARKERS)],
            "markersize": 4, "markevery": (i % every, every), "alpha": 0.9}


def _step_iqr(run: Run) -> tuple[float, float] | None:
    """The quartiles of a run's per-step tokens/s; None for the asynchronous recipes, whose rows are one
    worker's updates (their summary's tokens/s counts every worker)."""
    values = sorted(m["tokens_per_s"] for m in run.metrics if "tokens_per_s" in m and "val_loss" not in m)
    if not values or any("worker" in m for m in run.metrics):
        return None
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return q[0], q[2]


def _bar_figure(runs: list[Run], out: Path, machine: str, file: str, title: str, ylabel: str,
                series: dict[str, list[float | None]], spread: list[tuple[float, float] | None] | None = None) -> str:
    """Bars per run (and series); `spread`: (low, high) whiskers around the first series' bars."""
    fig, ax = _figure(title, "recipe", ylabel, machine)
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(runs))]
        ax.bar(xs, [v or 0 for v in values], width=width, label=label)
        for x, v, lo_hi in zip(xs, values, spread if spread and i == 0 else [None] * len(xs), strict=True):
            if v is not None and lo_hi is not None:
                ax.errorbar(x, v, yerr=[[max(v - lo_hi[0], 0)], [max(lo_hi[1] - v, 0)]], color="black", capsize=4)
    ax.set_xticks(range(len(runs)), [r.label for r in runs], rotation=30, ha="right")
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, out, file)


def _staleness_figure(runs: list[Run], out: Path, machine: str) -> str | None:
    """async-ps: how far ahead of the slowest worker (SSP clocks) each applied gradient was, and how
    many server updates landed between its parameter read and its apply."""
    panels = [("staleness_histogram", "SSP clocks ahead of the slowest worker"),
              ("version_lag_histogram", "server updates between read and apply")]
    with_hist = [r for r in runs if isinstance(r.summary.get("staleness_histogram"), dict)]
    if not with_hist:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    fig.suptitle(f"staleness of applied gradients\n{machine}", fontsize=10)
    for ax, (key, xlabel) in zip(axes, panels, strict=True):
        for run in with_hist:
            hist = {int(k): v for k, v in (run.summary.get(key) or {}).items()}
            ax.bar(list(hist), list(hist.values()), alpha=0.6, label=run.label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("gradients applied")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # clocks and versions are whole numbers
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out, "staleness.png")


def _gantt_figures(runs: list[Run], out: Path) -> list[str]:
    """A pipeline run draws its own Gantt chart (gantt.png in its run dir); the report carries a copy."""
    names = []
    for run in runs:
        src = run.path / "gantt.png"
        if src.is_file():
            name = f"gantt_{run.path.name}.png"
            if src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------- tables
COLUMNS = [  # (header, summary key, format)
    ("recipe", "recipe", "{}"), ("ranks", "world_size", "{}"), ("steps", "steps", "{}"),
    ("final loss", "final_loss", "{:.6g}"), ("final held-out loss", "final_val_loss", "{:.6g}"),
    ("tokens/s", "tokens_per_s", "{:.6g}"),
    ("time to target (s)", "time_to_target_s", "{:.4g}"),
    ("model state MiB/rank", "model_state_bytes_per_rank", "mib"),
    ("formula MiB/rank", "predicted_model_state_bytes_per_rank", "mib"),
    ("peak memory MiB/rank (GPU: max allocated; CPU: RSS)", "peak_memory_bytes_per_rank", "mib"),
    # measured and predicted on one statistic: the median step (predicted from median stage costs); the
    # least-disturbed step beside it (on a shared machine noise only adds idle time)
    ("bubble measured (median)", "bubble_fraction_measured_median", "{:.3f}"),
    ("bubble predicted (median costs)", "bubble_fraction_predicted", "{:.3f}"),
    ("bubble measured (min)", "bubble_fraction_measured", "{:.3f}"),
    ("TP MiB/step/rank measured", "tp_bytes_per_step_per_rank_measured", "mib"),
    ("TP MiB/step/rank predicted", "tp_bytes_per_step_per_rank_predicted", "mib"),
    ("EP all-to-all MiB/step/rank measured", "ep_all_to_all_bytes_per_step_per_rank_measured", "mib"),
    ("EP all-to-all MiB/step/rank predicted", "ep_all_to_all_bytes_per_step_per_rank_predicted", "mib"),
    ("MoE dropped slots", "moe_dropped", "{}"),
    ("compile s (first step over median)", "compile_s", "{:.3g}"),
    ("activations MiB kept (1 micro-batch)", "activation_bytes_saved", "mib"),
]


def _cell(value, fmt: str) -> str:
    if value is None:
        return "—"
    if fmt == "mib":
        return f"{value / MIB:.4f}"
    return fmt.format(value)


def runs_table(runs: list[Run]) -> list[list[str]]:
    columns = [c for c in COLUMNS if any(r.summary.get(c[1]) is not None for r in runs)]   # no empty columns
    rows = [[h for h, _, _ in columns]]
    for run in runs:
        rows.append([run.label if key == "recipe" else _cell(run.summary.get(key), fmt) for _, key, fmt in columns])
    return rows


def _markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _kernel_section(out: Path) -> str:
    path = out / "kernels.json"
    if not path.is_file():
        return ""
    rows = json.loads(path.read_text())
    table = [["kernel", "case", "backend", "dtype", "max rel. error", "tolerance", "result"]]
    for r in rows:
        worst = max(r["errors"].values())
        table.append([r["kernel"], r["case"], r["backend"], r["dtype"], f"{worst:.1e}", f"{r['tolerance']:.0e}",
                      "pass" if worst <= r["tolerance"] else "FAIL"])
    passed = sum(row[-1] == "pass" for row in table[1:])
    return (f"\n## Kernels\n\n{passed}/{len(rows)} checks against a float64 reference passed.\n\n"
            + _markdown_table(table) + "\n")


# ----------------------------------------------------------------------------- provenance, warnings
PROVENANCE = ["torch", "triton", "deepspeed", "ray"]
# config keys a comparison may differ in: the recipe and its model-parallel layout (a run of a
# comparison is "recipe[:overrides]", e.g. ddp:tp.degree=2; the pipeline fills in its pp.microbatches),
# and how a run was named, launched, watched
RUN_ONLY_KEYS = ("recipe", "tp", "cp", "pp", "ep", "run_dir", "name", "segments", "progress", "profiling")


def _provenance_section(runs: list[Run]) -> str:
    """Which code, stack and machine produced each run (summary.json's provenance); '—' where not recorded."""
    table = [["run", "commit", "python", *PROVENANCE, "host", "device", "config sha256"]]
    for run in runs:
        p = run.summary.get("provenance") or {}
        versions, machine = p.get("versions") or {}, p.get("machine") or {}
        commit = p.get("git_commit")
        commit = f"{commit[:10]}{' (dirty)' if p.get('git_dirty') else ''}" if commit else "—"
        table.append([run.label, commit, versions.get("python") or "—",
                      *[versions.get(name) or "—" for name in PROVENANCE], machine.get("host") or "—",
                      machine.get("device") or "—", (p.get("config_sha256") or "—")[:12]])
    return "## Provenance\n\n" + _markdown_table(table) + "\n"


def config_differences(runs: list[Run]) -> dict[str, list]:
    """Config keys (dotted) whose values differ between runs, other than the recipe and how a run is named,
    launched or watched: {key: [value per run]}. A comparison is fair only when this is empty."""
    flat = [flatten_config({k: v for k, v in r.config.items() if k not in RUN_ONLY_KEYS}) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1}


def _warning_lines(runs: list[Run]) -> list[str]:
    differ = config_differences(runs)
    if not differ:
        return []
    shown = "; ".join(f"{k}: {', '.join(f'{r.label}={v}' for r, v in zip(runs, vals, strict=True))}"
                      for k, vals in list(differ.items())[:8])
    more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
    return [f"**Warning: these runs differ in more than the recipe**, so their numbers are not a like-for-like "
            f"comparison: {shown}{more}.\n"]


# ------------------------------------------------------------------------------------------ report
def build_report(run_dirs: list[str | Path], out: str | Path, failures: dict[str, str] | None = None) -> Path:
    """Write `out/report.md` and its figures from finished run directories. Returns report.md's path."""
    if not run_dirs:
        raise UserError("give at least one run directory")
    runs = [load_run(p) for p in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_label()
    figures = _figures(runs, out, machine)
    text = [f"# Recipe comparison\n\nMachine: {machine}. Runs: " + ", ".join(f"`{r.path}`" for r in runs) + ".\n",
            *_warning_lines(runs), "## Runs\n", _markdown_table(runs_table(runs)) + "\n", _provenance_section(runs)]
    breakdown = timeline_report.table(runs)   # runs trained with --timeline
    if breakdown:
        text.append("## Where the step time goes (median per step, wb profile analyze)\n\n"
                    + _markdown_table(breakdown) + "\n")
    if failures:
        text.append("## Failed runs\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in failures.items()) + "\n")
    text.append("## Figures\n")
    text += [f"![{name}]({name})\n" for name in figures]
    text.append(_kernel_section(out))
    report = out / "report.md"
    report.write_text("\n".join(text))
    return report


def _figures(runs: list[Run], out: Path, machine: str) -> list[str]:
    """Every figure the runs have data for, written into `out`; their file names in report order."""
    def each(key: str) -> list:
        return [r.summary.get(key) for r in runs]

    figures = [*_loss_figures(runs, out, machine), _dynamics_figure(runs, out, machine)]
    figures.append(_bar_figure(runs, out, machine, "throughput.png", "throughput (median over steps; whiskers: "
                               "interquartile range of the steps)", "tokens/s", {"tokens/s": each("tokens_per_s")},
                               spread=[_step_iqr(r) for r in runs]))
    figures.append(_bar_figure(
        runs, out, machine, "model_state_memory.png", "model-state bytes per rank: measured vs the recipe's formula",
        "MiB", {"measured": [_mib(v) for v in each("model_state_bytes_per_rank")],
                "formula": [_mib(v) for v in each("predicted_model_state_bytes_per_rank")]}))
    figures.append(_bar_figure(runs, out, machine, "peak_memory.png", "peak memory per rank (GPU: CUDA max "
                               "allocated; CPU: process RSS, torch's import included)", "MiB",
                               {"peak": [_mib(v) for v in each("peak_memory_bytes_per_rank")]}))
    staleness = _staleness_figure(runs, out, machine)
    quant = quant_report.figure(runs, out, machine)   # runs with a quant_eval.json
    breakdown = timeline_report.figure(runs, out, machine)   # runs with a trace.json
    routing = moe_report.figure(runs, out, machine)   # runs with experts (model.moe)
    return figures + [f for f in (staleness, quant, breakdown, routing) if f] + _gantt_figures(runs, out)


def _mib(value):
    return None if value is None else value / MIB
