import pytest
import timm
import torch
from huggingface_hub import ModelCard

from acs_hf import QuantConfig, calibrate_quantizers, load_quantized, quantize_model, save_quantized
from acs_hf.hub import UPLOAD_IGNORE, HubPushError, base_model_id, push_folder_to_hub, write_model_card


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
