"""The docs stay true: every recipe flag, every ``acs_hf.<name>`` and every relative link that README.md and
docs/*.md write exists (CHANGELOG.md and BENCHMARKS.md: links only, since they record what was).

Which ``--flags`` are the recipe's (checked against the parser recipes/run_acs.py builds):

- in a command (a line of a code block, with its ``\\`` continuations, or a code span holding one; commands
  split at ``&&``, ``;`` and ``|``; comments dropped), the flags after the ``run_acs.py`` token. Flags before it
  (``accelerate launch --multi_gpu --num_processes 8``) and flags of commands without it (``pip install -e``,
  ``python -m pytest -m``, ``python recipes/benchmark_speed.py --quick``) belong to other programs;
- in prose and tables, a code span that begins with ``--`` names recipe flags (every ``--flag`` in it:
  ``--act_bits null``, ``--integer_graph true --export_onnx true``). Another program's flag is written inside its
  command (``accelerate launch --multi_gpu``, ``benchmark_deploy.py --quick``), never alone in a span.

A flag exists when its name (``-`` read as ``_``) is a destination of the parser, or ``--no_<name>`` of a boolean
one. Each check is a function of a document's text, so the last tests can show that each reports what is made up.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import warnings
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # flags, names and links
LINKS_ONLY = [ROOT / "CHANGELOG.md", ROOT / "BENCHMARKS.md"]

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")
_NAME = re.compile(r"(?<![\w./-])acs_hf(?:\.[A-Za-z_]\w*)+")
_FROM_IMPORT = re.compile(r"^[ \t]*from[ \t]+(acs_hf(?:\.\w+)*)[ \t]+import[ \t]+(?:\(([\w\s,]+)\)|([\w \t,]+))", re.M)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _split(text: str) -> tuple[list[str], str]:
    """A document's code blocks, and its text outside them."""
    return _FENCE.findall(text), _FENCE.sub("\n", text)


def _commands(block: str) -> list[str]:
    """The commands of a code block: continuation lines joined, comments dropped, split at && ; |."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*", "", line)
        commands += re.split(r"&&|;|\|", line)
    return commands


def _command_flags(command: str) -> list[str]:
    """The flags given to run_acs.py in one command (none when the command does not run it)."""
    tokens = command.split()
    starts = [i for i, t in enumerate(tokens) if t.endswith("run_acs.py")]
    if not starts:
        return []
    return [m.group(0).split("=")[0] for t in tokens[starts[0] + 1 :] for m in [_FLAG.match(t)] if m]


def recipe_flags(text: str) -> set[str]:
    """Every flag a document gives the recipe (the rule in the module docstring)."""
    blocks, prose = _split(text)
    flags = {f for block in blocks for command in _commands(block) for f in _command_flags(command)}
    for _, span in _SPAN.findall(prose):
        span = span.strip()
        if any(t.endswith("run_acs.py") for t in span.split()):
            flags.update(f for command in _commands(span) for f in _command_flags(command))
        elif span.startswith("--"):
            flags.update("--" + name for name in _FLAG.findall(span))
    return flags


@cache
def recipe_destinations() -> frozenset[str]:
    """What the recipe's parser fills, built as recipes/run_acs.py builds it."""
    from transformers import HfArgumentParser, TrainingArguments

    from acs_hf import ACSArguments, QuantConfig
    from acs_hf.run.arguments import DataArguments, ModelArguments, RunArguments
    from acs_hf.utils.upstream import parser_destinations

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, QuantConfig, ACSArguments, TrainingArguments, RunArguments)
    )
    return frozenset(parser_destinations(parser))


def unknown_flags(text: str) -> list[str]:
    """The recipe flags of a document that the recipe's parser does not take."""
    known = recipe_destinations()
    unknown = []
    for flag in sorted(recipe_flags(text)):
        name = flag[2:].replace("-", "_")
        if name not in known and not (name.startswith("no_") and name[3:] in known):
            unknown.append(flag)
    return unknown


def acs_hf_names(text: str) -> set[str]:
    """Every ``acs_hf.<dotted name>`` of a document, and ``acs_hf.x.y`` for each ``from acs_hf.x import y``."""
    names = set(_NAME.findall(text))
    for module, in_parentheses, on_the_line in _FROM_IMPORT.findall(text):
        imported = [part.split()[0] for part in (in_parentheses or on_the_line).split(",") if part.strip()]
        names.update(f"{module}.{name}" for name in imported)  # "x as y": x
    return names


def _resolves(dotted: str) -> bool:
    """Whether ``acs_hf.a.b`` is an attribute chain from the package, each step an attribute or a submodule."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        with warnings.catch_warnings():  # acs_hf 0.1's module paths still import, with a DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            if hasattr(obj, part):
                obj = getattr(obj, part)
                continue
            module = ".".join(parts[: i + 1])
            is_package = hasattr(obj, "__path__")
            if not is_package or importlib.util.find_spec(module) is None:
                return False
            obj = importlib.import_module(module)
    return True


def unknown_names(text: str) -> list[str]:
    """The ``acs_hf.<name>`` a document writes that do not exist."""
    return sorted(n for n in acs_hf_names(text) if not _resolves(n))


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for a Markdown document's headings (lower case, punctuation dropped, spaces as -)."""
    _, prose = _split(text)
    anchors = set()
    for heading in re.findall(r"^#+\s+(.*)$", prose, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        base, n = slug, 1
        while slug in anchors:
            slug, n = f"{base}-{n}", n + 1
        anchors.add(slug)
    return anchors


def broken_links(text: str, folder: Path) -> list[str]:
    """The relative links of a document (at ``folder``) whose file, or heading anchor, is not there."""
    _, prose = _split(text)
    broken = []
    for target in (a or b for a, b in _LINK.findall(prose)):
        if re.match(r"[a-z][a-z+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (folder / file).resolve() if file else None
        if path is not None and not path.exists():
            broken.append(target)
        elif anchor and (path is None or path.suffix == ".md"):
            if anchor not in _anchors(path.read_text() if path else text):
                broken.append(target)
    return broken


def render_signature(qualified: str) -> str:
    """``acs_hf.name(a, b=1, *, c=None)``: how docs/api.md writes a public name's signature (no annotations)."""
    import dataclasses
    import inspect

    module, _, name = qualified.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    parts, star = [], False
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
            continue
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.default is p.empty:
            parts.append(p.name)
        elif p.name in fields and fields[p.name].default_factory is not dataclasses.MISSING:
            parts.append(f"{p.name}={fields[p.name].default_factory()!r}")
        else:
            parts.append(f"{p.name}={p.default!r}")
    return f"{qualified}({', '.join(parts)})"


def stale_signatures(api: str) -> list[str]:
    """The top-level signatures, as :func:`render_signature` writes them, that the API page does not hold."""
    import acs_hf

    return [line for line in map(render_signature, (f"acs_hf.{n}" for n in acs_hf.__all__)) if line not in api]


def _docs(paths):
    return pytest.mark.parametrize("path", paths, ids=[str(p.relative_to(ROOT)) for p in paths])


def test_the_docs_are_there():
    names = {p.name for p in CHECKED}
    assert {"README.md", "arguments.md", "models.md", "resume.md", "checkpoints.md", "deploy.md", "api.md"} <= names
    assert "architecture.md" in names and all(p.exists() for p in LINKS_ONLY)


@_docs(CHECKED + LINKS_ONLY)
def test_code_fences_are_balanced(path):
    """An unclosed fence would hide the rest of a document from the checks (or show them a code block as prose)."""
    assert len(re.findall(r"^```", path.read_text(), re.M)) % 2 == 0


@_docs(CHECKED)
def test_every_recipe_flag_exists(path):
    unknown = unknown_flags(path.read_text())
    assert not unknown, f"{path.name} names flags the recipe does not take: {unknown}"


@_docs(CHECKED)
def test_every_acs_hf_name_exists(path):
    unknown = unknown_names(path.read_text())
    assert not unknown, f"{path.name} names what acs_hf does not have: {unknown}"


@_docs(CHECKED + LINKS_ONLY)
def test_every_relative_link_resolves(path):
    broken = broken_links(path.read_text(), path.parent)
    assert not broken, f"{path.name} links to what is not there: {broken}"


def test_api_page_gives_every_public_signature():
    """docs/api.md writes every top-level name with its signature as the code has it (paste the line if not)."""
    stale = stale_signatures((ROOT / "docs" / "api.md").read_text())
    assert not stale, f"docs/api.md lacks these signatures (or has old ones): {stale}"


def test_the_checks_see_the_real_docs():
    """The extraction is not vacuous: the README's own commands and tables are read."""
    readme = (ROOT / "README.md").read_text()
    flags = recipe_flags(readme)
    assert {"--integer_graph", "--export_onnx", "--pretrained_weights", "--per_device_train_batch_size"} <= flags
    assert "acs_hf.load_quantized" in acs_hf_names(readme)
    assert {"--fraction", "--selection_method", "--act_bits"} <= recipe_flags(
        (ROOT / "docs" / "arguments.md").read_text()
    )


def test_the_checks_report_what_is_made_up(tmp_path):
    """Each check reports a made-up flag, name, link and signature, and leaves other programs' flags alone."""
    (tmp_path / "there.md").write_text("# A heading\n")
    made_up = """
Pass `--made_up_flag` or `--fraction 0.3 --another_made_up 2`; `acs_hf.made_up_name` and `acs_hf.quantization.nope`.
Run `python recipes/run_acs.py --made_up_in_span 1` with `accelerate launch --multi_gpu`.
See [there](there.md#a-heading), [a missing page](docs/missing.md), [a missing heading](there.md#nowhere).

```bash
accelerate launch --multi_gpu --num_processes 8 --num_machines 2 recipes/run_acs.py --fraction 0.1 \\
    --made_up_in_command 1   # --made_up_in_comment
pip install -e ".[test]" && python -m pytest -q -m "not slow" tests
python recipes/benchmark_deploy.py --quick
```

```python
from acs_hf.selection import select_coreset, made_up_import
```
"""
    assert unknown_flags(made_up) == [
        "--another_made_up",
        "--made_up_flag",
        "--made_up_in_command",
        "--made_up_in_span",
    ]
    assert "--fraction" in recipe_flags(made_up) and not {"--multi_gpu", "--num_processes", "--quick"} & recipe_flags(
        made_up
    )
    assert unknown_names(made_up) == [
        "acs_hf.made_up_name",
        "acs_hf.quantization.nope",
        "acs_hf.selection.made_up_import",
    ]
    assert broken_links(made_up, tmp_path) == ["docs/missing.md", "there.md#nowhere"]
    valid = "`--fraction`, `--no_class_balanced`, `acs_hf.QuantConfig`, `acs_hf.training.trainer`, [r](there.md)"
    assert not unknown_flags(valid) and not unknown_names(valid) and not broken_links(valid, tmp_path)
    api = (ROOT / "docs" / "api.md").read_text()
    made_up_signature = api.replace("acs_hf.select_coreset(scores, labels, fraction,", "acs_hf.select_coreset(scores,")
    assert stale_signatures(made_up_signature) == [render_signature("acs_hf.select_coreset")]
