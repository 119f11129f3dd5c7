"""The size limits that keep acs_hf easy to hold in one's head (docs/architecture.md, "Layout"): no module over 350
lines, no function over 60, and trainer.py (the Trainer overrides) under 200 lines."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "acs_hf"
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_TRAINER_LINES = 350, 60, 200


def _modules() -> list[Path]:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30, modules  # the package was found
    return modules


def test_no_module_over_the_limit():
    lines = {p.relative_to(PACKAGE): len(p.read_text().splitlines()) for p in _modules()}
    over = {str(p): n for p, n in lines.items() if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them by job): {over}"
    assert lines[Path("training/trainer.py")] < MAX_TRAINER_LINES


def test_no_function_over_the_limit():
    over = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    over.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {over}"


def test_layout_page_names_every_module():
    """The "Layout" section of docs/architecture.md names every module of acs_hf (metrics/ and templates/ as
    folders)."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    section = page[page.index("## Layout") :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    unnamed = [
        str(p.relative_to(PACKAGE))
        for p in _modules()
        if p.name != "__init__.py"
        and not re.search(rf"(?<!\w){re.escape(p.name)}\b", section)  # scores.py is not round_scores.py
        and "metrics" not in p.relative_to(PACKAGE).parts
    ]
    assert not unnamed, f"modules the Layout section of docs/architecture.md does not name: {unnamed}"
