"""Checkpoints written by the recipe load natively in transformers (``from_pretrained``,
``pipeline``), and transformers image models train as students. Offline, tiny models."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from test_recipe import TINY_RUN
from timm.data import create_transform, resolve_data_config
from transformers import (
    AutoModelForImageClassification,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

import acs_hf  # noqa: F401  (registers the quantizer with transformers)
from acs_hf import QuantConv2d, QuantLinear, load_quantized
from acs_hf.integrations.models import processor_data_config

ATOL = 1e-5


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory, recipe):
    out = tmp_path_factory.mktemp("timm_student")
    recipe.main([*TINY_RUN, "--output_dir", str(out), "--image_size", "24"])
    return out


def images(n: int, seed: int = 0) -> list[Image.Image]:
    """Non-square RGB images, so resizing and cropping matter."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 28, 3), dtype=np.uint8)) for i in range(n)]


def pipeline_probabilities(classify, image, names) -> torch.Tensor:
    out = classify(image, top_k=len(names))
    by_label = {o["label"]: o["score"] for o in out}
    return torch.tensor([by_label[n] for n in names], dtype=torch.float64)


@pytest.mark.slow
def test_timm_student_loads_with_from_pretrained_and_pipeline(timm_run):
    reference = load_quantized(timm_run)
    model = AutoModelForImageClassification.from_pretrained(timm_run)
    assert isinstance(model, TimmWrapperForImageClassification)
    assert not model.training
    quantized = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(quantized) == len([m for m in reference.modules() if isinstance(m, (QuantConv2d, QuantLinear))]) > 0
    x = torch.randn(4, 3, 24, 24)
    with torch.no_grad():
        ref = reference(x)
        assert (model(x).logits - ref).abs().max().item() <= ATOL
        # the quantized weights really are on the grid: w / step is an integer for every layer
        for m in quantized:
            q = m.weight / m.weight_quantizer.step.clamp_min(1e-8).view(-1, *[1] * (m.weight.dim() - 1))
            assert (q - q.round()).abs().max().item() < 1e-3

    # pipeline: the saved config carries the run's eval preprocessing (24x24) and class names
    config = json.loads((timm_run / "config.json").read_text())
    names = [str(i) for i in range(10)]
    assert config["label_names"] == names and config["pretrained_cfg"]["input_size"] == [3, 24, 24]
    classify = pipeline("image-classification", model=str(timm_run))
    eval_tf = create_transform(**resolve_data_config(model=reference), is_training=False)
    for image in images(3):
        with torch.no_grad():
            expected = reference(eval_tf(image).unsqueeze(0)).double().softmax(-1)[0]
        assert (pipeline_probabilities(classify, image, names) - expected).abs().max().item() <= ATOL


@pytest.mark.slow
def test_without_acs_hf_transformers_refuses_the_checkpoint(timm_run):
    """A fresh interpreter that never imports acs_hf: an error, not a model with missing weights."""
    code = (
        "import sys\n"
        "from transformers import AutoModelForImageClassification\n"
        f"AutoModelForImageClassification.from_pretrained({str(timm_run)!r})\n"
        "assert 'acs_hf' not in sys.modules\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "acs_hf_lsq" in result.stderr  # transformers' warning names the method
    assert "ignore_mismatched_sizes" in result.stderr  # and loading stops on the packed weights
    # Issue 31: transformers prints nothing of the config but sends the user to it; the block it names
    # says to import acs_hf first (under a key that sorts first, also where transformers sorts keys).
    assert "delete the quantization_config attribute in config.json" in result.stderr
    block = json.loads((timm_run / "config.json").read_text())["quantization_config"]
    assert min(block) == "acs_hf_loading" and block["acs_hf_loading"].startswith("Load with `import acs_hf` first")
    assert "do not delete this block" in block["acs_hf_loading"]
    card = (timm_run / "README.md").read_text()
    assert card.split("```python\n")[1].startswith("import acs_hf")  # the usage snippet's first line
    assert "wrong fix: import acs_hf first" in " ".join(card.split())


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    """A tiny random transformers ViT saved with its image processor: what a user has locally."""
    folder = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, recipe, vit_folder):
    out = tmp_path_factory.mktemp("vit_student")
    argv = [*TINY_RUN, "--output_dir", str(out), "--model_name", str(vit_folder), "--pretrained"]
    summary = recipe.main(argv)
    return out, summary


def test_processor_data_config_matches_the_processor(vit_folder):
    processor = ViTImageProcessor.from_pretrained(vit_folder)
    config = processor_data_config(processor)
    assert config["input_size"] == (3, 32, 32) and config["crop_mode"] == "squash" and config["crop_pct"] == 1.0
    tf = create_transform(**config, is_training=False)
    for image in images(3):
        ours = tf(image)
        theirs = processor(image, return_tensors="pt")["pixel_values"][0]
        assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_transformers_vit_student_trains_saves_and_reloads(vit_run, vit_folder):
    out, summary = vit_run
    assert 0 <= summary["metrics"]["eval_accuracy"] <= 1
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "vit" and config["quantization_config"]["quant_method"] == "acs_hf_lsq"
    layers = config["quantization_config"]["layers"]
    # patch embedding and classifier quantized as first/last layers (8 bits), the blocks at 4
    assert layers["vit.embeddings.patch_embeddings.projection"]["weight_bits"] == 8
    assert layers["classifier"]["weight_bits"] == 8
    assert layers["vit.layers.0.attention.q_proj"]["weight_bits"] == 4
    assert (out / "preprocessor_config.json").is_file()

    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, ViTForImageClassification)
    assert isinstance(model.vit.embeddings.patch_embeddings.projection, QuantConv2d)
    # the same folder through load_quantized with a float ViT of the saved architecture
    float_config = ViTConfig(**{k: v for k, v in config.items() if k != "quantization_config"})
    reference = load_quantized(out, model=ViTForImageClassification(float_config))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = reference(x).logits
        assert (model(x).logits - ref).abs().max().item() <= ATOL

    classify = pipeline("image-classification", model=str(out))
    names = [str(i) for i in range(10)]
    tf = create_transform(**processor_data_config(ViTImageProcessor.from_pretrained(vit_folder)), is_training=False)
    for image in images(2):
        with torch.no_grad():
            expected = reference(tf(image).unsqueeze(0)).logits.double().softmax(-1)[0]
        assert (pipeline_probabilities(classify, image, names) - expected).abs().max().item() <= ATOL

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "w4a4" in card.data.tags


def test_load_quantized_explains_a_transformers_checkpoint(vit_run):
    out, _ = vit_run
    with pytest.raises(ValueError, match="'vit' model.*model=.*from_pretrained"):
        load_quantized(out)


def test_transformers_model_names_and_sizes(vit_folder):
    from acs_hf.integrations.models import create_model, is_transformers_name

    assert is_transformers_name(str(vit_folder)) and not is_transformers_name("resnet18")
    assert is_transformers_name("google/vit-base-patch16-224") and not is_transformers_name("hf-hub:timm/x")
    with pytest.raises(ValueError, match="built for 32x32; image_size=64"):
        create_model(str(vit_folder), True, 10, image_size=64)
    model = create_model(str(vit_folder), False, 10, image_size=64)  # random init may change size
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    assert model(torch.randn(1, 3, 64, 64)).logits.shape == (1, 10)


@pytest.mark.slow
@pytest.mark.parametrize("first", ["acs_hf", "transformers"])
def test_registration_whichever_is_imported_first(first):
    """``import acs_hf`` registers the quantizer whether transformers' registry is imported
    before it or after it (then on the registry's own import, without acs_hf importing torch)."""
    imports = ["import acs_hf", "import transformers.quantizers.auto"]
    if first == "transformers":
        imports.reverse()
    code = "\n".join(
        [
            "import sys",
            imports[0],
            "assert 'torch' not in sys.modules or 'transformers' in sys.modules",
            imports[1],
            "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING",
            # before we import it
            "assert AUTO_QUANTIZER_MAPPING['acs_hf_lsq'].__module__ == 'acs_hf.integrations.hf_quantizer'",
            "from acs_hf.integrations.hf_quantizer import LSQHfQuantizer, LSQQuantizationConfig",
            "assert AUTO_QUANTIZER_MAPPING['acs_hf_lsq'] is LSQHfQuantizer",
            "assert AUTO_QUANTIZATION_CONFIG_MAPPING['acs_hf_lsq'] is LSQQuantizationConfig",
            "print('OK')",
        ]
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("first", ["acs_hf", "transformers"])
def test_registration_failure_raises(first):
    """A registration that fails (here acs_hf's quantizer module cannot be imported) raises an
    ImportError saying so in either import order, instead of a warning and a from_pretrained that
    cannot read acs_hf checkpoints."""
    imports = ["import acs_hf", "import transformers.quantizers.auto"]
    if first == "transformers":
        imports.reverse()
    code = "\n".join(
        [
            "import sys",
            "sys.modules['acs_hf.integrations.hf_quantizer'] = None  # its import now fails",
            imports[0],
            "for attempt in range(2):  # a retried import (a notebook's next cell) raises again",
            "    try:",
            f"        {imports[1]}",
            "    except ImportError as e:",
            "        print('RAISED', e)",
        ]
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    raised = [line for line in result.stdout.splitlines() if line.startswith("RAISED")]
    assert len(raised) == 2, result.stdout
    assert all("acs_hf could not register its quantizer with transformers" in line for line in raised), raised


@pytest.mark.slow
def test_a_probe_before_the_import_leaves_the_hook_in_place():
    """``importlib.util.find_spec`` of the registry (as some libraries probe) before its import does
    not use up the hook: the real import still registers."""
    code = "\n".join(
        [
            "import importlib.util",
            "import acs_hf",
            "assert importlib.util.find_spec('transformers.quantizers.auto') is not None",
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING",
            "assert 'acs_hf_lsq' in AUTO_QUANTIZER_MAPPING",
            "print('OK')",
        ]
    )
    result = _run_python(code)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_hook_that_cannot_run_raises():
    """When the registry's spec has no loader that executes it (another import system in the way),
    the hook refuses at the registry's import rather than letting it import unregistered."""
    code = "\n".join(
        [
            "import importlib.machinery, sys",
            "import acs_hf",
            "class Legacy:",
            "    def load_module(self, name): raise AssertionError('never loaded')",
            "class Finder:",
            "    def find_spec(self, name, path, target=None):",
            "        if name == 'transformers.quantizers.auto':",
            "            return importlib.machinery.ModuleSpec(name, Legacy())",
            "sys.meta_path.insert(1, Finder())  # behind acs_hf's hook, ahead of the file finder",
            "try:",
            "    import transformers.quantizers.auto",
            "except ImportError as e:",
            "    print('RAISED', e)",
        ]
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RAISED acs_hf cannot register its quantizer: transformers.quantizers.auto has no loader" in result.stdout


def test_from_pretrained_with_a_hub_id_from_the_cache(timm_run, tmp_path):
    """A Hub repo id resolved from a pre-filled cache (offline): the same model as the folder."""
    commit = "0" * 40
    snapshot = tmp_path / "hub" / "models--someone--resnet-w4a4" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((timm_run / name).read_bytes())
    (tmp_path / "hub" / "models--someone--resnet-w4a4" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--resnet-w4a4" / "refs" / "main").write_text(commit)
    model = AutoModelForImageClassification.from_pretrained("someone/resnet-w4a4", cache_dir=tmp_path / "hub")
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert (model(x).logits - load_quantized(timm_run)(x)).abs().max().item() <= ATOL


def test_edited_config_is_named_before_loading(timm_run, tmp_path):
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((timm_run / "model.safetensors").read_bytes())
    config = json.loads((timm_run / "config.json").read_text())
    name = next(iter(config["quantization_config"]["layers"]))
    config["quantization_config"]["layers"][name]["weight_bits"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer table does not match"):
        AutoModelForImageClassification.from_pretrained(folder)


@pytest.mark.slow
def test_transformers_teacher_for_a_timm_student(recipe, vit_folder, tmp_path):
    """Distillation and scoring read the teacher's ``.logits``: a transformers ViT teaches a timm ResNet."""
    out = tmp_path / "out"
    argv = [*TINY_RUN, "--output_dir", str(out), "--teacher_model_name", str(vit_folder), "--image_size", "32"]
    summary = recipe.main(argv)
    records = [json.loads(line) for line in (out / "acs_selection.jsonl").read_text().splitlines()]
    assert records and all(np.isfinite(r["ds_mean"]) and r["ds_mean"] > 0 for r in records)  # DS needs the teacher
    assert 0 <= summary["metrics"]["eval_accuracy"] <= 1
    assert isinstance(load_quantized(out), torch.nn.Module)
