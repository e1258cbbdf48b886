"""Helpers of the pipeline recipe: the stage split, the stage modules, and the span recorder.

- `split_layers(costs, n_stages, first, last)`: contiguous blocks per stage minimising the largest
  stage's parameter count, the embedding counted on the first stage and final norm + head on the last.
- `StageModule`: one virtual stage of the GPT. Its parameter names are the GPT's (`tok_emb.weight`,
  `blocks.3.mlp.up.weight`, `head.weight`), so stage state dicts union into the model's.
- `SpanRecorder` / `TimedStage`: each forward / backward / weight-gradient chunk and each wait on a
  send or receive becomes a profiling range (NVTX, host timeline) and a recorded span, from which
  the recipe measures the bubble and the micro-batches in flight.
"""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage

from gpu_workbench.parallel.models import recompute
from gpu_workbench.parallel.models.transformer import GPT
from gpu_workbench.parallel.runtime import compat
from gpu_workbench.parallel.runtime import flight_recorder as flight
from gpu_workbench.profiling import range as prange


def split_layers(costs: list[int], n_stages: int, first: int = 0, last: int = 0) -> list[int]:
    """Blocks per stage (each >= 1), contiguous, minimising the costliest stage (ties: earlier cuts)."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} layers into {n_stages} stages (each stage needs a layer)")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> int:   # stage s holds blocks i..j-1
        return prefix[j] - prefix[i] + (first if s == 0 else 0) + (last if s == n_stages - 1 else 0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]   # best[s][j]: first j blocks in s stages
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for j in range(s, n - (n_stages - s) + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], cost(s - 1, i, j))
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    sizes, j = [], n
    for s in range(n_stages, 0, -1):
        sizes.append(j - cut[s][j])
        j = cut[s][j]
    return sizes[::-1]


def stage_sizes(model: GPT, n_stages: int, explicit: list[int]) -> list[int]:
    if explicit:
        return list(explicit)
    count = lambda mod: sum(p.numel() for p in mod.parameters()) if mod is not None else 0   # noqa: E731
    head = count(model.ln_f) + model.head.weight.numel()   # tied or not
    return split_layers([count(b) for b in model.blocks], n_stages, count(model.tok_emb) + count(model.pos_emb),
                        head)


class StageModule(nn.Module):
    """Blocks `first..first+n-1` of `model`, with the embeddings on stage 0 and norm + head on the last.
    `untie`: give the last stage its own copy of a tied embedding (it lives on another rank)."""

    def __init__(self, model: GPT, first: int, n: int, is_first: bool, is_last: bool, untie: bool):
        super().__init__()
        self.is_first, self.is_last = is_first, is_last
        self.checkpointing = model.cfg.activation_checkpointing
        if is_first:
            self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb   # pos_emb None: llama (rotary)
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(first, first + n)})
        if is_last:
            self.ln_f, self.head = model.ln_f, model.head
            if untie and model.cfg.tie_embeddings:
                self.head = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False)
                self.head.weight = nn.Parameter(model.head.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            tokens, x = x, self.tok_emb(x)
            if self.pos_emb is not None:
                x = x + self.pos_emb(torch.arange(tokens.shape[1], device=x.device))
        for block in self.blocks.values():
            x = recompute.run_block(block, x, None, self.checkpointing, self.training)
        return self.head(self.ln_f(x)) if self.is_last else x


class GPTView(nn.Module):
    """A rank's stages as one module under the GPT's names (tok_emb, blocks.3, head, ...), sharing their
    parameters: what a checkpoint reads and writes, whatever the stage split."""

    def __init__(self, stages: list[StageModule]):
        super().__init__()
        self.blocks = nn.ModuleDict()
        for stage in stages:
            for name in ("tok_emb", "pos_emb", "ln_f", "head"):
                if hasattr(stage, name):
                    setattr(self, name, getattr(stage, name))
            self.blocks.update(stage.blocks)


class SpanRecorder:
    """Spans (kind, micro-batch, stage, start_ns, end_ns, cpu_ns) of the current step; start and end on a
    clock shared by the ranks, cpu_ns the thread's CPU time inside the span (on a CPU device, where the
    compute runs in this thread: wall minus CPU time is time the OS gave to other processes).
    `sync`: a CUDA device is synchronised before a compute span ends, so the span covers its kernels."""

    def __init__(self, offset_ns: int = 0, sync=None):
        self.offset_ns, self.sync = offset_ns, sync
        self.spans: list[tuple[str, int, int, int, int, int]] = []

    def span(self, kind: str, mb: int, stage: int):
        return _Span(self, kind, mb, stage)

    def take(self) -> list[tuple[str, int, int, int, int, int]]:
        spans, self.spans = self.spans, []
        return spans


class _Span:
    __slots__ = ("rec", "kind", "mb", "stage", "t0", "c0", "rng")
    NAMES = {"F": "fwd", "B": "bwd", "W": "bwd_weight", "S": "send", "R": "recv"}

    def __init__(self, rec: SpanRecorder, kind: str, mb: int, stage: int):
        self.rec, self.kind, self.mb, self.stage = rec, kind, mb, stage

    def __enter__(self):
        self.rng = prange(self.NAMES[self.kind], mb=self.mb, stage=self.stage)
        self.rng.__enter__()
        self.t0, self.c0 = time.perf_counter_ns(), time.thread_time_ns()

    def __exit__(self, *exc):
        if self.rec.sync is not None and self.kind in "FBW":
            self.rec.sync()
        t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
        self.rng.__exit__(*exc)
        off = self.rec.offset_ns
        self.rec.spans.append((self.kind, self.mb, self.stage, self.t0 + off, t1 + off, c1 - self.c0))
        return False


class TimedStage(PipelineStage):
    """A PipelineStage whose forward / backward / weight-gradient chunks are recorded spans."""

    def __init__(self, *args, recorder: SpanRecorder, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorder = recorder

    def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
        with self.recorder.span("F", fwd_chunk_id, self.stage_index):
            return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        with self.recorder.span("B", bwd_chunk_id, self.stage_index):
            return super().backward_one_chunk(bwd_chunk_id, loss, full_backward, last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        with self.recorder.span("W", bwd_chunk_id, self.stage_index):
            return super().backward_weight_one_chunk(bwd_chunk_id, last_backward)


_active: list[SpanRecorder] = []   # the recorder of the running pipeline step (one per process)
_kinds: dict[int, str] = {}        # id(work) -> "S" / "R"
_entries: dict[int, list] = {}     # id(work) -> the flight recorder's entries of its batch
_timeout: list[timedelta] = []     # the bound on each p2p wait (instrument_p2p)


def instrument_p2p(timeout_s: float | None = None) -> None:
    """Record the schedules' waits on sends and receives as "send" / "recv" spans (once per process), and bound
    each wait by `timeout_s` (fault.collective_timeout_s: gloo's p2p works do not take the group's timeout).
    These are torch-private helpers: where a torch version lacks them, the waits just go unrecorded."""
    if timeout_s is not None:
        _timeout[:] = [timedelta(seconds=timeout_s)]
    hooks = compat.pipeline_p2p_hooks()
    if hooks is None or getattr(hooks[0], "_wb_instrumented", False):
        return
    schedules, post, wait = hooks

    def batch_p2p(p2p_ops, desc=None):
        entries = [flight.record("recv" if op.op is torch.distributed.irecv else "send", op.group, [op.tensor],
                                 peer=op.peer) for op in p2p_ops]   # the flight recorder's (None when off)
        works = post(p2p_ops, desc=desc) if desc is not None else post(p2p_ops)
        kind = "R" if any(getattr(op, "op", None) is torch.distributed.irecv for op in p2p_ops) else "S"
        for w in works:
            _kinds[id(w)] = kind
            _entries[id(w)] = entries
        return works

    def wait_batch_p2p(works):
        kind = "R" if "R" in [_kinds.pop(id(w), "S") for w in works] else "S"
        entries = [e for w in works for e in _entries.pop(id(w), [])]
        with _active[-1].span(kind, -1, -1) if _active else contextlib.nullcontext():
            out = wait(works) if not _timeout else [w.wait(_timeout[0]) for w in works]   # torch: w.wait() each
        for e in entries:
            flight.completed(e)
        return out

    schedules._batch_p2p, schedules._wait_batch_p2p = batch_p2p, wait_batch_p2p
    schedules._wb_instrumented = True
