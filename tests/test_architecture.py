"""The shape of the package (docs/architecture.md, "Layout"): imports flow one way between its layers, no module
imports itself back through others, the trainer class is imported only by the recipe and the
package's face, every name of the run folder is typed in one module, and the old flat module paths
still import (with a DeprecationWarning)."""

import ast
import re
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

from acs_hf.layout import CHECKPOINT_PREFIX, RunLayout

PACKAGE = Path(__file__).resolve().parents[1] / "acs_hf"

#: Each top-level part of acs_hf and its layer: a module imports only from lower layers or its own part.
LAYERS = {
    "utils": 0,
    "quantization": 1,
    "selection": 1,
    "layout": 2,
    "data": 3,
    "metrics": 3,
    "integrations": 3,
    "families": 1,
    "training": 4,
    "run": 5,
    "__init__": 6,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    assert len(modules) > 40, modules  # the package was found
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every acs_hf module ``name`` imports, anywhere in it (``TYPE_CHECKING`` blocks and function
    bodies included); ``from package import submodule`` counts as importing the submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "acs_hf"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "acs_hf":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & set(modules)
            found |= subs if subs else {target}
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_flow_down_the_layers():
    graph = _graph()
    assert set(map(_part, graph)) <= set(LAYERS), set(map(_part, graph)) - set(LAYERS)
    upward = [
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if _part(target) != _part(module) and LAYERS[_part(target)] >= LAYERS[_part(module)]
    ]
    assert not upward, "imports against the layers (docs/architecture.md, Layout):\n" + "\n".join(sorted(upward))


def test_only_the_recipe_and_the_face_import_the_trainer_class():
    importers = {m for m, targets in _graph().items() if "acs_hf.training.trainer" in targets}
    assert importers == {"acs_hf", "acs_hf.run.recipe"}


def _string_constants(path: Path) -> list[str]:
    """The string literals of a module, docstrings left out (they may name files)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_each_run_folder_name_is_typed_in_one_module():
    names = {
        *RunLayout.previous_run_files(),
        *RunLayout.result_markers(),
        RunLayout.LOCK,
        RunLayout.ACS_STATE,
        RunLayout.SUBSET,
        RunLayout.SELECTOR_SUBSET,
        RunLayout.TRAINING_SCORES,
    }
    owners = {RunLayout.WEIGHTS: "acs_hf.quantization.packed", RunLayout.CONFIG: "acs_hf.quantization.packed"}
    constants = {name: _string_constants(path) for name, path in _modules().items()}
    where = {}
    for file_name in names:
        # a file name anywhere in a literal ("model.onnx", not "model.onnx.data"); folder names ("runs",
        # "selection") only as a whole literal, since they are also words
        if "." in file_name:
            pattern = re.compile(rf"(?<![\w.-]){re.escape(file_name)}(?![\w-]|\.\w)")
            where[file_name] = {m for m, strings in constants.items() if any(pattern.search(s) for s in strings)}
        else:
            where[file_name] = {m for m, strings in constants.items() if file_name in strings}
    # "checkpoint-*" is built from CHECKPOINT_PREFIX, so no module types it whole
    wrong = {n: sorted(m) for n, m in where.items() if not m <= {owners.get(n, "acs_hf.layout")}}
    assert not wrong, f"run-folder names typed outside their one module: {wrong}"


def test_the_layout_agrees_with_transformers_names():
    from transformers import trainer as hf_trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from transformers.utils import IMAGE_PROCESSOR_NAME

    assert CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR
    assert RunLayout.TRAINER_STATE == hf_trainer.TRAINER_STATE_NAME
    assert RunLayout.PREPROCESSOR == IMAGE_PROCESSOR_NAME
    layout = RunLayout("out")
    assert layout.checkpoint(12) == Path("out") / f"{PREFIX_CHECKPOINT_DIR}-12"
    assert layout.subset(3) == Path("out/selection/epoch_0003.npy")


@pytest.mark.parametrize(
    "path, uploaded",
    [
        ("model.safetensors", True),
        ("config.json", True),
        ("README.md", True),
        ("acs_selection.jsonl", True),
        ("selection/epoch_0004.npy", True),
        ("model.onnx", True),
        ("eval_results.json", True),
        ("checkpoint-40/acs_state.json", False),
        ("checkpoint-40/model.safetensors", False),
        ("teacher_cache/teacher_000.npy", False),
        ("fp_warmup/model.safetensors", False),
        ("runs/Dec04/events.out.tfevents", False),
        (".acs_hf.lock", False),
        (".replaced-20261204-120000-7/model.safetensors", False),
        ("model.safetensors.tmp", False),
    ],
)
def test_a_push_uploads_the_results_and_skips_the_work_folders(path, uploaded):
    from huggingface_hub.utils import filter_repo_objects

    kept = list(filter_repo_objects([path], ignore_patterns=RunLayout.upload_ignore()))
    assert (kept == [path]) is uploaded


def test_an_overwrite_moves_every_top_level_entry_a_run_writes():
    written = ["model.safetensors", "config.json", "preprocessor_config.json", "README.md", "acs_summary.json",
               "all_results.json", "train_results.json", "eval_results.json", "trainer_state.json",
               "acs_selection.jsonl", "acs_selection.png", "selection", "model.onnx", "model.onnx.data",
               "checkpoint-40", "fp_warmup", "teacher_cache", "runs"]  # fmt: skip
    patterns = RunLayout.previous_run_files()
    assert [w for w in written if not any(fnmatch(w, p) for p in patterns)] == []
    assert not any(fnmatch(RunLayout.LOCK, p) for p in patterns)  # the lock stays with the running job


@pytest.mark.slow
def test_the_old_module_paths_import_the_moved_modules_with_a_warning():
    from acs_hf.utils.moved import MOVED_MODULES

    script = (
        "import importlib, warnings, acs_hf\n"
        f"for old, new in {MOVED_MODULES!r}.items():\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module(old)\n"
        "    assert module is importlib.import_module(new), old\n"
        "    assert module.__spec__.name == new, (old, module.__spec__.name)\n"
        "    assert any(w.category is DeprecationWarning and new in str(w.message) for w in caught), old\n"
        "from acs_hf.trainer import ACSTrainer\n"
        "assert ACSTrainer is acs_hf.ACSTrainer\n"
        "print('ok', len(acs_hf.utils.moved.MOVED_MODULES))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", str(len(MOVED_MODULES))]


#: Issue 37: names of acs_hf 0.1's ``__all__`` that the new homes of their modules lack, with the value
#: each must still give through the old path.
OLD_NAMES = {
    "acs_hf.scoring": {"ORDER_KEY": "order"},
    "acs_hf.reporting": {
        "RECORD_NAME": "acs_selection.jsonl",
        "PLOT_NAME": "acs_selection.png",
        "SUBSET_DIR": "selection",
    },  # fmt: skip
    "acs_hf.checkpoint_folders": {
        "read_array": None,
        "read_arrays": None,
        "check_resume_layout": None,
        "set_aside_previous_run": None,
    },  # fmt: skip
}


def test_the_old_module_paths_give_every_name_of_their_old_all():
    import importlib
    import warnings

    from acs_hf.utils.moved import REMOVED_NAMES

    for old, names in OLD_NAMES.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
            for name, value in names.items():
                found = getattr(module, name)
                assert found == value if value is not None else callable(found), (old, name)
        moved = [str(w.message) for w in caught if w.category is DeprecationWarning and "in acs_hf 0.2" in str(w)]
        assert all(any(f"{old}.{name} moved to" in m for m in moved) for name in names), moved
    for old, names in REMOVED_NAMES.items():  # no replacement: the error says what does the job now
        module = importlib.import_module(old)
        for name, replacement in names.items():
            with pytest.raises(AttributeError, match=f"{name} is gone in acs_hf 0.2: {re.escape(replacement)}"):
                getattr(module, name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        importlib.import_module("acs_hf.scoring").no_such_name  # noqa: B018
