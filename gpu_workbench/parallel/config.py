"""RunConfig: typed dataclasses, read from TOML plus `key=value` overrides, validated up front.

    cfg = RunConfig.from_toml("configs/tiny.toml", overrides=["recipe=zero2", "optim.lr=3e-4"])
    dims = parallel.recipes.resolve(cfg, world_size=2)   # + the recipe's checks and the parallel dims

Every mistake is one `UserError` (a ValueError; `UserTypeError` for a wrong type) that names the field.
The config checks only its own fields; what depends on the recipe is the recipe's (parallel/recipes/).
To add a section (e.g. `pp` for the pipeline recipe): write a dataclass with defaults, add it as a
field of RunConfig with `field(default_factory=...)`, and put its checks in `_check_<section>`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gpu_workbench.parallel import models
from gpu_workbench.parallel.models import hf_config
from gpu_workbench.parallel.runtime.errors import UserError, UserTypeError
from gpu_workbench.parallel.runtime.flat_config import flatten_config
from gpu_workbench.parallel.runtime.toml_compat import tomllib

# the world size injected fault ranks are aimed at, where it is larger than the current one (an elastic job)
FAULT_WORLD_ENV = "WB_FAULT_WORLD_SIZE"
# Old values a field still accepts, as they were written (TOML, text or an old config.json), and what they mean now
LEGACY_VALUES = {"model.activation_checkpointing": {"true": "full", "false": "none"}}


@dataclass
class MoeConfig:                 # [model.moe]: routed experts in the llama family's MLPs (parallel/models/moe.py)
    experts: int = 0             # routed experts per MoE block; 0 = a dense MLP everywhere
    top_k: int = 2               # experts each token goes to
    shared_experts: int = 0      # experts every token goes through (one SwiGLU this many experts wide)
    every: int = 1               # every K-th block (blocks K-1, 2K-1, ...) carries experts
    d_ff: int = 0                # each expert's hidden width; 0 = model.d_ff (or the architecture's default)
    score: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk: bool = True       # the chosen scores normalised to sum to 1 (Hugging Face's norm_topk_prob)
    aux_loss_coef: float = 0.01  # load-balancing loss weight (Switch Transformer); 0 = off
    z_loss_coef: float = 0.0     # router z-loss weight (ST-MoE); 0 = off
    capacity_factor: float = 0.0   # > 0: an expert takes at most factor x slots / experts; 0 = dropless


@dataclass
class ModelConfig:
    # gpt2: LayerNorm, learned positions, GELU MLP, biases. llama: RMSNorm, rotary positions, SwiGLU MLP,
    # grouped-query attention, no biases (docs/ARCHITECTURE.md, The model).
    arch: str = "gpt2"           # a name in the model registry (parallel/models/)
    vocab_size: int = 64
    seq_len: int = 32            # tokens per sample (the model's context length)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0          # key/value heads (GQA, MQA at 1); 0 means n_heads
    d_ff: int = 0                # 0: 4 * d_model (gpt2), 8/3 * d_model rounded up to a multiple of 8 (llama)
    rope_theta: float = 10000.0  # llama: the rotary embedding's base
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # Set by a Hugging Face checkpoint (checkpoint.load_from=hf:PATH fills the section from its config.json):
    head_dim: int = 0            # each head's width; 0 means d_model / n_heads (qwen3's may differ)
    qkv_bias: bool = False       # biases on q, k, v (gpt2's c_attn; qwen2 has them whatever this says)
    gelu_approximate: Literal["none", "tanh"] = "none"   # gpt2's MLP: "tanh" is GPT-2's gelu_new
    max_positions: int = 0       # gpt2: rows of the position table (>= seq_len); 0 means seq_len
    rope_scaling_factor: float = 0.0   # llama3 rope scaling (Llama 3.1+); 0 = off
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    # "full": each block recomputed in backward; "selective": only the cheap ops recomputed, attention and every
    # other matmul's output kept (parallel/models/recompute.py). The old booleans are accepted: true = "full",
    # false = "none".
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    fused_head_loss: bool = False  # head + cross-entropy through kernels.linear_cross_entropy (no logits)
    fused_kernels: bool = False    # llama: RMSNorm, rotary embedding, SwiGLU through kernels.rms_norm/rope/swiglu
    moe: MoeConfig = field(default_factory=MoeConfig)


@dataclass
class DataConfig:
    kind: Literal["synthetic", "bytes", "tokens"] = "synthetic"
    path: str = ""               # bytes: the file `wb data prepare` wrote; tokens: its DATA_DIR (--tokenizer)
    mix: list[str] = field(default_factory=list)   # tokens: several DATA_DIRs drawn by weight, "DIR:WEIGHT" each
    workers: int = 0             # tokens: background threads that prefetch the next steps' batches; 0 = none
    document_mask: bool = False  # tokens: attention never crosses a document boundary in a packed window
    noise: float = 0.1           # synthetic: chance that a token ignores the hidden rule
    val_fraction: float = 0.1    # bytes: the file's tail held out for evaluation, never sampled for training


@dataclass
class EvalConfig:                # [eval]: the held-out loss (parallel/data.py: the validation split)
    every: int = 0               # evaluate after every this many steps (and after the last); 0 = off
    batches: int = 2             # held-out global batches per evaluation


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1    # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0       # global-norm clipping; 0 turns it off
    # parameter-name prefixes kept out of the optimizer ("tok_emb", "blocks.0"): requires_grad False
    frozen: list[str] = field(default_factory=list)


@dataclass
class ZeroConfig:
    stage: int = -1              # -1: taken from the recipe (zero1/zero2/zero3)
    offload_optimizer: Literal["none", "cpu"] = "none"
    config_file: str = ""        # a user's DeepSpeed JSON, used as-is (`wb train --deepspeed F`)


@dataclass
class FsdpConfig:
    reshard_after_forward: bool = True   # True behaves like ZeRO-3, False like ZeRO-2


@dataclass
class CheckpointConfig:
    every: int = 0               # save every N optimizer steps; 0 = never
    resume: bool = True          # resume from the newest complete checkpoint in <run_dir>/checkpoints
    keep: int = 2                # complete checkpoints kept (older ones deleted after a newer one lands)
    keep_every: int = 0          # also keep every checkpoint whose step is a multiple of this; 0 = off
    save_final: bool = False     # write <run_dir>/final_model.pt (full, unsharded state dict)
    load_from: str = ""          # start a new run from another run's state: its run directory (newest good
                                 # checkpoint) or one step_* folder; a checkpoint of this run_dir wins (resume)
    load_model_only: bool = False   # with load_from: the weights alone (fresh optimizer, step 0)
    incremental: bool = False    # write only the tensors that changed since the last checkpoint (per-tensor hash)
    full_every: int = 4          # with incremental: every full_every-th save is a full base (1 = all full)
    async_save: bool = False     # stage to host memory, write in the background; published when written


@dataclass
class FaultConfig:
    kill_rank: int = -1          # this rank exits abruptly (os._exit) at step `at_step`; -1 = never
    kill_host: bool = False      # with kill_rank under torchrun: its node's agent is SIGKILLed first, a lost host
    at_step: int = 0
    hang_rank: int = -1          # this rank sleeps forever at step `at_step` (a stuck worker); -1 = never
    collective_timeout_s: float = 1800.0   # a collective in the training loop fails after this long
    nan_at_step: int = -1        # rank 0's gradient becomes NaN at this step, once per run (tests the nan_policy)
    overflow_at_step: int = -1   # precision=fp16: this step's gradient holds an inf, once per run (tests loss scaling)
    checkpoint_write_delay_s: float = 0.0   # checkpoint.async_save: each background write waits this long first
    flight_records: int = 1000   # last collectives kept per rank (parallel/runtime/flight_recorder.py); 0 = off
    flight_write_through: bool = False   # also append each record to flight/rank<R>.jsonl at once (a rank that
                                         # dies inside a C++ library, e.g. gloo's abort on a desync, leaves it)
    skip_collective_at_step: int = -1   # rank skip_collective_rank skips its first blocking collective of this
    skip_collective_rank: int = -1      # step (a desync on purpose, for `wb debug hang`); -1 = never


@dataclass
class TrainConfig:               # [train]: how the step runs
    compile: bool = False        # each block torch.compile(fullgraph=True)d (parallel/primitives/compilation.py)


@dataclass
class Float8Config:              # [float8]: precision = "fp8"
    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"   # torchao's scaling: per tensor, or per row


@dataclass
class ProfilingConfig:
    timeline: bool = False


@dataclass
class PsConfig:                  # async-ps: parameter server on Ray actors
    shards: int = 1              # server actors, each owning a slice of the parameters and their optimizer
    staleness: int = 0           # SSP bound: a worker runs at most this many clocks ahead of the slowest; 0 = sync
    ray_address: str = ""        # "" = an embedded local Ray; else an existing cluster ("auto", "ray://host:10001")
    on_worker_death: Literal["replace", "drop"] = "replace"


@dataclass
class LocalSgdConfig:            # local-sgd / diloco
    sync_every: int = 8          # H: local steps between parameter averages
    outer_lr: float = 0.7        # diloco: outer Nesterov SGD on the averaged pseudo-gradient
    outer_momentum: float = 0.9


@dataclass
class StragglerConfig:           # worker `rank` sleeps (factor - 1) x its own compute time each step
    rank: int = -1               # -1 = no straggler
    factor: float = 1.0


@dataclass
class PipelineConfig:            # recipe `pipeline`
    schedule: Literal["gpipe", "1f1b", "interleaved-1f1b", "zero-bubble"] = "1f1b"
    microbatches: int = 0        # per step and replica; 0 = global_batch / (micro_batch x dp), else it sets micro_batch
    degree: int = 0              # stages over ranks (pp); 0 = every process (dp = 1); dp = world size / pp
    virtual_stages: int = 1      # stages per rank: 1 for gpipe/1f1b, >= 2 for interleaved-1f1b
    layers_per_stage: list[int] = field(default_factory=list)   # blocks per stage; [] = balanced by parameters
    gantt: bool = True           # draw <run_dir>/gantt.png (measured beside predicted schedule) at the end


@dataclass
class TensorParallelConfig:      # [tp]: Megatron-style tensor parallelism; degree 1 = off
    degree: int = 1
    sequence_parallel: bool = False


@dataclass
class ContextParallelConfig:     # [cp]: the sequence split over ranks (ring attention); degree 1 = off
    degree: int = 1
    load_balance: Literal["headtail", "none"] = "headtail"


@dataclass
class ExpertParallelConfig:      # [ep]: experts split over ranks borrowed from data parallelism; degree 1 = off
    degree: int = 1


@dataclass
class QuantConfig:               # [quant]: quantisation-aware training (parallel/models/qat.py)
    qat: Literal["none", "w8a16", "w4a16", "w8a8"] = "none"   # fake-quantise every Linear of the blocks
    group_size: int = 32         # w4a16: 32, 64 or 128 along in_features, or -1 per output channel


@dataclass
class RunConfig:
    name: str = ""
    recipe: str = "single"
    seed: int = 0
    steps: int = 100
    global_batch: int = 16       # samples per optimizer step, over all data-parallel ranks
    micro_batch: int = 4         # samples per forward/backward on one rank
    # fp16: autocast with dynamic loss scaling over fp32 weights (parallel/recipes/loss_scale.py); fp8: the blocks'
    # linears in float8 through torchao, the rest bf16 autocast (parallel/primitives/float8.py, [float8])
    precision: Literal["fp32", "bf16", "fp16", "fp8"] = "fp32"
    # a step whose gradient is NaN/Inf: skip it (at most nan_skip_limit in a row, then stop), stop, or
    # roll back to the last good checkpoint with the learning rate x nan_rollback_lr_factor (at most 3 times)
    nan_policy: Literal["skip", "stop", "rollback"] = "skip"
    nan_skip_limit: int = 5
    nan_rollback_lr_factor: float = 0.5
    target_loss: float = 0.0     # time_to_target_s measures when the loss first gets here; 0 = off
    run_dir: str = ""            # default runs/<name or recipe-timestamp>
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 1
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    float8: Float8Config = field(default_factory=Float8Config)
    ps: PsConfig = field(default_factory=PsConfig)
    local_sgd: LocalSgdConfig = field(default_factory=LocalSgdConfig)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    pp: PipelineConfig = field(default_factory=PipelineConfig)
    tp: TensorParallelConfig = field(default_factory=TensorParallelConfig)
    cp: ContextParallelConfig = field(default_factory=ContextParallelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    ep: ExpertParallelConfig = field(default_factory=ExpertParallelConfig)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
        raw: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            if p.is_dir():
                raise UserError(f"config file {p} is a directory, not a TOML file (e.g. configs/tiny.toml)")
            if not p.is_file():
                raise UserError(f"config file not found: {p}")
            try:
                raw = tomllib.loads(p.read_text())
            except tomllib.TOMLDecodeError as e:
                raise UserError(f"config file {p} is not valid TOML: {e}") from None
            except UnicodeDecodeError:
                raise UserError(f"config file {p} is not a text (TOML) file") from None
        cfg = cls.from_dict(raw)
        for item in overrides or []:
            cfg.set(*_split_override(item))
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        cfg = cls()
        for key, value in flatten_config(raw).items():
            cfg.set(key, value, from_text=False)
        return cfg

    def set(self, key: str, value: Any, from_text: bool = True) -> None:
        """Set `section.key` (or a top-level key); `value` is parsed from text when from_text."""
        target, leaf = self._resolve(key)
        hint = _field_types(type(target))[leaf]
        if from_text:
            value = _parse_text(value, hint, key)
        value = _legacy(key, value)
        setattr(target, leaf, _coerce(value, hint, key))
        self.__dict__.setdefault("_explicit", set()).add(key)   # hf: refuses a model.* it disagrees with

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _resolve(self, key: str) -> tuple[Any, str]:
        parts = key.split(".")
        target: Any = self
        for i, part in enumerate(parts):
            types_ = _field_types(type(target))
            if part not in types_:
                prefix = ".".join(parts[:i])
                known = [f"{prefix}.{k}" if prefix else k for k in types_]
                raise UserError(f"unknown config key '{key}'{_suggest(key, known + _all_keys())}")
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(getattr(target, part)):
                    raise UserError(f"config key '{key}' is a section; set one of its keys, e.g. '{key}."
                                     f"{next(iter(_field_types(type(getattr(target, part)))))}=...'")
                return target, part
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise UserError(f"config key '{'.'.join(parts[:i + 1])}' is not a section")
        raise AssertionError("unreachable")

    # ---- validation ----------------------------------------------------------------------
    def accum_steps(self, dp: int) -> int:
        return self.global_batch // (self.micro_batch * dp)

    def validate(self) -> RunConfig:
        """The checks of this config's own fields; `parallel.recipes.resolve` adds the recipe's and the
        world size's."""
        _positive(self, "steps", "global_batch", "micro_batch", "log_every")
        if hf_config.hf_path(self.checkpoint.load_from) is not None:   # [model] from its config.json
            hf_config.apply(self, self.__dict__.get("_explicit", set()))
        self._check_model()
        self._check_data()
        self._check_optim()
        if not -1 <= self.zero.stage <= 3:
            raise UserError(f"zero.stage must be 0, 1, 2 or 3 (or -1 to follow the recipe), got {self.zero.stage}")
        if self.zero.config_file and not Path(self.zero.config_file).is_file():
            raise UserError(f"zero.config_file (--deepspeed): file not found: {self.zero.config_file}")
        self._check_checkpoint()
        for key in ("kill_rank", "hang_rank", "skip_collective_rank", "skip_collective_at_step", "overflow_at_step"):
            if getattr(self.fault, key) < -1:
                raise UserError(f"fault.{key} must be >= 0 (or -1 for none), got {getattr(self.fault, key)}")
        if self.fault.flight_records < 0:
            raise UserError(f"fault.flight_records must be >= 0 (0 = off), got {self.fault.flight_records}")
        if (self.fault.skip_collective_at_step >= 0) != (self.fault.skip_collective_rank >= 0):
            raise UserError("fault.skip_collective_at_step and fault.skip_collective_rank go together (both >= 0)")
        if self.fault.collective_timeout_s <= 0:
            raise UserError(f"fault.collective_timeout_s must be > 0, got {self.fault.collective_timeout_s}")
        if self.target_loss < 0:
            raise UserError(f"target_loss must be >= 0, got {self.target_loss}")
        if self.nan_skip_limit < 1 or not 0 < self.nan_rollback_lr_factor <= 1:
            raise UserError(f"nan_skip_limit must be >= 1 and nan_rollback_lr_factor in (0, 1], got "
                            f"{self.nan_skip_limit} and {self.nan_rollback_lr_factor}")
        if self.nan_policy == "rollback" and not self.checkpoint.every:
            raise UserError("nan_policy = 'rollback' needs checkpoints to roll back to: set checkpoint.every > 0")
        self._check_async()
        self._check_pp()
        self._check_tp_cp()
        self._check_quant()
        if not isinstance(self.optim.frozen, list) or not all(isinstance(n, str) and n for n in self.optim.frozen):
            raise UserTypeError(f"optim.frozen must be a list of parameter-name prefixes (e.g. [\"tok_emb\", "
                                f"\"blocks.0\"]), got {self.optim.frozen!r}")
        return self

    def check_layout(self, world_size: int, dp: int) -> None:
        """The checks that need the world size and the data-parallel degree the recipe gives it."""
        if self.global_batch % (self.micro_batch * dp):
            raise UserError(f"global_batch ({self.global_batch}) must be divisible by micro_batch "
                            f"({self.micro_batch}) x data-parallel degree ({dp})")
        # a torchrun restart of an elastic job may have fewer ranks than the one its faults were aimed at;
        # an elastic Ray Train job aims them at its MAX workers (FAULT_WORLD_ENV, set by cluster/ray_train.py)
        shrunk = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        aimed_at = max(world_size, int(os.environ.get(FAULT_WORLD_ENV, "0")))
        for key, rank in (("fault.kill_rank", self.fault.kill_rank), ("fault.hang_rank", self.fault.hang_rank),
                          ("straggler.rank", self.straggler.rank),
                          ("fault.skip_collective_rank", self.fault.skip_collective_rank)):
            if rank >= aimed_at and not shrunk:
                raise UserError(f"{key} ({rank}) must be < world size ({aimed_at})")

    def _check_checkpoint(self) -> None:
        c = self.checkpoint
        if c.every < 0 or c.keep < 1:
            raise UserError(f"checkpoint.every must be >= 0 and checkpoint.keep >= 1, got every={c.every} "
                            f"keep={c.keep}")
        if c.keep_every < 0:
            raise UserError(f"checkpoint.keep_every must be >= 0, got {c.keep_every}")
        if c.full_every < 1:
            raise UserError(f"checkpoint.full_every must be >= 1, got {c.full_every}")
        if self.fault.checkpoint_write_delay_s < 0:
            raise UserError(f"fault.checkpoint_write_delay_s must be >= 0, got {self.fault.checkpoint_write_delay_s}")
        if c.load_model_only and not c.load_from:
            raise UserError("checkpoint.load_model_only=true needs checkpoint.load_from=<run dir or step_* folder>")
        if c.load_from and hf_config.hf_path(c.load_from) is None and not Path(c.load_from).is_dir():
            raise UserError(f"checkpoint.load_from: no such run directory or checkpoint folder: {c.load_from}")

    def _check_model(self) -> None:
        _positive(self.model, "vocab_size", "seq_len", "d_model", "n_layers", "n_heads", prefix="model.")
        m = self.model
        if m.d_ff < 0:
            raise UserError(f"model.d_ff must be >= 0 (0 means the architecture's default), got {m.d_ff}")
        if m.head_dim < 0 or m.max_positions < 0 or m.rope_scaling_factor < 0:
            raise UserError(f"model.head_dim, model.max_positions and model.rope_scaling_factor must be >= 0 (0: "
                            f"off), got {m.head_dim}, {m.max_positions} and {m.rope_scaling_factor}")
        if m.max_positions and m.max_positions < m.seq_len:
            raise UserError(f"model.seq_len ({m.seq_len}) must be <= model.max_positions ({m.max_positions}), the "
                            f"position table's rows")
        if m.d_model % m.n_heads and not m.head_dim:
            raise UserError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
        if m.n_kv_heads < 0 or m.n_heads % (m.n_kv_heads or m.n_heads):
            raise UserError(f"model.n_kv_heads ({m.n_kv_heads}) must divide model.n_heads ({m.n_heads}) "
                            f"(0 means n_heads)")
        models.get(m.arch).check(m)   # the architecture's own checks (parallel/models/<arch>.py)
        _check_moe(m)
        if not (m.rope_theta > 0 and m.norm_eps > 0):
            raise UserError(f"model.rope_theta ({m.rope_theta}) and model.norm_eps ({m.norm_eps}) must be > 0")

    def _check_data(self) -> None:
        if self.data.kind == "tokens" and not (self.data.path or self.data.mix):
            raise UserError("data.kind = 'tokens' needs data.path = DATA_DIR or data.mix = ['DIR:WEIGHT', ...] "
                            "(make one with `wb data prepare SRC... --tokenizer T --out DATA_DIR`)")
        if self.data.workers < 0:
            raise UserError(f"data.workers must be >= 0, got {self.data.workers}")
        if self.data.document_mask and self.data.kind != "tokens":
            raise UserError(f"data.document_mask needs data.kind = 'tokens' (documents), got '{self.data.kind}'")
        if self.data.kind == "bytes":
            if not self.data.path:
                raise UserError("data.path is required when data.kind = 'bytes' (make one with `wb data prepare`)")
            if not Path(self.data.path).is_file():
                raise UserError(f"data.path: file not found: {self.data.path}")
            if self.model.vocab_size < 256:
                raise UserError(f"model.vocab_size must be >= 256 for byte-level data, got {self.model.vocab_size}")
        if not 0.0 <= self.data.noise < 1.0:
            raise UserError(f"data.noise must be in [0, 1), got {self.data.noise}")
        if not 0.0 < self.data.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {self.data.val_fraction}")
        if self.eval.every < 0 or self.eval.batches < 1:
            raise UserError(f"eval.every must be >= 0 and eval.batches >= 1, got every={self.eval.every} "
                            f"batches={self.eval.batches}")

    def _check_optim(self) -> None:
        o = self.optim
        if o.lr <= 0:
            raise UserError(f"optim.lr must be > 0, got {o.lr}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(o, name) < 1.0:
                raise UserError(f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
        for name in ("weight_decay", "grad_clip", "warmup_steps", "min_lr_ratio"):
            if getattr(o, name) < 0:
                raise UserError(f"optim.{name} must be >= 0, got {getattr(o, name)}")
        if o.min_lr_ratio > 1:
            raise UserError(f"optim.min_lr_ratio must be <= 1, got {o.min_lr_ratio}")
        if o.eps <= 0:
            raise UserError(f"optim.eps must be > 0, got {o.eps}")

    def _check_async(self) -> None:
        """ps, local_sgd and straggler sections (async vs sync SGD)."""
        if self.ps.shards < 1:
            raise UserError(f"ps.shards must be >= 1, got {self.ps.shards}")
        if self.ps.staleness < 0:
            raise UserError(f"ps.staleness must be >= 0 (0 = synchronous), got {self.ps.staleness}")
        ls = self.local_sgd
        if ls.sync_every < 1:
            raise UserError(f"local_sgd.sync_every must be >= 1, got {ls.sync_every}")
        if ls.outer_lr <= 0 or not 0.0 <= ls.outer_momentum < 1.0:
            raise UserError(f"local_sgd.outer_lr must be > 0 and local_sgd.outer_momentum in [0, 1), got "
                            f"{ls.outer_lr} and {ls.outer_momentum}")
        if self.straggler.rank < -1:
            raise UserError(f"straggler.rank must be >= 0 (or -1 for none), got {self.straggler.rank}")
        if self.straggler.factor < 1.0:
            raise UserError(f"straggler.factor must be >= 1 (1 = no slowdown), got {self.straggler.factor}")

    def _check_pp(self) -> None:
        pp, v = self.pp, self.pp.virtual_stages
        if pp.microbatches < 0 or pp.degree < 0 or v < 1:
            raise UserError(f"pp.microbatches and pp.degree must be >= 0 and pp.virtual_stages >= 1, got "
                            f"{pp.microbatches}, {pp.degree} and {v}")
        if pp.schedule in ("gpipe", "1f1b") and v != 1:
            raise UserError(f"pp.virtual_stages must be 1 for pp.schedule={pp.schedule} (interleaved-1f1b or "
                            f"zero-bubble run several stages per rank), got {v}")
        if pp.schedule == "interleaved-1f1b" and v < 2:
            raise UserError(f"pp.virtual_stages must be >= 2 for pp.schedule=interleaved-1f1b, got {v}")
        if not isinstance(pp.layers_per_stage, list) or not all(
                isinstance(n, int) and not isinstance(n, bool) for n in pp.layers_per_stage):
            raise UserTypeError(f"pp.layers_per_stage must be a list of ints (e.g. [2, 3]), got "
                                f"{pp.layers_per_stage!r}")
        if any(n < 1 for n in pp.layers_per_stage) or (pp.layers_per_stage and sum(pp.layers_per_stage)
                                                        != self.model.n_layers):
            raise UserError(f"pp.layers_per_stage {pp.layers_per_stage} must be >= 1 each and sum to "
                            f"model.n_layers ({self.model.n_layers})")

    def _check_quant(self) -> None:
        # the same sizes kernels.quant.quantize takes (kernels/quant/format.py GROUP_SIZES), without importing torch
        if self.quant.group_size not in (32, 64, 128, -1):
            raise UserError(f"quant.group_size must be 32, 64 or 128 (or -1 for per output channel), got "
                            f"{self.quant.group_size}")

    def _check_tp_cp(self) -> None:
        for key, degree in (("tp.degree", self.tp.degree), ("cp.degree", self.cp.degree),
                            ("ep.degree", self.ep.degree)):
            if degree < 1:
                raise UserError(f"{key} must be >= 1 (1 = off), got {degree}")
        c, chunks = self.cp.degree, 2 * self.cp.degree if self.cp.load_balance == "headtail" else self.cp.degree
        if c > 1 and self.model.seq_len % chunks:   # ring attention cuts the sequence into equal chunks
            raise UserError(f"model.seq_len ({self.model.seq_len}) must be divisible by {chunks} with cp.degree = {c} "
                            f"and cp.load_balance = {self.cp.load_balance} (parallel/primitives/context_parallel.py)")
        if self.tp.sequence_parallel and self.tp.degree == 1:
            raise UserError("tp.sequence_parallel = true needs tp.degree > 1")


# ---- helpers -------------------------------------------------------------------------------
@functools.cache   # get_type_hints evaluates every annotation string each call (~2 ms a class): wb plan sets
def _field_types(cls: type) -> dict[str, Any]:   # thousands of keys
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in _field_types(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if not close and "." in word:   # 'lr' under the wrong section: match on the leaf name
        leaf = word.rsplit(".", 1)[1]
        close = [c for c in choices if c.rsplit(".", 1)[-1] == leaf][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{item}' must look like key=value (e.g. steps=20 or optim.lr=1e-3)")
    return key.strip(), value.strip()


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _parse_text(text: str, hint: Any, key: str) -> Any:
    """Parse an override's text by the field's type (so steps=20 is an int, name=abc a string)."""
    if hint is str or typing.get_origin(hint) is Literal:
        return text
    if hint is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise UserTypeError(f"{key} must be a bool (true/false), got '{text}'")
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise UserTypeError(f"{key} must be {_type_name(hint)}, got '{text}'") from None


def _legacy(key: str, value: Any) -> Any:
    """An old spelling of `key`'s value (LEGACY_VALUES) in today's words, or the value itself."""
    if key in LEGACY_VALUES and isinstance(value, bool | str):
        return LEGACY_VALUES[key].get(str(value).lower(), value)
    return value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            raise UserError(f"{key} must be one of {_type_name(hint)}, got {value!r}"
                             f"{_suggest(str(value), [str(a) for a in typing.get_args(hint)])}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key} must be a finite number, got {value}")
    # A parameterized generic (list[str]) is no class for isinstance; Python 3.10 still says it is a type.
    plain_class = isinstance(hint, type) and typing.get_origin(hint) is None
    ok = isinstance(value, hint) if plain_class else True
    if hint in (int, float) and isinstance(value, bool):   # TOML true is not a number
        ok = False
    if not ok:
        raise UserTypeError(f"{key} must be {_type_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def _check_moe(m: ModelConfig) -> None:
    e = m.moe
    if e.experts < 0 or e.shared_experts < 0 or e.d_ff < 0:
        raise UserError(f"model.moe.experts, model.moe.shared_experts and model.moe.d_ff must be >= 0, got "
                        f"{e.experts}, {e.shared_experts} and {e.d_ff}")
    if not e.experts:
        return
    if models.get(m.arch).mlp != "swiglu":
        raise UserError(f"model.moe.experts needs an architecture with a SwiGLU MLP (llama, qwen2, qwen3), got "
                        f"model.arch = '{m.arch}'")
    if not 1 <= e.top_k <= e.experts:
        raise UserError(f"model.moe.top_k ({e.top_k}) must be between 1 and model.moe.experts ({e.experts})")
    if e.every < 1 or e.every > m.n_layers:
        raise UserError(f"model.moe.every ({e.every}) must be between 1 and model.n_layers ({m.n_layers})")
    if e.capacity_factor < 0:
        raise UserError(f"model.moe.capacity_factor must be > 0 (or 0 for dropless), got {e.capacity_factor}")
    if e.aux_loss_coef < 0 or e.z_loss_coef < 0:
        raise UserError(f"model.moe.aux_loss_coef and model.moe.z_loss_coef must be >= 0, got "
                        f"{e.aux_loss_coef} and {e.z_loss_coef}")


def _positive(obj: Any, *names: str, prefix: str = "") -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise UserError(f"{prefix}{name} must be > 0, got {getattr(obj, name)}")
