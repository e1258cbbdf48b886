"""Weight quantisation: formats, dequantisation, QuantLinear and whole-model quantisation.

    qw = kernels.quant.quantize(w, mode="w4a16", group_size=128)   # "w8a16", "w4a16", "w8a8"
    w2 = kernels.quant.dequantize(qw)                              # fp32, exactly what the kernels use
    y  = kernels.quant_matmul(x, qw)                               # == x @ w2.T (w8a8: x quantised per token)
    lin = kernels.quant.QuantLinear.from_linear(linear, mode="w4a16", group_size=128)
    kernels.quant.quantize_model(model, mode="w8a16")              # in place; summary in model.quant_summary
    qat = kernels.quant.QATLinear.from_linear(linear, "w4a16", 32)  # fake-quantised training (qat.py)
"""

# format first: kernels.quant_matmul (imported by modules) needs it.
from gpu_workbench.kernels.quant.format import (
    GROUP_SIZES,
    MODES,
    QuantizedWeight,
    WeightGrid,
    dequantize,
    dequantize_activations,
    pack_int4,
    quantize,
    quantize_activations,
    unpack_int4,
    weight_grid,
)
from gpu_workbench.kernels.quant.modules import QuantLinear, linear_weight_bytes, quantize_model
from gpu_workbench.kernels.quant.qat import QATLinear, fake_quantize_activations, fake_quantize_weight, prepare_qat

__all__ = ["GROUP_SIZES", "MODES", "QATLinear", "QuantLinear", "QuantizedWeight", "WeightGrid", "dequantize",
           "dequantize_activations", "fake_quantize_activations", "fake_quantize_weight", "linear_weight_bytes",
           "pack_int4", "prepare_qat", "quantize", "quantize_activations", "quantize_model", "unpack_int4",
           "weight_grid"]
