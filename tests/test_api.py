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
