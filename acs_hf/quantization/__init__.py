"""LSQ quantization of timm and other torch models: config -> quantize_model -> calibrate -> save_quantized.

Each step is a function you can call alone (torchao-style); ``dequantize_model`` undoes the swap.
Knows nothing of data, coreset selection or transformers.
"""

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
    "LSQQuantizer",
    "LayerQuantConfig",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantModule",
    "calibrate_quantizers",
    "check_bits",
    "dequantize_model",
    "export_onnx",
    "find_first_last",
    "is_quantizable",
    "layer_configs_from_table",
    "load_quantized",
    "lsq_fake_quant",
    "pack_codes",
    "prepare_packed_weights",
    "quant_modules",
    "quant_range",
    "quantize_layers",
    "quantize_model",
    "quantizers_initialized",
    "save_quantized",
    "unpack_codes",
    "unpack_weights",
]
