"""acs_hf: quantization-aware training on adaptively selected coresets, on the Hugging Face stack.

Names are imported on first use, so ``import acs_hf; acs_hf.load_quantized(...)`` never imports
transformers or accelerate; ``acs_hf.ACSTrainer`` does. ``import acs_hf`` also teaches
transformers to load acs_hf checkpoints (``from_pretrained``, ``pipeline``), see
:mod:`acs_hf.integrations.hf_quantizer`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .utils.moved import MovedModuleFinder as _MovedModuleFinder
from .utils.upstream import TRANSFORMERS_QUANTIZER_REGISTRY as _TRANSFORMERS_REGISTRY

__version__ = "0.2.0"

_EXPORTS = {
    "acs_hf.training.arguments": ["ACSArguments", "QATArguments"],
    "acs_hf.quantization": [
        "LSQQuantizer",
        "LayerQuantConfig",
        "QuantConfig",
        "QuantConv2d",
        "QuantLinear",
        "calibrate_quantizers",
        "compare_with_float",
        "dequantize_model",
        "export_onnx",
        "integer_kernel_counts",
        "load_quantized",
        "onnx_accuracy",
        "onnx_session",
        "onnx_speedup",
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
    "acs_hf.training.qat_trainer": ["ImageClassificationTrainer", "QATTrainer"],
    "acs_hf.training.trainer": ["ACSTrainer"],
    "acs_hf.training.reporting": ["SelectionReporter"],
    "acs_hf.utils.io": ["atomic_write_json"],
    "acs_hf.integrations.weights": ["load_weights"],
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
    "compare_with_float",
    "create_selector",
    "dequantize_model",
    "disagreement_score",
    "error_vector_score",
    "evs_weight",
    "export_onnx",
    "integer_kernel_counts",
    "list_selectors",
    "load_quantized",
    "load_weights",
    "onnx_accuracy",
    "onnx_session",
    "onnx_speedup",
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


def _register_with_transformers() -> None:
    try:
        importlib.import_module("acs_hf.integrations.hf_quantizer")
    except Exception as e:
        raise ImportError(
            f"acs_hf could not register its quantizer with transformers ({type(e).__name__}: {e}); "
            "transformers' from_pretrained would not read acs_hf checkpoints. If transformers was upgraded past "
            "the versions acs_hf supports, reinstall acs_hf to get a supported one"
        ) from e


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``register`` right after the module ``name`` is imported (transformers' quantizer registry,
    timm).

    Plain registration calls at import would cost every ``import acs_hf`` the import of torch,
    transformers' quantizer registry and timm (measured: 0.01 s for ``import acs_hf`` now, against
    about 3.3 s with torch, transformers and ``transformers.quantizers.auto``, of which the registry
    alone is 1.3 s); waiting for the module's own import costs nothing and still registers before
    any ``from_pretrained`` or ``timm.create_model`` can consult it. A failure raises, and the hook
    stays installed until a registration succeeds, so that a retried import raises again.
    """

    def __init__(self, name: str, register: Callable[[], None], what: str) -> None:
        self.name = name
        self.register = register
        self.what = what
        self._finding = False

    def find_spec(self, name, path, target=None):
        if name != self.name or self._finding:
            return None
        self._finding = True  # the lookup below passes through sys.meta_path again
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        if spec is None:  # not there: the normal ModuleNotFoundError follows
            return None
        exec_module = getattr(spec.loader, "exec_module", None)
        if exec_module is None:
            raise ImportError(
                f"acs_hf cannot register its {self.what}: {name} has no loader that executes it ({spec!r}); "
                f"{name} would not know acs_hf's {self.what}"
            )

        def exec_then_register(module):
            exec_module(module)
            self.register()
            if self in sys.meta_path:  # registered: the hook's work is done
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_then_register
        return spec


def _register_model_families() -> None:
    importlib.import_module("acs_hf.families")  # timm's @register_model runs at its import


def _register_after(name: str, register: Callable[[], None], what: str) -> None:
    if name in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport(name, register, what))


_register_after("timm", _register_model_families, "model families")  # cifar_resnet20 ... for timm.create_model
_register_after(_TRANSFORMERS_REGISTRY, _register_with_transformers, "quantizer")

if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):  # acs_hf 0.1's module paths
    sys.meta_path.append(_MovedModuleFinder())


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .integrations.weights import load_weights
    from .quantization import (
        LayerQuantConfig,
        LSQQuantizer,
        QuantConfig,
        QuantConv2d,
        QuantLinear,
        calibrate_quantizers,
        compare_with_float,
        dequantize_model,
        export_onnx,
        integer_kernel_counts,
        load_quantized,
        onnx_accuracy,
        onnx_session,
        onnx_speedup,
        quantize_model,
        save_quantized,
    )
    from .selection import (
        create_selector,
        disagreement_score,
        error_vector_score,
        evs_weight,
        list_selectors,
        register_selector,
        select_coreset,
    )
    from .training.arguments import ACSArguments, QATArguments
    from .training.qat_trainer import ImageClassificationTrainer, QATTrainer
    from .training.reporting import SelectionReporter
    from .training.trainer import ACSTrainer
    from .utils.io import atomic_write_json
