import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import acs_hf.quantization.serialization as serialization
from acs_hf import QuantConfig, calibrate_quantizers, load_quantized, quantize_model, save_quantized
from acs_hf.quantization import pack_codes, unpack_codes

TINY = "test_resnet"  # timm's test-sized ResNet: every layer type of ResNet-18 at 3% of its size


def quantized(name=TINY, config=None, **kwargs):
    model = timm.create_model(name, num_classes=10, **kwargs)
    quantize_model(model, config or QuantConfig())
    calibrate_quantizers(model, [torch.randn(4, 3, 32, 32)])
    return model.eval()


def saved(tmp_path, name=TINY, config=None):
    config = config or QuantConfig()
    model = quantized(name, config)
    save_quantized(model, tmp_path, config=config)
    return model


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    slot = 2 if bits == 2 else 4 if bits <= 4 else 8
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * slot / 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_pack_layout_by_hand():
    # Two 4-bit codes per byte, low nibble first: [1, 2] -> 0x21; four 2-bit codes [3,0,1,2] -> 0b10_01_00_11.
    assert pack_codes(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack_codes(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10010011]


@pytest.mark.parametrize(
    ("name", "kwargs", "config"),
    [
        ("resnet18", {}, QuantConfig()),
        ("mobilenetv2_100", {}, QuantConfig(weight_bits=2, act_bits=None)),
        ("vit_tiny_patch16_224", {"img_size": 32}, QuantConfig(per_channel_weights=True)),
    ],
)
def test_save_load_round_trip(tmp_path, name, kwargs, config):
    model = quantized(name, config, **kwargs)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    save_quantized(model, tmp_path, config=config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_quantized(tmp_path)
    with torch.no_grad():
        assert (loaded(x) - ref).abs().max().item() <= 1e-4
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == name and cfg["num_classes"] == 10
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "acs_hf_lsq" and qc["format_version"] == 2
    assert "num_classes" not in cfg["model_args"]  # transformers' TimmWrapper passes it on its own
    assert qc["config"]["weight_bits"] == config.weight_bits
    layer = next(iter(qc["layers"].values()))
    assert {"weight_bits", "act_bits", "weight_signed", "act_signed", "per_channel"} <= set(layer)


def test_checkpoint_is_small(tmp_path):
    model = quantized("resnet18", QuantConfig(weight_bits=4, act_bits=4, first_last_bits=8))
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    save_quantized(model, tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    # 4-bit codes: at least 6x below fp32 even with the FP BN/bias tensors of this 10-class model.
    assert fp32_bytes / size > 6


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = quantized()
    save_quantized(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("interrupted mid-save")

    monkeypatch.setattr(serialization, "save_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left either


def test_corrupt_and_foreign_checkpoints_rejected(tmp_path):
    saved(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_quantized(tmp_path)
    weights.write_bytes(data)

    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["quant_method"] = "gptq"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown quant_method 'gptq'"):
        load_quantized(tmp_path)

    cfg["quantization_config"]["quant_method"] = "acs_hf_lsq"
    cfg["quantization_config"]["checkpoint_id"] = "another-save"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="different saves"):
        load_quantized(tmp_path)

    cfg_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quantized(tmp_path)
    cfg_path.unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_quantized(tmp_path)


def test_save_requires_calibrated_timm_model(tmp_path):
    model = timm.create_model(TINY, num_classes=10)
    with pytest.raises(ValueError, match="quantize_model"):
        save_quantized(model, tmp_path)
    quantize_model(model, QuantConfig())
    with pytest.raises(RuntimeError, match="calibrate_quantizers"):
        save_quantized(model, tmp_path)


@pytest.mark.slow
def test_load_from_hub_cache_offline(tmp_path):
    """A Hub id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1 (no network), in a fresh
    interpreter that never imports transformers, accelerate or datasets."""
    model = quantized()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--resnet18-w4a4"
    save_quantized(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    torch.save(x, tmp_path / "x.pt")
    torch.save(ref, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from acs_hf import load_quantized
        m = load_quantized("someone/resnet18-w4a4")
        x, ref = torch.load({str(tmp_path / "x.pt")!r}), torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            assert (m(x) - ref).abs().max().item() <= 1e-4
        import sys  # loading needs neither transformers nor accelerate (acs_hf imports lazily)
        assert not set(("transformers", "accelerate", "datasets")) & set(sys.modules), sorted(sys.modules)
        print("OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK" in out.stdout


def _edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_edited_bits_rejected_naming_the_layer(tmp_path):
    """config.json says 2 bits where 4 were saved: an error, never a silently different model."""
    saved(tmp_path)

    def to_2_bits(cfg):
        cfg["quantization_config"]["config"]["weight_bits"] = 2
        for layer in cfg["quantization_config"]["layers"].values():
            if layer["weight_bits"] == 4:
                layer["weight_bits"] = 2

    _edit_config(tmp_path, to_2_bits)
    with pytest.raises(ValueError, match="layer table does not match"):
        load_quantized(tmp_path)


def test_packed_length_and_code_range_checked(tmp_path):
    """Without the layer digest (an older or hand-made file), the codes themselves are checked."""

    saved(tmp_path)
    weights = tmp_path / "model.safetensors"
    with safe_open(weights, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(weights)
    meta.pop("layers_sha256")
    save_file(tensors, weights, metadata=meta)
    cfg = json.loads((tmp_path / "config.json").read_text())
    name = next(n for n, v in cfg["quantization_config"]["layers"].items() if v["weight_bits"] == 4)

    def set_bits(bits):
        def edit(c):
            c["quantization_config"]["layers"][name]["weight_bits"] = bits

        return edit

    _edit_config(tmp_path, set_bits(2))  # 4 codes per byte expected, 2 stored: wrong length
    with pytest.raises(ValueError, match=f"layer '{name}'.*packed bytes"):
        load_quantized(tmp_path)
    _edit_config(tmp_path, set_bits(3))  # same byte layout, but codes above 7 cannot be 3-bit
    codes = unpack_codes(tensors[name + ".weight"], 4, 10**9)
    assert int(codes.max()) > 7  # a calibrated 4-bit layer uses the upper codes
    with pytest.raises(ValueError, match=f"layer '{name}'.*exceeds the 3-bit range"):
        load_quantized(tmp_path)
    _edit_config(tmp_path, set_bits(9))
    with pytest.raises(ValueError, match=f"layer '{name}'.*weight_bits must be an integer in 2..8, got 9"):
        load_quantized(tmp_path)


def test_mismatched_layers_rejected(tmp_path):
    saved(tmp_path)

    def rename(cfg):
        layers = cfg["quantization_config"]["layers"]
        layers["no.such.layer"] = layers.pop(next(iter(layers)))

    _edit_config(tmp_path, rename)
    with pytest.raises(ValueError, match="layer table does not match|'no.such.layer'"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg", "cache_dir"])
def test_model_args_restricted_to_architecture_keys(tmp_path, key):
    saved(tmp_path)
    target = tmp_path / "elsewhere.pth"
    _edit_config(tmp_path, lambda cfg: cfg.setdefault("model_args", {}).update({key: str(target)}))
    with pytest.raises(ValueError, match=f"model_args has keys \\['{key}'\\].*accepted"):
        load_quantized(tmp_path)


def test_format_version_and_map_location(tmp_path):
    saved(tmp_path)
    model = load_quantized(tmp_path, map_location="meta")
    assert next(model.parameters()).device.type == "meta"
    _edit_config(tmp_path, lambda cfg: cfg["quantization_config"].update(format_version=99))
    with pytest.raises(ValueError, match="format_version 99.*reads 2"):
        load_quantized(tmp_path)


def test_format_1_checkpoints_still_load(tmp_path):
    """Format 1 (quant_method 'lsq', codes under '<layer>.weight_codes') converted by hand from a
    format 2 save loads to the same logits."""
    model = quantized()
    save_quantized(model, tmp_path)
    weights, cfg_path = tmp_path / "model.safetensors", tmp_path / "config.json"
    with safe_open(weights, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(weights)
    cfg = json.loads(cfg_path.read_text())
    layers = cfg["quantization_config"]["layers"]
    for name in layers:
        tensors[name + ".weight_codes"] = tensors.pop(name + ".weight")
    for key in ("architecture_config", "tensors_sha256"):  # recorded since format 2
        meta.pop(key)
    save_file(tensors, weights, metadata={**meta, "quant_method": "lsq"})
    cfg["quantization_config"].update(quant_method="lsq", format_version=1)
    cfg_path.write_text(json.dumps(cfg))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path)(x), model.eval()(x))
    cfg["quantization_config"]["format_version"] = 2  # 'lsq' is format 1 only
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 2 with quant_method 'lsq'"):
        load_quantized(tmp_path)


def test_the_same_model_saves_to_the_same_bytes(tmp_path):
    """Issue 31: two saves of one model (as two runs of the same command and seed save it) wrote
    different bytes: a random checkpoint id, and safetensors' metadata in hash-map order. The id now
    comes from the content, so another model gets another id, and the files pair as before."""
    model = quantized()
    for folder in ("a", "b"):
        save_quantized(model, tmp_path / folder, config=QuantConfig())
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    data = (tmp_path / "a" / "model.safetensors").read_bytes()
    metadata = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    assert list(metadata) == sorted(metadata)  # the keys as written: sorted
    assert metadata["checkpoint_id"] == json.loads((tmp_path / "a" / "config.json").read_text())[
        "quantization_config"]["checkpoint_id"]  # fmt: skip

    with torch.no_grad():
        model.fc.bias.add_(1.0)  # the same layers and table, one other tensor
    save_quantized(model, tmp_path / "c", config=QuantConfig())
    ids = [json.loads((tmp_path / f / "config.json").read_text())["quantization_config"]["checkpoint_id"]
           for f in ("a", "c")]  # fmt: skip
    assert ids[0] != ids[1]
    loaded = load_quantized(tmp_path / "c")
    assert torch.equal(loaded.fc.bias, model.fc.bias)
