"""The private APIs of transformers, torch, timm, datasets and argparse: all behind acs_hf.utils.upstream,
and all still there in the installed versions."""

import ast
import inspect
from pathlib import Path

import pytest

from acs_hf.utils import upstream

ROOT = Path(__file__).resolve().parents[1]


def test_installed_libraries_have_what_the_seam_relies_on():
    problems = upstream.check_upstream()
    assert not problems, "an upstream library changed what acs_hf relies on:\n" + "\n".join(problems)


def _private_uses(path: Path) -> list[str]:
    """``x._name`` uses (not on self/cls, not super() in a listed override) and imports of
    private names or modules from outside acs_hf."""
    allowed_super = set(upstream.TRAINER_OVERRIDES) | set(upstream.TORCH_OVERRIDES)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            is_super = isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super"
            if is_super and node.attr in allowed_super:
                continue
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names = [a.name for a in node.names if a.name.startswith("_")]
            outside = node.level == 0 and any(part.startswith("_") for part in node.module.split("."))
            if names or outside:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {names}")
    return found


@pytest.mark.parametrize("folder", ["acs_hf", "recipes"])
def test_private_names_only_through_the_seam(folder):
    files = [p for p in (ROOT / folder).rglob("*.py") if p.name != "upstream.py"]
    uses = [use for p in files for use in _private_uses(p)]
    assert not uses, "private names used outside acs_hf/upstream.py (add an entry there):\n" + "\n".join(uses)


def test_damaged_file_errors_are_told_apart():
    from safetensors import SafetensorError

    assert upstream.is_damaged_file_error(SafetensorError("header too large"))
    assert upstream.is_damaged_file_error(RuntimeError("PytorchStreamReader failed reading zip archive"))
    assert not upstream.is_damaged_file_error(RuntimeError("Error(s) in loading state_dict: size mismatch"))
    assert not upstream.is_damaged_file_error(MemoryError())


def test_a_moved_quantizer_registry_is_reported(monkeypatch):
    """The registry module the import hook waits for is pinned: were transformers to define its
    quantizer registry elsewhere, the seam check names what moved and where."""
    import transformers.quantizers as quantizers

    moved = type("AutoHfQuantizer", (), {"__module__": "transformers.quantizers.registry"})
    monkeypatch.setattr(quantizers, "AutoHfQuantizer", moved)
    problems = upstream.check_upstream()
    assert (
        len(problems) == 1
        and "['AutoHfQuantizer'] are no longer defined in transformers.quantizers.auto" in (problems[0])
    ), problems
    assert "found in ['transformers.quantizers.registry']" in problems[0]


def test_a_changed_hf_quantizer_hook_is_reported(monkeypatch):
    """The HfQuantizer hooks acs_hf's quantizer relies on are checked: a hook transformers dropped, or a
    from_pretrained that stops passing checkpoint_files, is named instead of loading a checkpoint unchecked."""
    import transformers.modeling_utils as modeling_utils
    from transformers.quantizers.base import HfQuantizer

    monkeypatch.delattr(HfQuantizer, "update_attn_implementation")
    problems = upstream.check_upstream()
    assert len(problems) == 1 and "HfQuantizer.update_attn_implementation" in problems[0], problems
    monkeypatch.undo()

    original = inspect.getsource
    monkeypatch.setattr(
        inspect,
        "getsource",
        lambda obj: (
            original(obj).replace("checkpoint_files=checkpoint_files", "files=checkpoint_files")
            if obj is modeling_utils
            else original(obj)
        ),
    )
    problems = upstream.check_upstream()
    assert len(problems) == 1 and "preprocess_model(..., checkpoint_files=...)" in problems[0], problems
