"""The public API: every exported name resolves, and the import stays lazy."""

import subprocess
import sys
from pathlib import Path

import acs_hf

ROOT = Path(__file__).resolve().parents[1]


def test_every_exported_name_resolves():
    assert sorted(acs_hf.__all__) == sorted(acs_hf._MODULE_OF)  # one list, no name forgotten
    for name in acs_hf.__all__:
        assert getattr(acs_hf, name) is not None, name
    assert set(acs_hf.__all__) <= set(dir(acs_hf))


def test_load_quantized_does_not_import_transformers_or_accelerate():
    code = (
        "import sys, acs_hf; acs_hf.load_quantized; acs_hf.select_coreset; acs_hf.QuantConfig; "
        "print(sorted(m for m in ('transformers', 'accelerate', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'ACSTrainr'"):
        acs_hf.ACSTrainr  # noqa: B018
