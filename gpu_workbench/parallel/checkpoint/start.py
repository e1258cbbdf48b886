"""Where a run starts: its own newest good checkpoint (a resume), another run's (`checkpoint.load_from`,
whole training state or `checkpoint.load_model_only` weights), or nothing. The choice and its checks
happen before anything in the run directory is written; a checkpoint that does not fit is refused in one
line naming the first field that differs (fingerprint.py says which fields may change).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpu_workbench.parallel.checkpoint.fingerprint import LAYOUT, MUST_MATCH, STATE, fingerprint, first_difference
from gpu_workbench.parallel.checkpoint.listing import newest_good, say_skipped, scan
from gpu_workbench.parallel.checkpoint.manifest import read_meta, verify
from gpu_workbench.parallel.checkpoint.universal import FORMAT
from gpu_workbench.parallel.runtime.errors import UserError


@dataclass
class Start:
    """A run's starting point. how: "fresh", "resume" (this run directory's own) or "load_from"."""

    how: str = "fresh"
    path: str | None = None
    step: int = 0                  # optimizer steps already taken when the run starts
    model_only: bool = False
    resharded: bool = False        # the checkpoint's layout (recipe, ranks, tp, pp) differs from this run's
    written_by: dict = field(default_factory=dict)   # {"recipe", "world_size", "dims"} from its meta.json

    def record(self) -> dict | None:
        """What config.json's segment records about it (None for a fresh start)."""
        return None if self.how == "fresh" else asdict(self)


def format_of(meta: dict) -> str:
    """The checkpoint's format; meta.json without one predates the universal format."""
    return meta.get("format") or ("deepspeed" if meta["recipe"].startswith("zero") else "pre-universal")


def layout_text(recipe: str, world_size: int, dims: dict | None = None) -> str:
    """'fsdp on 2 ranks', 'ddp tp=2 on 2 ranks': the recipe, its model-parallel degrees, the ranks."""
    extra = "".join(f" {k}={v}" for k, v in (dims or {}).items() if k in ("pp", "cp", "tp") and v > 1)
    return f"{recipe}{extra} on {world_size} rank{'s' if world_size != 1 else ''}"


def _fits(meta: dict, cfg, world_size: int, reader_format: str, model_only: bool) -> tuple[str | None, bool]:
    """(why this checkpoint cannot start the run, or None; whether it is resharded)."""
    saved = meta.get("fingerprint") or {"recipe": meta["recipe"], "world_size": meta["world_size"]}
    current = fingerprint(cfg, world_size)
    written = format_of(meta)
    if written != reader_format:
        return (f"it is in the {written} checkpoint format (written by {meta['recipe']}), which recipe "
                f"{cfg.recipe} does not read"), False
    universal = written == FORMAT
    difference = first_difference(saved, current, ("model",) if model_only else STATE if universal else MUST_MATCH)
    return difference, first_difference(saved, current, LAYOUT) is not None


def _checked(path: Path, how: str, cfg, world_size: int, reader_format: str) -> Start:
    meta, _ = read_meta(path)
    model_only = how == "load_from" and cfg.checkpoint.load_model_only
    problem, resharded = _fits(meta, cfg, world_size, reader_format, model_only)
    prefix = f"cannot resume {path}" if how == "resume" else f"cannot start from checkpoint.load_from={path}"
    if problem:
        hint = "use another run_dir, or checkpoint.resume=false to start over" if how == "resume" else (
            "checkpoint.load_model_only=true needs only the model to match")
        raise UserError(f"{prefix}: {problem}; {hint}")
    if not model_only and meta["step"] > cfg.steps:
        raise UserError(f"{prefix}: it holds {meta['step']} steps, more than steps={cfg.steps}; raise steps"
                        + (", or use another run_dir" if how == "resume" else ""))
    written_by = {"recipe": meta["recipe"], "world_size": meta["world_size"], "dims": meta.get("dims")}
    return Start(how, str(path), 0 if model_only else meta["step"], model_only, resharded, written_by)


def _source(given: Path, trusted: tuple) -> Path:
    """checkpoint.load_from: a step_* folder (checked), or a run directory's newest good checkpoint."""
    if (given / "meta.json").is_file() and given.name.startswith("step_"):
        problem = verify(given, trusted)
        if problem:
            raise UserError(f"checkpoint.load_from={given} is damaged ({problem})")
        return given
    if not (given / "checkpoints").is_dir():
        raise UserError(f"checkpoint.load_from={given} is neither a run directory nor a step_* checkpoint folder")
    newest = newest_good(given, trusted)
    if newest is None:
        raise UserError(f"checkpoint.load_from={given}: no complete, undamaged checkpoint in {given}/checkpoints")
    return newest


def _resumable(run_dir: Path, trusted: tuple) -> Path | None:
    """The newest good checkpoint of the run directory (None: it has none). All of them damaged is refused:
    starting again from step 0 would silently throw the run away."""
    latest, damaged = scan(run_dir, trusted)
    if latest is None and damaged:
        newest, problem = damaged[0]
        raise UserError(f"every checkpoint in {Path(run_dir) / 'checkpoints'} is damaged ({len(damaged)}; the "
                        f"newest, {newest.name}: {problem}); nothing to resume from: checkpoint.resume=false "
                        f"starts over and keeps the old run under previous/")
    say_skipped(damaged)
    return latest


def plan(run_dir: Path, cfg, world_size: int, reader_format: str, trusted: tuple, resume_only: bool = False) -> Start:
    """Where this run starts (rank 0 decides; see `decide` for every rank). A UserError if it cannot."""
    if cfg.checkpoint.resume or resume_only:
        latest = _resumable(run_dir, trusted)
        if latest is not None:
            return _checked(latest, "resume", cfg, world_size, reader_format)
    if cfg.checkpoint.load_from and not resume_only:
        return _checked(_source(Path(cfg.checkpoint.load_from), trusted), "load_from", cfg, world_size,
                        reader_format)
    return Start()


def decide(run_dir: Path, cfg, world_size: int, is_main: bool, reader_format: str, trusted: tuple = (),
           resume_only: bool = False) -> Start:
    """`plan` on rank 0, its answer (or its refusal, raised) on every rank. Collective."""
    import torch.distributed as dist

    answer: tuple[dict | None, str | None] = (None, None)
    if is_main:
        try:
            answer = (asdict(plan(run_dir, cfg, world_size, reader_format, trusted, resume_only)), None)
        except UserError as refusal:
            answer = (None, str(refusal))
    if dist.is_initialized():
        box = [answer]
        dist.broadcast_object_list(box, src=0)
        answer = box[0]
    start, problem = answer
    if problem:
        raise UserError(problem)
    return Start(**start)


def describe(start: Start, cfg, world_size: int, dims: dict) -> str | None:
    """The one stderr line saying where the run starts (None for a fresh start)."""
    if start.how == "fresh":
        return None
    by = start.written_by
    was = layout_text(by["recipe"], by["world_size"], by.get("dims"))
    now = layout_text(cfg.recipe, world_size, dims)
    name = Path(start.path).name
    if start.how == "resume":
        if start.resharded:
            return f"resuming {name} written by {was} as {now}: resharding"
        return f"resumed from step {start.step} (checkpoint {start.path})"
    if start.model_only:
        return f"starting from the weights of {start.path} (written by {was}) as {now}: fresh optimizer, step 0"
    return (f"starting from {start.path} (step {start.step}, written by {was}) as {now}"
            + (": resharding" if start.resharded else ""))
