"""acs_hf: quantization-aware training on adaptively selected coresets, on the Hugging Face stack.

Names are imported on first use, so ``import acs_hf; acs_hf.load_quantized(...)`` never imports
transformers or accelerate; ``acs_hf.ACSTrainer`` does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "acs_hf.arguments": ["ACSArguments", "QATArguments"],
    "acs_hf.quantization": [
        "LSQQuantizer",
        "LayerQuantConfig",
        "QuantConfig",
        "QuantConv2d",
        "QuantLinear",
        "calibrate_quantizers",
        "dequantize_model",
        "load_quantized",
        "quantize_model",
        "save_quantized",
    ],
    "acs_hf.selection": [
        "create_selector",
        "disagreement_score",
        "error_vector_score",
        "evs_weight",
        "list_selectors",
        "register_selector",
        "select_coreset",
    ],
    "acs_hf.qat_trainer": ["ImageClassificationTrainer", "QATTrainer"],
    "acs_hf.trainer": ["ACSTrainer"],
    "acs_hf.reporting": ["SelectionReporter"],
    "acs_hf._io": ["atomic_write_json"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "ACSArguments",
    "ACSTrainer",
    "ImageClassificationTrainer",
    "LSQQuantizer",
    "LayerQuantConfig",
    "QATArguments",
    "QATTrainer",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "SelectionReporter",
    "atomic_write_json",
    "calibrate_quantizers",
    "create_selector",
    "dequantize_model",
    "disagreement_score",
    "error_vector_score",
    "evs_weight",
    "list_selectors",
    "load_quantized",
    "quantize_model",
    "register_selector",
    "save_quantized",
    "select_coreset",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'acs_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from ._io import atomic_write_json
    from .arguments import ACSArguments, QATArguments
    from .qat_trainer import ImageClassificationTrainer, QATTrainer
    from .quantization import (
        LayerQuantConfig,
        LSQQuantizer,
        QuantConfig,
        QuantConv2d,
        QuantLinear,
        calibrate_quantizers,
        dequantize_model,
        load_quantized,
        quantize_model,
        save_quantized,
    )
    from .reporting import SelectionReporter
    from .selection import (
        create_selector,
        disagreement_score,
        error_vector_score,
        evs_weight,
        list_selectors,
        register_selector,
        select_coreset,
    )
    from .trainer import ACSTrainer
