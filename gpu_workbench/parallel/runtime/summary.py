"""The run summary: one typed record every recipe writes to <run_dir>/summary.json and `wb report` reads.

    summary = RunSummary.load("runs/x/summary.json")
    summary.final_loss, summary.pipeline.bubble_fraction_measured if summary.pipeline else None

The core fields are the same for every recipe; `pipeline`, `comm`, `async_sgd` and `tp` (tensor
parallelism's collectives) are filled by the recipes that measure them and are null elsewhere. A field
is either measured or null: never a copy of its prediction (`predicted_*` fields hold the formulas).
`schema_version` changes whenever a field's meaning does; `load` refuses a newer schema than it knows.
Layout: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_workbench.parallel.runtime.errors import UserError

SCHEMA_VERSION = 2


@dataclass
class PipelineStats:
    """Measured vs predicted bubble and in-flight micro-batches (recipe `pipeline`)."""

    pp: int
    pp_schedule: str
    pp_microbatches: int
    pp_virtual_stages: int
    pp_layers_per_stage: list[int]
    bubble_fraction_measured: float
    bubble_fraction_measured_median: float
    bubble_fraction_measured_by_step: list[float]
    cpu_stolen_fraction_by_step: list[float]
    bubble_fraction_predicted: float
    bubble_fraction_closed_form: float
    stage_fwd_ms: list[float]
    stage_bwd_ms: list[float]
    peak_inflight_microbatches_measured: int
    peak_inflight_microbatches_by_rank: list[int]
    peak_inflight_microbatches_predicted: int


@dataclass
class CommStats:
    """Bytes handed to the network by all workers together (parallel/primitives/comm.py's ruler)."""

    updates: int
    updates_per_s: float | None
    samples: int
    bytes_communicated: int
    bytes_per_update: float | None
    bytes_per_sample: float | None
    comm_ops: int | None = None
    sync_every: int | None = None      # local-sgd / diloco
    outer_syncs: int | None = None


@dataclass
class TensorParallelStats:
    """Tensor parallelism's own collectives (activations, not gradients) in one step, one rank's payload:
    measured by counting the collectives DTensor issued during one step (parallel/runtime/compat.py), predicted from
    the shapes (parallel/primitives/tensor_parallel.py: predicted_step_bytes)."""

    tp_degree: int
    tp_sequence_parallel: bool
    tp_collectives_per_step_measured: dict[str, int] | None
    tp_bytes_per_step_per_rank_measured: int | None
    tp_bytes_per_step_per_rank_predicted: int
    tp_predicted_formula: str   # names distinct from the core fields: flat() merges the parts in


@dataclass
class ContextParallelStatsPart:
    """Context parallelism's ring attention in one training step (the second; eval not counted): forward
    (q-chunk, kv-chunk) blocks each rank computed, and the bytes one rank passed to isend, measured beside the
    prediction from the shapes (parallel/primitives/context_parallel.py: predicted_bytes)."""

    cp_degree: int
    cp_load_balance: str
    cp_attention_blocks_per_rank: list[int] | None
    cp_ring_bytes_per_step_per_rank_measured: int | None
    cp_ring_bytes_per_step_per_rank_predicted: int


@dataclass
class MoeStats:
    """model.moe: what the routers did over the run (training and evaluation forwards, every rank's tokens
    once), expert parallelism's all-to-all in one training step (mean over ranks) beside the formula, and
    the expert parameters one rank holds beside the shapes' count (parallel/primitives/moe_summary.py)."""

    moe_experts: int
    moe_top_k: int
    ep_degree: int
    moe_tokens_per_expert: list[list[int]]        # per MoE layer: slots routed to each expert
    moe_imbalance_max_over_mean: list[float]      # per MoE layer: the busiest expert's slots / the mean
    moe_dropped: int                              # slots over an expert's capacity (capacity_factor > 0)
    moe_expert_param_bytes_per_rank_measured: int
    moe_expert_param_bytes_per_rank_predicted: int
    ep_all_to_all_bytes_per_step_per_rank_measured: float | None = None
    ep_all_to_all_bytes_per_step_per_rank_predicted: int | None = None


@dataclass
class AsyncStats:
    """Asynchronous recipes (async-ps, hogwild): one record per update, staleness as measured."""

    workers: int
    samples_per_update: float
    tokens_per_s_per_update_median: float | None
    staleness_bound: int | None = None
    staleness_histogram: dict[str, int] | None = None     # clocks ahead of the slowest worker at read time
    version_lag_histogram: dict[str, int] | None = None   # server updates between read and apply
    shared_memory: bool = False                           # hogwild: one parameter copy in shared memory
    ps_shards: int | None = None
    workers_replaced: int = 0
    workers_dropped: int = 0
    worker_deaths: list[dict] = field(default_factory=list)
    acked_clocks: dict[str, int] | None = None
    bytes_pushed: int | None = None
    bytes_pulled: int | None = None
    worker_stats: list[dict] | None = None
    server_state_bytes_by_shard: list[int] | None = None


@dataclass
class RunSummary:
    recipe: str
    world_size: int
    dp: int
    steps: int
    final_loss: float | None
    tokens_per_s: float | None
    n_params: int
    elapsed_s: float
    micro_batch: int
    global_batch: int
    tokens_per_step: int
    skipped_steps: int | None         # None: not known where this summary was written
    device: str
    precision: str
    run_dir: str
    parallel_dims: dict[str, int] | None = None
    accum_steps: int | None = None
    resumed_from_step: int = 0
    rollbacks: int = 0                 # nan_policy = 'rollback': reloads of the last good checkpoint
    target_loss: float | None = None
    time_to_target_s: float | None = None
    final_val_loss: float | None = None   # the last evaluation's held-out loss (eval.every); None: none run
    model_flops_per_token: float | None = None
    achieved_tflops_per_rank: float | None = None
    mfu: float | None = None
    peak_memory_bytes_per_rank: int | None = None
    peak_memory_bytes_by_rank: list[int] | None = None
    model_state_bytes_per_rank: int | None = None            # measured: storages each rank holds
    model_state_bytes_by_rank: list[dict] | None = None
    predicted_model_state_bytes_per_rank: int | None = None  # the recipe's formula
    predicted_formula: str | None = None
    pipeline: PipelineStats | None = None
    comm: CommStats | None = None
    async_sgd: AsyncStats | None = None
    provenance: dict | None = None     # commit, versions, machine, config digest (parallel/runtime/provenance.py)
    tp: TensorParallelStats | None = None
    checkpoint_bytes_written: int = 0     # bytes of the checkpoint files the run's saves wrote, every segment
    checkpoint_blocking_s: float = 0.0    # seconds blocked in saves, async staging and waits too (slowest rank)
    cp: ContextParallelStatsPart | None = None
    compiled: bool = False             # train.compile (parallel/primitives/compilation.py)
    compile_s: float | None = None     # the first step's time less the median of the others': its compile
    activation_checkpointing: str = "none"
    activation_bytes_saved: int | None = None   # kept for backward by one micro-batch's forward, rank 0
    overflow_steps: int = 0            # precision=fp16: steps the loss scaler skipped (also in skipped_steps)
    loss_scale: float | None = None    # precision=fp16: the loss scale after the last step
    qat: dict | None = None            # quant.qat: mode, group_size, layers fake-quantised (parallel/models/qat.py)
    moe: MoeStats | None = None        # model.moe.experts > 0: routing, all-to-all, expert bytes
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def layout(self) -> str:
        """'ddp x2', 'ddp x2 (tp 2, sp)', 'fsdp x4 (dp_shard 2 x tp 2)', 'ddp x4 (cp 2 x tp 2)': the recipe on
        its ranks, and how they split whenever that is more than one data-parallel dimension."""
        used = {k: v for k, v in (self.parallel_dims or {}).items() if v > 1}
        split = " x ".join(f"{k} {v}" for k, v in used.items())
        if self.tp is not None and self.tp.tp_sequence_parallel:
            split += ", sp"
        plain = len(used) <= 1 and not used.keys() & {"pp", "cp", "tp"}
        return f"{self.recipe} x{self.world_size}" + ("" if plain else f" ({split})")

    def flat(self) -> dict[str, Any]:
        """Every field in one dict, the parts present merged in (one row of a report's table)."""
        out = self.to_dict()
        for part in _PARTS:
            out.update(out.pop(part) or {})
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "summary") -> RunSummary:
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(f"{source}: schema_version {version!r}, this version of wb reads "
                            f"{SCHEMA_VERSION} (re-run the training, or use the wb that wrote it)")
        return _build(cls, raw, source)

    def write(self, path: Path) -> None:
        from gpu_workbench.parallel.runtime.rundir import write_json

        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RunSummary:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: not a run summary (a JSON object is expected)")
        return cls.from_dict(raw, str(path))


_PARTS = {"pipeline": PipelineStats, "comm": CommStats, "async_sgd": AsyncStats, "tp": TensorParallelStats,
          "cp": ContextParallelStatsPart, "moe": MoeStats}


def _build(cls: type, raw: dict[str, Any], source: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"{source}: unknown field(s) {', '.join(unknown)}")
    values = {k: (_build(_PARTS[k], v, f"{source}.{k}") if k in _PARTS and v is not None else v)
              for k, v in raw.items()}
    try:
        return cls(**values)
    except TypeError as e:   # a required field is missing
        raise UserError(f"{source}: {e}") from None

