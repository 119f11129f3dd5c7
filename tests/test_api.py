"""The public API: every exported name resolves. (That the import stays lazy is checked in a fresh
interpreter by tests/test_checkpoint.py::test_load_from_hub_cache_offline.)"""

import acs_hf


def test_every_exported_name_resolves():
    assert sorted(acs_hf.__all__) == sorted(acs_hf._MODULE_OF)  # one list, no name forgotten
    for name in acs_hf.__all__:
        assert getattr(acs_hf, name) is not None, name
    assert set(acs_hf.__all__) <= set(dir(acs_hf))


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'ACSTrainr'"):
        acs_hf.ACSTrainr  # noqa: B018


def test_the_onnx_helpers_are_exported_together():
    """Issue 37: the README announces acs_hf.onnx_speedup and acs_hf.compare_with_float beside the other
    ONNX helpers; they lived only in acs_hf.quantization."""
    from acs_hf import quantization

    for name in ("export_onnx", "onnx_session", "integer_kernel_counts", "onnx_speedup", "compare_with_float",
                 "onnx_accuracy"):  # fmt: skip
        assert name in acs_hf.__all__ and getattr(acs_hf, name) is getattr(quantization, name), name
