"""What `wb checkpoint inspect|verify|export` say about a checkpoint, read from its files alone (no process
group, no model built): which step folder a path means, its step, format and the layout that wrote it,
its sizes, whether it is sound (an incremental delta: with the older folders it reads from), what it is
in an incremental chain, and what a resume by another layout would do.
"""

from __future__ import annotations

from pathlib import Path

from gpu_workbench.parallel.checkpoint.manifest import read_meta, verify
from gpu_workbench.parallel.checkpoint.start import format_of, layout_text
from gpu_workbench.parallel.checkpoint.universal import FORMAT
from gpu_workbench.parallel.runtime.errors import UserError


def step_folders(path: Path, argument: str = "PATH") -> list[Path]:
    """A step_* folder itself, or every complete one of a run directory (oldest first)."""
    from gpu_workbench.parallel.checkpoint import complete_checkpoints

    path = Path(path)
    if (path / "meta.json").is_file() and path.name.startswith("step_"):
        return [path]
    found = complete_checkpoints(path)
    if not found:
        raise UserError(f"{argument} {path}: neither a step_* checkpoint folder nor a run directory with "
                        f"complete checkpoints")
    return found


def newest(path: Path, argument: str = "PATH") -> Path:
    """The step folder a path names: itself, or a run directory's newest good checkpoint."""
    from gpu_workbench.parallel.checkpoint import newest_good

    folders = step_folders(path, argument)
    if len(folders) == 1 and folders[0] == Path(path):
        return folders[0]
    good = newest_good(Path(path))
    if good is None:
        raise UserError(f"{argument} {path}: every checkpoint in it is damaged (wb checkpoint verify says why)")
    return good


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _sizes(meta: dict) -> str:
    files = meta.get("files") or {}
    total = sum(f.get("size", 0) for f in files.values())
    tensors = sum(f.get("size", 0) for rel, f in files.items() if rel.startswith("dcp/"))
    return f"{len(files)} files, {_mib(total)}" + (f" ({_mib(tensors)} of tensors in dcp/)" if tensors else "")


def _chain(meta: dict, name: str) -> str | None:
    """What an incremental checkpoint is: a base, or a delta and the older folders it reads from."""
    tensors = meta.get("tensors")
    if not tensors:
        return None
    here = sum(1 for e in tensors.values() if e["in"] == name)
    others = sorted({e["in"] for e in tensors.values()} - {name})
    if not meta.get("chain"):
        return f"  incremental: a full base ({here} tensors)"
    return (f"  incremental: delta {meta['chain']} after its base; {here} of {len(tensors)} tensors written here, "
            f"the rest read from {', '.join(others) or 'nothing else'}")


def _resume_would(meta: dict, recipe: str | None, nproc: int | None) -> str:
    written = format_of(meta)
    was = layout_text(meta["recipe"], meta["world_size"], meta.get("dims"))
    if recipe is None:
        if written == FORMAT:
            return ("any recipe of the shared loop (single, ddp, fsdp, pipeline, tp, local-sgd, zero1-3) on any "
                    "number of ranks: "
                    "resharded where the layout differs; model, data, seed, global_batch, precision must match")
        return f"only {was} reads it back ({written} format)"
    from gpu_workbench.parallel import recipes

    reader = recipes.get(recipe).checkpoint_format
    now = layout_text(recipe, nproc or meta["world_size"])
    if reader != written:
        return f"{now} cannot read it: it is in the {written} format, {recipe} reads {reader}"
    if written != FORMAT and (recipe, nproc or meta["world_size"]) != (meta["recipe"], meta["world_size"]):
        return f"{now} cannot read it: the {written} format is read back by {was} only"
    same = (recipe, nproc or meta["world_size"]) == (meta["recipe"], meta["world_size"])
    return f"{now} resumes it" + ("" if same else " after resharding")


def inspect(path: Path, recipe: str | None = None, nproc: int | None = None) -> list[str]:
    """The lines `wb checkpoint inspect` prints: every checkpoint of a run directory, or one step folder."""
    lines = []
    for folder in step_folders(path):
        meta, problem = read_meta(folder)
        if problem:
            lines += [f"{folder}: damaged ({problem})"]
            continue
        trouble = verify(folder)
        batch = meta.get("fingerprint", {}).get("global_batch", 0)
        was = layout_text(meta["recipe"], meta["world_size"], meta.get("dims"))
        lines += [f"{folder}",
                  f"  step {meta['step']} ({meta['step'] * batch} samples seen), format {format_of(meta)}, "
                  f"written by {was}",
                  f"  size: {_sizes(meta)}",
                  *filter(None, [_chain(meta, folder.name)]),
                  f"  state: {'good' if trouble is None else 'damaged: ' + trouble}",
                  f"  a resume: {_resume_would(meta, recipe, nproc)}"]
    return lines


def verify_all(path: Path) -> list[tuple[Path, str | None]]:
    """[(step folder, None if sound else what is wrong)] for a step folder or a run directory's checkpoints."""
    return [(folder, verify(folder)) for folder in step_folders(path)]


def export_weights(path: Path) -> tuple[dict, dict]:
    """({GPT parameter name: full tensor}, {metadata strings}) of a universal checkpoint, on one process."""
    from gpu_workbench.parallel.checkpoint.universal import consolidated_weights

    folder = newest(path)
    meta, _ = read_meta(folder)
    if format_of(meta) != FORMAT:
        raise UserError(f"PATH {folder} is in the {format_of(meta)} format; export reads the universal format "
                        f"(the torch recipes' checkpoints)")
    problem = verify(folder)
    if problem:
        raise UserError(f"PATH {folder} is damaged ({problem})")
    tied = bool(meta.get("fingerprint", {}).get("model.tie_embeddings"))
    info = {"step": str(meta["step"]), "written_by": layout_text(meta["recipe"], meta["world_size"], meta.get("dims")),
            "checkpoint": str(folder)}
    return consolidated_weights(folder, tied), info
