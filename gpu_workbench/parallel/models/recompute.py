"""model.activation_checkpointing: how a block's forward keeps what its backward needs, and the bytes it keeps.

    x = run_block(block, x, positions, mode, training)   # "none" | "full" | "selective"
    with SavedBytes(model) as saved:                    # one forward: the activation bytes kept for backward
        loss = model(x, y)
    saved.bytes

"full" keeps each block's input and recomputes the whole block in backward. "selective" is an op-level policy
(torch.utils.checkpoint.create_selective_checkpoint_contexts), torchtitan's: attention's outputs, the
tensor-parallel collectives' outputs and every other matmul's output (the 1st, 3rd, ...) are kept, everything
else (norms, rotary, activations, every second matmul) is recomputed. Both give the uncheckpointed gradients.

SavedBytes counts with torch.autograd.graph.saved_tensors_hooks: every tensor autograd saves (one count per
storage; parameters and their views are not activations). A checkpointed block's tensors never reach those
hooks (its own hooks take them), so what a checkpoint keeps is added where it is kept: the block's input
(run_block) and, under "selective", each kept op's outputs (sized on the meta device from the op's inputs).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
MATMULS = {_aten.mm.default, _aten.addmm.default}
# Kept whenever they run: attention (SDPA's CPU and CUDA kernels, and the project's Triton kernel's custom
# op) and the collectives tensor parallelism issues, so a recompute neither redoes the costliest op nor
# communicates again.
_KEPT_NAMES = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
KEPT = {getattr(_aten, n).default for n in _KEPT_NAMES if hasattr(_aten, n)}
KEPT |= {getattr(torch.ops._c10d_functional, n).default for n in ("all_reduce", "reduce_scatter_tensor",
                                                                   "all_gather_into_tensor")}
MODES = ("none", "full", "selective")

_counter: SavedBytes | None = None   # the SavedBytes being counted, if any


def run_block(block, x: torch.Tensor, positions, mode: str, training: bool, cache=None) -> torch.Tensor:
    """`block(x, positions)` under activation checkpointing `mode` (only while training with a graph)."""
    if mode == "none" or not training or not torch.is_grad_enabled():
        return block(x, positions, cache=cache)
    if _counter is not None:
        _counter.add(x)   # the checkpoint keeps the block's input for its recompute
    if mode == "full":
        return checkpoint(block, x, positions, use_reentrant=False)
    return checkpoint(block, x, positions, use_reentrant=False, context_fn=selective_contexts)


def selective_contexts():
    """The (forward, recompute) contexts of one checkpointed call: a fresh matmul count each."""
    return create_selective_checkpoint_contexts(_policy())


def _policy():
    counts = {False: 0, True: 0}   # matmuls seen in the forward / in the recompute: both count alike

    def policy(ctx, op, *args, **kwargs):
        keep = op in KEPT
        if op in MATMULS:
            counts[ctx.is_recompute] += 1
            keep = counts[ctx.is_recompute] % 2 == 1
        if keep and _counter is not None and not ctx.is_recompute:
            _counter.add_outputs(op, args, kwargs)
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


class SavedBytes:
    """Bytes of the activations one forward keeps for backward (see the module docstring); one at a time."""

    def __init__(self, on_done=None):
        self.bytes, self.on_done = 0, on_done   # on_done(bytes) when the count ends
        self._seen: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def __enter__(self) -> SavedBytes:
        global _counter
        if _counter is not None:
            raise RuntimeError("SavedBytes: already counting")
        _counter = self
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        global _counter
        self._hooks.__exit__(*exc)
        _counter = None
        if self.on_done is not None and exc[0] is None:
            self.on_done(self.bytes)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    def add(self, t: torch.Tensor) -> None:
        """Count `t`'s storage once, unless it is a parameter's (or a view of one)."""
        base = t._base if t._base is not None else t
        if (base.is_leaf and base.requires_grad) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()

    def add_outputs(self, op, args, kwargs) -> None:
        """A kept op's output bytes, from its inputs' shapes (the op run on the meta device)."""
        meta = lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a   # noqa: E731 (the kept ops take flat arguments)
        out = op(*map(meta, args), **{k: meta(v) for k, v in kwargs.items()})
        out = out if isinstance(out, tuple | list) else (out,)
        self.bytes += sum(o.numel() * o.element_size() for o in out if isinstance(o, torch.Tensor))
