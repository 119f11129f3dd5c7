"""Every timm family through the whole recipe at a small image size: FP warm-up, scoring,
selection, QAT, evaluation, save, and a reload whose logits equal the trained model's."""

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import acs_hf.run.recipe
from acs_hf import QuantConv2d, QuantLinear, load_quantized

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO = str(RECIPES / "configs" / "digits_demo.yaml")

# One model per family: timm's test-sized variant where there is one, else the smallest real one.
FAMILIES = {
    "ResNet": "test_resnet",
    "MobileNet": "mobilenetv3_small_050",
    "EfficientNet": "test_efficientnet",
    "ConvNeXt": "test_convnext",
    "RegNet": "regnetx_002",
    "CifarResNet": "cifar_resnet20",
    "ViT": "test_vit",
    "DeiT": "deit_tiny_patch16_224",
    "Swin": "swin_tiny_patch4_window7_224",
}
IMAGE_SIZE = 32


@pytest.mark.slow
@pytest.mark.parametrize("model_name", FAMILIES.values(), ids=FAMILIES.keys())
def test_family_through_the_recipe(recipe, tmp_path, monkeypatch, model_name):
    saved = {}
    save = acs_hf.run.recipe.save_quantized

    def keep(model, directory, **kwargs):  # the trained model, as it was saved
        saved["model"] = model
        return save(model, directory, **kwargs)

    monkeypatch.setattr(acs_hf.run.recipe, "save_quantized", keep)
    argv = [DEMO, "--output_dir", str(tmp_path), "--model_name", model_name, "--image_size", str(IMAGE_SIZE),
            "--max_train_samples", "48", "--max_eval_samples", "16", "--fp_warmup_epochs", "1",
            "--num_train_epochs", "1", "--fraction", "0.25", "--per_device_train_batch_size", "8"]  # fmt: skip
    summary = recipe.main(argv)
    assert 0 <= summary["metrics"]["eval_accuracy"] <= 1
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    trained = saved["model"].eval()
    reloaded = load_quantized(tmp_path)
    with torch.no_grad():
        assert (reloaded(x) - trained(x)).abs().max().item() <= 1e-4
    linears = [m for m in reloaded.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, QuantLinear) for m in linears)  # every Linear quantized (ViT: qkv, mlp, head)
    convs = [m for m in reloaded.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, QuantConv2d) for m in convs)  # every conv (ViT: the patch embedding)


def test_fixed_size_model_refused_at_an_impossible_size_before_data(recipe, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the size was not checked before loading data")

    monkeypatch.setattr(acs_hf.run.recipe, "load_image_datasets", refuse)
    with pytest.raises(ValueError, match="model_name='deit_tiny_patch16_224' cannot run at image_size=8.*224x224"):
        recipe.main([DEMO, "--output_dir", str(tmp_path), "--model_name", "deit_tiny_patch16_224", "--image_size", "8"])


def test_cnn_sizes_pass_through_and_vit_pos_embed_follows():
    assert acs_hf.integrations.models.model_size_kwargs("resnet18", 32) == {}
    assert acs_hf.integrations.models.model_size_kwargs("deit_tiny_patch16_224", 224) == {}
    assert acs_hf.integrations.models.model_size_kwargs("deit_tiny_patch16_224", 64) == {"img_size": 64}
    model = acs_hf.integrations.models.create_model("deit_tiny_patch16_224", False, 10, 64)
    assert model.pos_embed.shape[1] == 1 + (64 // 16) ** 2
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 64, 64)
