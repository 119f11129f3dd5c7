"""The one seam to private APIs of transformers, torch, timm, datasets and argparse.

Every use of a private name of those libraries goes through this module, each entry saying what it
relies on and which public API would replace it. :func:`check_upstream` verifies that the
installed versions still have all of it (``tests/test_upstream.py`` runs it in CI), so an upstream
change fails there with a message naming the entry, not in a user's run.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "TORCH_OVERRIDES",
    "TRANSFORMERS_QUANTIZER_REGISTRY",
    "TRAINER_OVERRIDES",
    "HF_QUANTIZER_HOOKS",
    "check_upstream",
    "dataset_fingerprint",
    "dataset_index_map",
    "forward_hook_count",
    "is_damaged_file_error",
    "parser_destinations",
    "remove_forward_hook",
    "save_timm_config",
    "trainer_output_dir",
]

#: The transformers module that defines ``AutoHfQuantizer`` (the registry ``from_pretrained``
#: consults) and ``register_quantizer`` / ``register_quantization_config``: ``import acs_hf`` registers
#: right after it is imported (see ``acs_hf/__init__.py``). transformers documents the functions
#: under ``transformers.quantizers``; the submodule that runs them is the detail relied on.
TRANSFORMERS_QUANTIZER_REGISTRY = "transformers.quantizers.auto"

#: The private ``transformers.Trainer`` methods ACSTrainer overrides, with the parameters it relies
#: on and why. Public replacement: none today (transformers offers callbacks for none of these).
TRAINER_OVERRIDES: dict[str, tuple[tuple[str, ...], str]] = {
    "_get_train_sampler": (("train_dataset",), "the fixed-length coreset sampler"),
    "_save_checkpoint": (("model", "trial"), "the selection state written before the Trainer's files"),
    "_load_from_checkpoint": (("resume_from_checkpoint", "model"), "the selection state restored first"),
    "_init_training_state": (
        ("max_steps", "num_update_steps_per_epoch", "num_train_epochs", "resume_from_checkpoint", "trial"),
        "the step count of a resume on another process count",
    ),
    "_load_optimizer_and_scheduler": (("checkpoint",), "the LR schedule of a resume on another process count"),
    "_get_output_dir": (("trial",), "where the Trainer writes checkpoint-* (called, not overridden)"),
}


#: Private ``torch.nn.Module`` hooks overridden, with the parameters relied on. Public replacement:
#: ``register_load_state_dict_pre_hook`` (but it cannot see ``strict`` and the error lists).
TORCH_OVERRIDES: dict[str, tuple[tuple[str, ...], str]] = {
    "_load_from_state_dict": (("state_dict", "prefix"), "LSQ steps loaded into uninitialised quantizers"),
}

#: The ``transformers.quantizers.base.HfQuantizer`` hooks :class:`acs_hf.integrations.hf_quantizer.LSQHfQuantizer`
#: overrides, with the parameters relied on and why; and the two call sites in ``from_pretrained`` whose
#: arguments it relies on (checked in the source: no public contract says what they pass).
HF_QUANTIZER_HOOKS: dict[str, tuple[tuple[str, ...], str]] = {
    "validate_environment": ((), "refuses a device_map that offloads to disk"),
    "update_attn_implementation": (("config",), "the one hook that sees the config first: model_args checked"),
    "_process_model_before_weight_loading": (("model",), "the packed weights checked and prepared"),
    "_process_model_after_weight_loading": (("model",), "the packed weights unpacked"),
    "get_state_dict_and_metadata": (("model",), "save_pretrained writes the packed format"),
    "is_serializable": ((), "save_pretrained allowed"),
}
HF_QUANTIZER_CALLS = {
    "transformers.quantizers.auto": (r"\.update_attn_implementation\(config\)", "update_attn_implementation(config)"),
    "transformers.modeling_utils": (
        r"\.preprocess_model\([^)]*checkpoint_files=checkpoint_files",
        "preprocess_model(..., checkpoint_files=...), which reaches _process_model_before_weight_loading's kwargs",
    ),
}


def trainer_output_dir(trainer: Any, trial: Any = None) -> str:
    """Where ``trainer`` writes ``checkpoint-*`` folders. Relies on ``Trainer._get_output_dir``
    (hyperparameter-search trials get sub-folders); public: ``args.output_dir`` without trials."""
    return trainer._get_output_dir(trial=trial)


def dataset_fingerprint(dataset: Any) -> str | None:
    """The ``datasets`` fingerprint of a ``Dataset`` (its content and every transform applied), or
    None for other datasets. Relies on ``Dataset._fingerprint``; no public accessor exists."""
    return getattr(dataset, "_fingerprint", None)


def dataset_index_map(dataset: Any) -> Any | None:
    """The arrow index map of a shuffled, selected or filtered ``datasets.Dataset`` (a one-column
    table of row numbers into ``dataset.data``), or None. Relies on ``Dataset._indices``; public
    alternative: ``flatten_indices()``, which copies the data."""
    return getattr(dataset, "_indices", None)


def save_timm_config(model: Any, config_path: str, **kwargs: Any) -> None:
    """Write timm's ``config.json`` for ``model`` (``kwargs``: ``model_config``, ``model_args``,
    ``data_config``). Relies on ``timm.models._hub.save_config_for_hf``; public alternative:
    ``timm.models.save_for_hf``, which also writes the weights."""
    from timm.models._hub import save_config_for_hf

    save_config_for_hf(model, config_path, **kwargs)


def parser_destinations(parser: Any) -> set[str]:
    """Every destination an ``argparse`` parser fills. Relies on ``ArgumentParser._actions``; no
    public accessor exists."""
    return {action.dest for action in parser._actions}


def forward_hook_count(module: Any, hook: Any) -> int:
    """How many times the function ``hook`` is registered as a forward hook of ``module`` (a deep copy
    of a module keeps its hooks). Relies on ``nn.Module._forward_hooks``; public alternative: the handle
    ``register_forward_hook`` returned, which a copy of the module does not carry."""
    return sum(h is hook for h in module._forward_hooks.values())


def remove_forward_hook(module: Any, hook: Any) -> None:
    """Remove every registration of the function ``hook`` as a forward hook of ``module``. Relies on
    ``nn.Module._forward_hooks`` and its ``_forward_hooks_with_kwargs`` / ``_forward_hooks_always_called``
    companions (keyed alike); public alternative: the handle ``register_forward_hook`` returned."""
    for key in [k for k, h in module._forward_hooks.items() if h is hook]:
        del module._forward_hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)


def is_damaged_file_error(error: BaseException) -> bool:
    """Whether an exception from loading a checkpoint means a damaged or truncated file (as opposed
    to an architecture mismatch, out of memory or an API change)."""
    import pickle
    import zipfile

    from safetensors import SafetensorError

    if isinstance(error, (SafetensorError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError)):
        return True
    # torch.load reports a truncated archive as a plain RuntimeError.
    return isinstance(error, RuntimeError) and "PytorchStreamReader" in str(error)


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def check_upstream() -> list[str]:
    """What the installed libraries lack of this module's entries (empty when all is there)."""
    import argparse

    import datasets
    import timm.models._hub as timm_hub
    from torch import nn
    from transformers import Trainer

    problems = _missing_parameters("transformers.Trainer", Trainer, TRAINER_OVERRIDES)
    problems += _missing_parameters("torch.nn.Module", nn.Module, TORCH_OVERRIDES)
    ds = datasets.Dataset.from_dict({"x": [0, 1, 2]}).select([2, 0])
    if not isinstance(getattr(ds, "_fingerprint", None), str) or getattr(ds, "_indices", None) is None:
        problems.append("datasets.Dataset._fingerprint / _indices are gone")
    if not callable(getattr(timm_hub, "save_config_for_hf", None)):
        problems.append("timm.models._hub.save_config_for_hf is gone")
    module = nn.Module()
    if not all(isinstance(getattr(module, name, None), dict) for name in _HOOK_DICTS):
        problems.append(f"torch.nn.Module's {', '.join(_HOOK_DICTS)} are gone (output quantizers' hooks)")
    if not hasattr(argparse.ArgumentParser(), "_actions"):
        problems.append("argparse.ArgumentParser._actions is gone")
    problems += _check_quantizer_registry()
    problems += _check_quantizer_hooks()
    return problems


def _missing_parameters(owner: str, cls: type, methods: dict[str, tuple[tuple[str, ...], str]]) -> list[str]:
    """The ``methods`` of ``cls`` that are gone or lack a parameter relied on."""
    import inspect

    problems = []
    for name, (params, why) in methods.items():
        method = getattr(cls, name, None)
        found = () if method is None else tuple(inspect.signature(method).parameters)
        missing = [p for p in params if p not in found]
        if method is None or missing:
            problems.append(f"{owner}.{name} ({why}) lacks {missing or 'the method'}")
    return problems


def _check_quantizer_hooks() -> list[str]:
    import importlib
    import inspect
    import re

    from transformers.quantizers.base import HfQuantizer

    problems = _missing_parameters("transformers HfQuantizer", HfQuantizer, HF_QUANTIZER_HOOKS)
    for module, (pattern, what) in HF_QUANTIZER_CALLS.items():
        if not re.search(pattern, inspect.getsource(importlib.import_module(module)), re.DOTALL):
            problems.append(f"{module} no longer calls {what}: acs_hf checkpoints would load unchecked")
    return problems


def _check_quantizer_registry() -> list[str]:
    import transformers.quantizers as quantizers

    names = ("AutoHfQuantizer", "register_quantizer", "register_quantization_config")
    found = {name: getattr(getattr(quantizers, name, None), "__module__", None) for name in names}
    moved = {name: module for name, module in found.items() if module != TRANSFORMERS_QUANTIZER_REGISTRY}
    if moved:
        return [
            f"transformers.quantizers' {sorted(moved)} are no longer defined in {TRANSFORMERS_QUANTIZER_REGISTRY} "
            f"(found in {sorted(set(map(str, moved.values())))}): `import acs_hf` would never register its quantizer"
        ]
    return []
