import pytest
import timm
import torch
from huggingface_hub import ModelCard

from acs_hf import QuantConfig, calibrate_quantizers, load_quantized, quantize_model, save_quantized
from acs_hf.integrations.hub import UPLOAD_IGNORE, HubPushError, base_model_id, push_folder_to_hub, write_model_card


@pytest.fixture
def folder(tmp_path):
    model = quantize_model(timm.create_model("test_resnet", num_classes=10), QuantConfig())
    calibrate_quantizers(model, [torch.randn(2, 3, 32, 32)])
    save_quantized(model, tmp_path)
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")
    write_model_card(
        tmp_path,
        model_name="resnet18.tv_in1k",
        dataset_name="ILSVRC/imagenet-1k",
        quant_config=QuantConfig().to_dict(),
        acs_settings={"selection_method": "acs", "fraction": 0.1},
        results={"top-1 (quantized)": 0.6839, "top-5 (quantized)": 0.8812},
        fp32_bytes=46_000_000,
        checkpoint_bytes=6_000_000,
        plot_name="acs_selection.png",
        base_model=base_model_id("resnet18.tv_in1k"),
        repo_id="me/resnet18-w4a4-acs10",
    )
    return tmp_path


def test_base_model_ids():
    assert base_model_id("resnet18.tv_in1k") == "timm/resnet18.tv_in1k"
    assert base_model_id("resnet18") == timm.models.get_pretrained_cfg("resnet18").hf_hub_id  # timm's default tag
    assert base_model_id("hf-hub:me/my-resnet@v1") == "me/my-resnet"
    assert base_model_id("resnet18.tv_in1k", pretrained=False) is None  # trained from scratch: no base


def test_model_card_metadata(folder):
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm"
    assert {"quantized", "4-bit", "w4a4", "lsq", "acs", "coreset"} <= set(card.data.tags)
    assert card.data.base_model == "timm/resnet18.tv_in1k" and card.data.base_model_relation == "quantized"
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["accuracy"].metric_value == 68.39 and results["top_5_accuracy"].metric_value == 88.12
    assert (
        results["accuracy"].dataset_type == "ILSVRC/imagenet-1k" and results["accuracy"].dataset_split == "validation"
    )
    assert 'acs_hf.load_quantized("me/resnet18-w4a4-acs10")' in card.text
    assert card.data.datasets == ["ILSVRC/imagenet-1k"]
    assert card.data.metrics == ["accuracy"]
    assert "| top-1 (quantized) | 0.6839 |" in card.text
    assert "7.7x smaller" in card.text  # 46e6 / 6e6
    assert "![selection history](acs_selection.png)" in card.text


class StubApi:
    """Records calls instead of reaching the Hub (the only stub: no network here)."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if self.fail:
            raise ConnectionError("Hub unreachable")
        return type("Info", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


def test_push_creates_repo_and_uploads_folder(folder):
    api = StubApi()
    url = push_folder_to_hub(folder, "me/resnet18-w4a4", private=True, api=api)
    assert url.endswith("/commit/abc")
    (_, repo, kwargs), (_, upload) = api.calls
    assert repo == "me/resnet18-w4a4" and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert upload["folder_path"] == str(folder) and upload["repo_id"] == "me/resnet18-w4a4"
    assert "checkpoint-*" in upload["ignore_patterns"] == UPLOAD_IGNORE


def test_failed_push_keeps_local_checkpoint(folder):
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(HubPushError, match=f"intact at {folder}"):
        push_folder_to_hub(folder, "me/repo", api=StubApi(fail=True))
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    load_quantized(folder)  # still loads


def test_push_needs_a_saved_model(tmp_path):
    with pytest.raises(ValueError, match="model.safetensors"):
        push_folder_to_hub(tmp_path, "me/repo", api=StubApi())


def _card(directory, model_name, settings):
    write_model_card(
        directory,
        model_name=model_name,
        dataset_name="digits",
        quant_config=QuantConfig(weight_bits=2, act_bits=2).to_dict(),
        acs_settings=settings,
        results={"top-1 (quantized)": 0.9},
        fp32_bytes=8,
        checkpoint_bytes=1,
    )
    return ModelCard.load(directory / "README.md")


def test_card_of_a_random_baseline_says_so(tmp_path):
    """A random_dynamic run from a local folder: no local path, no ACS claim, only settings that act."""
    from acs_hf import ACSArguments

    local = tmp_path / "my_models" / "resnet18-digits"
    local.mkdir(parents=True)
    (local / "config.json").write_text('{"architecture": "resnet18", "num_classes": 10}')
    settings = ACSArguments(selection_method="random_dynamic", fraction=0.2).settings()
    card = _card(tmp_path, str(local), settings)
    assert card.text.strip().splitlines()[0] == "# resnet18 W2A2 (LSQ QAT, random_dynamic)"
    assert str(tmp_path) not in str(card) and card.data.model_name == "resnet18-w2a2-random_dynamic"
    assert "acs" not in card.data.tags and "coreset" in card.data.tags
    assert "A fresh random subset at every round" in card.text
    for absent in ("Adaptive Coreset", "adaptively", "evs_schedule", "cache_teacher_outputs",
                   "score_pool_fraction", "pip install acs_hf"):  # fmt: skip
        assert absent not in card.text, absent
    assert "| selection_interval | 10 |" in card.text and "| fraction | 0.2000 |" in card.text


def test_card_of_acs_and_of_full_data(tmp_path):
    from acs_hf import ACSArguments

    acs = _card(tmp_path, "hf-hub:timm/resnet18.a1_in1k", ACSArguments(selection_method="acs").settings())
    assert acs.text.strip().splitlines()[0] == "# resnet18.a1_in1k W2A2 (LSQ QAT, acs)"
    assert {"acs", "coreset"} <= set(acs.data.tags) and "Adaptive Coreset Selection" in acs.text
    assert "| evs_schedule | cosine |" in acs.text and "| cache_teacher_outputs | True |" in acs.text
    full = _card(tmp_path, "resnet18", ACSArguments(selection_method="full", fraction=1.0).settings())
    assert "all training data (plain QAT, no coreset)" in full.text and "coreset" not in full.data.tags
    assert "| fraction |" not in full.text and "## Coreset selection" not in full.text
