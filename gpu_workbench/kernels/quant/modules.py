"""QuantLinear (an nn.Linear with a quantised weight) and in-place model quantisation."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from gpu_workbench.kernels.quant.format import BITS, QuantizedWeight, _check_mode, quantize, resolve_group_size
from gpu_workbench.kernels.validate import refuse_interpreter_bf16


class QuantLinear(nn.Module):
    """y = quant_matmul(x, W_q) + b. The quantised weight lives in buffers, so state_dict round-trips.

    Inference only: gradients flow to x and bias on the torch backend, never to the quantised weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "w4a16",
                 group_size: int | None = 128, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        _check_mode(mode)
        self.in_features, self.out_features = in_features, out_features
        self.mode = mode
        self.group_size = resolve_group_size(mode, group_size, in_features)
        self.backend = backend
        n, k, groups = out_features, in_features, in_features // self.group_size
        # Empty buffers of the right shapes and dtypes, filled by from_linear or load_state_dict.
        if mode == "w4a16":
            self.register_buffer("qweight", torch.zeros(-(-k // 8), n, dtype=torch.int32, device=device))
            self.register_buffer("scales", torch.ones(groups, n, dtype=torch.float16, device=device))
            self.register_buffer("zeros", torch.zeros(groups, n, dtype=torch.uint8, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(1, n, dtype=torch.float32, device=device))
            self.zeros = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(n, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w4a16", group_size: int | None = 128,
                    backend: str | None = None) -> QuantLinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        refuse_interpreter_bf16(weight, "linear.weight", backend or "auto")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, mode, group_size, backend,
                     device=weight.device, dtype=weight.dtype)
        qw = quantize(weight, mode, group_size)
        module.qweight.copy_(qw.qweight)
        module.scales.copy_(qw.scales)
        if qw.zeros is not None:
            module.zeros.copy_(qw.zeros)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def _apply(self, fn, recurse=True):
        # .half() / .to(torch.bfloat16) convert every float buffer; the scales must keep their dtype (the
        # kernels and dequantize read them as stored) and their exact values, so only their device moves.
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != scales.dtype:
            self.scales = scales.to(self.scales.device)
        return self

    @property
    def bits(self) -> int:
        return BITS[self.mode]

    @property
    def qw(self) -> QuantizedWeight:
        return QuantizedWeight(self.mode, (self.out_features, self.in_features), self.group_size, self.qweight,
                               self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Imported here: kernels.quant_matmul imports this package while it loads, and `kernels.quant_matmul`
        # as an attribute is the function (see kernels/__init__.py), so only a from-import is reliable.
        from gpu_workbench.kernels.quant_matmul import quant_matmul

        y = quant_matmul(x, self.qw, backend=self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size == self.in_features else str(self.group_size)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode}, bits={self.bits}, group_size={group}")


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of every Linear weight in `model`: float weights as stored, QuantLinear as packed + scales."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.qw.nbytes
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def _excluded(name: str, patterns) -> bool:
    # A pattern matches the qualified name ("lm_head", "layers.*.attn.*") or its last component.
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)


def quantize_model(model: nn.Module, mode: str = "w8a16", group_size: int | None = 128, exclude=(),
                   backend: str | None = None) -> nn.Module:
    """Swap every nn.Linear of `model` (except names matching `exclude`) for a QuantLinear, in place.

    Returns the model (a bare nn.Linear comes back as a new QuantLinear). The summary of Linear weight
    bytes before/after is attached as `model.quant_summary`.
    """
    _check_mode(mode)
    if isinstance(exclude, str):
        exclude = (exclude,)
    before = linear_weight_bytes(model)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [(name, m) for name, m in targets if not _excluded(name, exclude)]
    for name, m in chosen:  # validate everything before changing anything
        try:
            resolve_group_size(mode, group_size, m.in_features)
        except ValueError as err:
            raise ValueError(f"cannot quantise layer {name or '<root>'!r} (in_features={m.in_features}): {err}; "
                             "add it to exclude= or use group_size=None") from None
    for name, m in chosen:
        new = QuantLinear.from_linear(m, mode, group_size, backend)
        if not name:
            model = new
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    after = linear_weight_bytes(model)
    model.quant_summary = {
        "mode": mode, "group_size": group_size if mode == "w4a16" else None,
        "quantized": [n for n, _ in chosen], "excluded": [n for n, _ in targets if _excluded(n, exclude)],
        "linear_weight_bytes_before": before, "linear_weight_bytes_after": after,
        "ratio": before / after if after else float("inf"),
    }
    return model
