"""Old module paths of acs_hf 0.1's flat layout, kept importable for one release.

``import acs_hf.trainer`` (or ``from acs_hf.recipe import run_acs``) gives the module's new home
(:mod:`acs_hf.training.trainer`, the same module object, so patches and ``isinstance`` agree) and a
``DeprecationWarning`` naming it. Installed on ``sys.meta_path`` by ``acs_hf/__init__.py``.

Names of the old modules' ``__all__`` that 0.2 moved elsewhere (:data:`MOVED_NAMES`) still resolve
through the old path, with a ``DeprecationWarning`` naming their new home; those with no replacement
(:data:`REMOVED_NAMES`) raise an ``AttributeError`` saying what took their place.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["MOVED_MODULES", "MOVED_NAMES", "REMOVED_NAMES", "MovedModuleFinder"]

#: Old path -> new path. ``selection_state`` and ``round_scores`` are gone: their classes were
#: replaced by :mod:`acs_hf.training.selection_state`'s plain state and :mod:`acs_hf.training.rounds`.
MOVED_MODULES = {
    "acs_hf._io": "acs_hf.utils.io",
    "acs_hf.upstream": "acs_hf.utils.upstream",
    "acs_hf.batch": "acs_hf.data.batch",
    "acs_hf.images": "acs_hf.data.images",
    "acs_hf.view_cache": "acs_hf.data.view_cache",
    "acs_hf.hf_quantizer": "acs_hf.integrations.hf_quantizer",
    "acs_hf.models": "acs_hf.integrations.models",
    "acs_hf.hub": "acs_hf.integrations.hub",
    "acs_hf.arguments": "acs_hf.run.arguments",
    "acs_hf.qat_trainer": "acs_hf.training.qat_trainer",
    "acs_hf.trainer": "acs_hf.training.trainer",
    "acs_hf.scoring": "acs_hf.training.scoring_pass",
    "acs_hf.training_scores": "acs_hf.training.training_pass",
    "acs_hf.teacher_cache": "acs_hf.training.teacher_cache",
    "acs_hf.sampler": "acs_hf.training.sampler",
    "acs_hf.reporting": "acs_hf.training.reporting",
    "acs_hf.consistency": "acs_hf.training.consistency",
    "acs_hf.checkpoint_folders": "acs_hf.training.checkpoints",
    "acs_hf.run_checks": "acs_hf.run.checks",
    "acs_hf.recipe": "acs_hf.run.recipe",
}


#: Old module -> {name of its 0.1 ``__all__`` that its new home lacks: "module:attribute path" of the replacement}.
MOVED_NAMES = {
    "acs_hf.scoring": {"ORDER_KEY": "acs_hf.training.consistency:ORDER_KEY"},
    "acs_hf.reporting": {
        "RECORD_NAME": "acs_hf.layout:RunLayout.SELECTION_LOG",
        "PLOT_NAME": "acs_hf.layout:RunLayout.SELECTION_PLOT",
        "SUBSET_DIR": "acs_hf.layout:RunLayout.SUBSETS",
    },
    "acs_hf.checkpoint_folders": {
        "read_array": "acs_hf.training.checkpoint_state:read_array",
        "read_arrays": "acs_hf.training.checkpoint_state:read_arrays",
        "check_resume_layout": "acs_hf.training.checkpoint_state:check_resume_layout",
        "set_aside_previous_run": "acs_hf.run.checks:set_aside_previous_run",
    },
}

#: Old module -> {name of its 0.1 ``__all__`` with no replacement: what does its job now}.
REMOVED_NAMES = {
    "acs_hf.training_scores": {
        "save_records": "SelectionCheckpointer.save (acs_hf.training.checkpoint_state) writes the records",
        "read_records": "SelectionCheckpointer.restore (acs_hf.training.checkpoint_state) reads them back",
    },
    "acs_hf.checkpoint_folders": {
        "check_same_run": "SelectionCheckpointer.restore (acs_hf.training.checkpoint_state) makes the check",
    },
}


def _resolve(target: str) -> Any:
    module, _, path = target.partition(":")
    value: Any = importlib.import_module(module)
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _old_names_getattr(new: str, previous: Callable[[str], Any] | None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the new module ``new``: the 0.1 names of the old paths that lead to it."""
    olds = [old for old, target in MOVED_MODULES.items() if target == new]

    def __getattr__(name: str) -> Any:
        for old in olds:
            if name in MOVED_NAMES.get(old, {}):
                target = MOVED_NAMES[old][name]
                warnings.warn(
                    f"{old}.{name} moved to {target.replace(':', '.')} in acs_hf 0.2; import it from there",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return _resolve(target)
            if name in REMOVED_NAMES.get(old, {}):
                raise AttributeError(f"{old}.{name} is gone in acs_hf 0.2: {REMOVED_NAMES[old][name]}")
        if previous is not None:
            return previous(name)
        raise AttributeError(f"module {new!r} has no attribute {name!r}")

    __getattr__.acs_hf_old_names = True  # type: ignore[attr-defined]
    return __getattr__


def _teach_old_names(module: ModuleType) -> None:
    """Let ``module`` (the new home of old paths) resolve the old paths' moved names, once."""
    previous = module.__dict__.get("__getattr__")
    if getattr(previous, "acs_hf_old_names", False):
        return
    if any(old in MOVED_NAMES or old in REMOVED_NAMES for old, new in MOVED_MODULES.items() if new == module.__name__):
        module.__getattr__ = _old_names_getattr(module.__name__, previous)


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new one, with a ``DeprecationWarning``."""

    def find_spec(self, name, path, target=None):
        if name not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec) -> ModuleType:
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new} in acs_hf 0.2; import it from there (the old path goes in 0.3)",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        _teach_old_names(module)
        self._own_spec = module.__spec__  # the import system sets __spec__ to the alias's; put it back
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._own_spec
