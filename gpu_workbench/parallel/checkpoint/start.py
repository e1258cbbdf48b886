"""Where a run starts: its own newest good checkpoint (a resume), another run's (`checkpoint.load_from`,
whole training state or `checkpoint.load_model_only` weights), or nothing. The choice and its checks
happen before anything in the run directory is written; a checkpoint that does not fit is refused in one
line naming the first field that differs (fingerprint.py says which fields may change).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpu_workbench.parallel.checkpoint.fingerprint import LAYOUT, MUST_MATCH, STATE, fingerprint, first_difference
from gpu_workbench.parallel.checkpoint.handed import launcher_plan
from gpu_workbench.parallel.checkpoint.listing import newest_good, say_skipped, scan
from gpu_workbench.parallel.checkpoint.manifest import read_meta, verify
from gpu_workbench.parallel.checkpoint.universal import FORMAT
from gpu_workbench.parallel.models import hf_config
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


def _hint(how: str, problem: str, model_only: bool) -> str:
    """A remedy that works for this refusal (load_model_only cannot help a model that differs)."""
    if how == "resume":
        return "use another run_dir, or checkpoint.resume=false to start over"
    if model_only or problem.startswith("model."):
        return ("the model must be the checkpoint's even with checkpoint.load_model_only=true: give this run "
                "the checkpoint's model settings (its run's config.json), or start without checkpoint.load_from")
    return "checkpoint.load_model_only=true needs only the model to match"


def _checked(path: Path, how: str, cfg, world_size: int, reader_format: str) -> Start:
    meta, _ = read_meta(path)
    model_only = how == "load_from" and cfg.checkpoint.load_model_only
    problem, resharded = _fits(meta, cfg, world_size, reader_format, model_only)
    prefix = f"cannot resume {path}" if how == "resume" else f"cannot start from checkpoint.load_from={path}"
    if problem:
        raise UserError(f"{prefix}: {problem}; {_hint(how, problem, model_only)}")
    if not model_only and meta.get("data") is not None and cfg.data.kind == "tokens":
        from gpu_workbench.parallel.tokens.check import loader_state

        if meta["data"] != loader_state(cfg, meta["step"]):
            raise UserError(f"{prefix}: its loader position {meta['data']} is not this run's at step "
                            f"{meta['step']}; use another run_dir, or checkpoint.resume=false to start over")
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
    if not (given / "checkpoints").is_dir() and (given / "config.json").is_file():
        raise UserError(f"checkpoint.load_from={given} is a Hugging Face model directory, not a run: write "
                        f"checkpoint.load_from=hf:{given}")
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


def _hf_start(hf_dir: Path, cfg, reader_format: str) -> Start:
    """checkpoint.load_from = "hf:PATH": its weights alone (a Hugging Face directory holds no optimizer)."""
    from gpu_workbench.parallel.checkpoint.hf_load import check_shapes

    if reader_format != FORMAT:
        raise UserError(f"checkpoint.load_from={cfg.checkpoint.load_from}: recipe {cfg.recipe} does not read "
                        f"Hugging Face weights; use single, ddp, fsdp or pipeline (any layout)")
    hf_config.read_config(hf_dir)   # a project run given as hf: is refused here
    check_shapes(hf_dir, cfg.model)  # a missing file, shard or tensor, a wrong shape: before any rank starts
    return Start("load_from", f"{hf_config.PREFIX}{hf_dir}", 0, True, False,
                 {"recipe": "huggingface", "world_size": 1, "dims": None})


def plan(run_dir: Path, cfg, world_size: int, reader_format: str, trusted: tuple, resume_only: bool = False) -> Start:
    """Where this run starts (rank 0 decides; see `decide` for every rank). A UserError if it cannot."""
    if cfg.checkpoint.resume or resume_only:
        latest = _resumable(run_dir, trusted)
        if latest is not None:
            return _checked(latest, "resume", cfg, world_size, reader_format)
    if cfg.checkpoint.load_from and not resume_only:
        hf_dir = hf_config.hf_path(cfg.checkpoint.load_from)
        if hf_dir is not None:
            return _hf_start(hf_dir, cfg, reader_format)
        return _checked(_source(Path(cfg.checkpoint.load_from), trusted), "load_from", cfg, world_size,
                        reader_format)
    return Start()


def check_at(start: Start, cfg, world_size: int, reader_format: str) -> Start:
    """A planned start re-checked for a run at `world_size` (fingerprint, steps, resharding: meta.json only)."""
    return start if start.how == "fresh" else _checked(Path(start.path), start.how, cfg, world_size, reader_format)


def _as_handed(run_dir: Path, cfg, world_size: int, reader_format: str) -> Start | None:
    """The launcher's plan (handed.py), its files verified there, re-checked at this world size; or None."""
    handed = launcher_plan(run_dir)
    return None if handed is None else check_at(Start(**handed), cfg, world_size, reader_format)


def decide(run_dir: Path, cfg, world_size: int, is_main: bool, reader_format: str, trusted: tuple = (),
           resume_only: bool = False) -> Start:
    """`plan` on rank 0, its answer (or its refusal, raised) on every rank. Collective."""
    import torch.distributed as dist

    answer: tuple[dict | None, str | None] = (None, None)
    if is_main:
        try:
            start = None if resume_only else _as_handed(run_dir, cfg, world_size, reader_format)
            start = start or plan(run_dir, cfg, world_size, reader_format, trusted, resume_only)
            answer = (asdict(start), None)
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
    if start.path.startswith(hf_config.PREFIX):
        return f"starting from the Hugging Face weights of {start.path[len(hf_config.PREFIX):]} as {now}: step 0"
    if start.model_only:
        return f"starting from the weights of {start.path} (written by {was}) as {now}: fresh optimizer, step 0"
    return (f"starting from {start.path} (step {start.step}, written by {was}) as {now}"
            + (": resharding" if start.resharded else ""))
