"""Old module paths of acs_hf 0.1's flat layout, kept importable for one release.

``import acs_hf.trainer`` (or ``from acs_hf.recipe import run_acs``) gives the module's new home
(:mod:`acs_hf.training.trainer`, the same module object, so patches and ``isinstance`` agree) and a
``DeprecationWarning`` naming it. Installed on ``sys.meta_path`` by ``acs_hf/__init__.py``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import warnings
from types import ModuleType

__all__ = ["MOVED_MODULES", "MovedModuleFinder"]

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
        self._own_spec = module.__spec__  # the import system sets __spec__ to the alias's; put it back
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._own_spec
