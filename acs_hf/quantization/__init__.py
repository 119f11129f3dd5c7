"""LSQ quantization of timm models: config -> quantize_model -> calibrate_quantizers -> save_quantized.

Knows nothing of data, coreset selection or transformers.
"""

from .checkpoint import load_quantized, pack_codes, save_quantized, unpack_codes
from .lsq import LSQQuantizer, lsq_fake_quant, quant_range
from .model import (
    QuantConfig,
    calibrate_quantizers,
    find_first_last,
    quant_modules,
    quantize_model,
    quantizers_initialized,
)
from .modules import QuantConv2d, QuantLinear, QuantModule, is_quantizable

__all__ = [
    "LSQQuantizer",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantModule",
    "calibrate_quantizers",
    "find_first_last",
    "is_quantizable",
    "load_quantized",
    "lsq_fake_quant",
    "pack_codes",
    "quant_modules",
    "quant_range",
    "quantize_model",
    "quantizers_initialized",
    "save_quantized",
    "unpack_codes",
]
