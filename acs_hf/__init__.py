"""acs_hf: quantization-aware training on adaptively selected coresets, on the Hugging Face stack."""

from .arguments import ACSArguments
from .quantization import (
    LSQQuantizer,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    calibrate_quantizers,
    load_quantized,
    quantize_model,
    save_quantized,
)
from .selection import (
    create_selector,
    disagreement_score,
    error_vector_score,
    evs_weight,
    list_selectors,
    select_coreset,
)
from .trainer import ACSTrainer

__version__ = "0.1.0"

__all__ = [
    "ACSArguments",
    "ACSTrainer",
    "LSQQuantizer",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "calibrate_quantizers",
    "create_selector",
    "disagreement_score",
    "error_vector_score",
    "evs_weight",
    "list_selectors",
    "select_coreset",
    "load_quantized",
    "quantize_model",
    "save_quantized",
]
