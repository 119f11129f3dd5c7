"""LSQ quantization of timm and other torch models: config -> quantize_model -> calibrate -> save_quantized.

Each step is a function you can call alone (torchao-style); ``dequantize_model`` undoes the swap.
Knows nothing of data, coreset selection or transformers.
"""

from .integer_graph import IntegerGraphPlan, plan_integer_graph
from .lsq import LSQQuantizer, check_bits, lsq_fake_quant, quant_range
from .model import (
    QuantConfig,
    calibrate_quantizers,
    dequantize_model,
    find_first_last,
    quant_modules,
    quantize_layers,
    quantize_model,
    quantizers_initialized,
)
from .modules import LayerQuantConfig, QuantConv2d, QuantLinear, QuantModule, is_quantizable
from .onnx_export import export_onnx
from .onnx_runtime import (
    compare_with_float,
    cpu_has_vnni,
    integer_kernel_counts,
    needs_exact_int8_option,
    onnx_accuracy,
    onnx_session,
    onnx_speedup,
)
from .output_quant import OutputQuantConfig, output_quantizers, quantize_outputs, remove_output_quantizers
from .packed import (
    WEIGHTS_NAME,
    layer_configs_from_table,
    pack_codes,
    prepare_packed_weights,
    unpack_codes,
    unpack_weights,
)
from .serialization import load_quantized, save_quantized

__all__ = [
    "WEIGHTS_NAME",
    "IntegerGraphPlan",
    "LSQQuantizer",
    "LayerQuantConfig",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantModule",
    "calibrate_quantizers",
    "check_bits",
    "compare_with_float",
    "cpu_has_vnni",
    "dequantize_model",
    "export_onnx",
    "find_first_last",
    "integer_kernel_counts",
    "is_quantizable",
    "layer_configs_from_table",
    "load_quantized",
    "lsq_fake_quant",
    "needs_exact_int8_option",
    "onnx_accuracy",
    "onnx_session",
    "onnx_speedup",
    "output_quantizers",
    "OutputQuantConfig",
    "pack_codes",
    "plan_integer_graph",
    "prepare_packed_weights",
    "quant_modules",
    "quant_range",
    "quantize_layers",
    "quantize_model",
    "quantize_outputs",
    "quantizers_initialized",
    "remove_output_quantizers",
    "save_quantized",
    "unpack_codes",
    "unpack_weights",
]
