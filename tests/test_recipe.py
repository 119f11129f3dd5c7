"""recipes/run_acs.py end to end on the embedded digits data (offline)."""

import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from acs_hf import load_quantized

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEMO = str(RECIPES / "configs" / "digits_demo.yaml")
#: A few-second run of the whole recipe with timm's test-sized ResNet.
TINY_RUN = ["--model_name", "test_resnet", "--max_train_samples", "64", "--max_eval_samples", "32",
            "--fp_warmup_epochs", "1", "--num_train_epochs", "1", "--fraction", "0.25"]  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, recipe):
    """The default demo config, shortened to a couple of epochs, with command-line overrides."""
    out = tmp_path_factory.mktemp("demo")
    argv = [DEMO, "--output_dir", str(out), "--num_train_epochs", "2", "--fp_warmup_epochs", "1",
            "--selection_interval", "1", "--fraction", "0.3", "--max_train_samples", "300",
            "--max_eval_samples", "120"]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = recipe.main(argv)
    return out, summary, caught


@pytest.mark.slow
def test_demo_outputs_present_and_reloadable(demo_run):
    out, summary, _ = demo_run
    for name in ("model.safetensors", "config.json", "README.md", "acs_selection.png", "acs_selection.jsonl",
                 "all_results.json", "eval_results.json"):  # fmt: skip
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "acs_selection.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]  # --selection_interval 1 override applied
    assert all(r["num_selected"] == round(0.3 * 300) for r in records)  # --fraction 0.3 override applied
    results = json.loads((out / "all_results.json").read_text())
    assert 0 <= results["eval_accuracy"] <= 1 and "eval_top5" in results
    model = load_quantized(out)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "timm" and card.data.datasets == ["digits"]
    assert "| selection_method | acs |" in card.text and "selection_temperature" not in card.text  # acs_gumbel's knob
    assert summary["compression"] > 6
    # The reloaded model reproduces the reported accuracy on the validation split.
    from acs_hf.data import digits_dataset, prepare_datasets

    ds = prepare_datasets(digits_dataset(), model, image_size=32, max_eval_samples=120, seed=0)
    x = torch.stack([ds.eval_dataset[i]["pixel_values"] for i in range(len(ds.eval_dataset))])
    y = torch.tensor([ds.eval_dataset[i]["labels"] for i in range(len(ds.eval_dataset))])
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(results["eval_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_cpu_run_asks_for_no_pinned_memory(demo_run):
    """Without an accelerator the recipe's data loaders do not pin memory (torch would warn at each one)."""
    _, _, caught = demo_run
    assert not [str(w.message) for w in caught if "pin_memory" in str(w.message)]


def test_no_argument_uses_embedded_default(recipe):
    model_args, data_args, quant_args, acs_args, training_args, _ = recipe.parse([])
    assert data_args.dataset_name == "digits" and model_args.fp_warmup_epochs > 0
    assert training_args.output_dir == "outputs/resnet18-w4a4-acs20"


def test_flags_without_config_extend_the_demo(recipe):
    model_args, data_args, quant_args, acs_args, training_args, _ = recipe.parse(
        ["--fraction", "0.5", "--output_dir", "x"]
    )
    assert acs_args.fraction == 0.5 and training_args.output_dir == "x"
    assert model_args.image_size == 32 and model_args.fp_warmup_epochs == 8  # the demo's settings


def test_flags_naming_a_dataset_start_from_defaults(recipe):
    model_args, data_args, quant_args, acs_args, training_args, _ = recipe.parse(
        ["--dataset_name", "uoft-cs/cifar100", "--model_name", "vit_tiny_patch16_224", "--weight_bits", "2"]
    )
    assert model_args.model_name == "vit_tiny_patch16_224" and quant_args.weight_bits == 2
    assert model_args.image_size is None and model_args.fp_warmup_epochs == 0 and acs_args.fraction == 0.1


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (["--model_name", "resnet1000"], ValueError, "model_name='resnet1000' is not a timm model"),
        (["--weight_bits", "9"], ValueError, "weight_bits must be an integer in 2..8, got 9"),
        (["--fraction", "0"], ValueError, "fraction must be a number in"),
        (["--label_column", "target"], ValueError, "label_column='target' is not a column"),
    ],
)
def test_bad_arguments_fail_fast(recipe, tmp_path, argv, error, message):
    with pytest.raises(error, match=message):
        recipe.main([DEMO, "--output_dir", str(tmp_path), *argv])
    assert not (tmp_path / "model.safetensors").exists()


def test_missing_validation_split(recipe, tmp_path):
    from PIL import Image

    for c in range(2):
        (tmp_path / "train" / str(c)).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / str(c) / "a.png")
    with pytest.raises(ValueError, match="no validation split"):
        recipe.main(
            [DEMO, "--dataset_name", "", "--train_dir", str(tmp_path / "train"), "--output_dir", str(tmp_path / "o")]
        )


def test_unknown_config_key(recipe, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fractionn: 0.3\n")
    with pytest.raises(SystemExit) as exit_info:
        recipe.parse([str(bad)])
    assert exit_info.value.code == 2  # argparse's usage error
    assert f"unknown keys in {bad}: fractionn" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("imagenet_resnet18_w4a4_acs10.yaml", {"fraction": 0.1, "selection_interval": 10, "learning_rate": 0.00125,
                                               "num_train_epochs": 120, "weight_bits": 4, "act_bits": 4}),
        ("cifar100_mobilenetv2_w2_acs10.yaml", {"fraction": 0.1, "selection_interval": 10, "weight_decay": 0.0005,
                                                "num_train_epochs": 200, "weight_bits": 2, "act_bits": None}),
    ],
)  # fmt: skip
def test_paper_configs_parse(recipe, config, expected):
    # use_cpu: bf16 needs it on a machine without a GPU.
    parsed = recipe.parse([str(RECIPES / "configs" / config), "--use_cpu", "true"])
    values = {k: v for obj in parsed for k, v in vars(obj).items()}
    for key, value in expected.items():
        assert values[key] == value, key
    assert values["bf16"] is True


@pytest.mark.slow
def test_resume_reuses_the_fp_warmup_model(recipe, tmp_path, monkeypatch):
    argv = [DEMO, "--output_dir", str(tmp_path), *TINY_RUN, "--num_train_epochs", "2", "--save_strategy", "epoch"]
    first = recipe.main(argv)
    assert (tmp_path / "fp_warmup" / "model.safetensors").is_file()
    checkpoint = sorted(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0]

    import acs_hf.integrations.models

    def no_warmup(*args, **kwargs):
        raise AssertionError("a resumed run must not train the FP model again")

    monkeypatch.setattr(acs_hf.run.recipe, "_warmup", no_warmup)
    resumed = recipe.main([*argv, "--resume_from_checkpoint", str(checkpoint)])
    # Same teacher as the interrupted run, and the same final student.
    assert resumed["metrics"]["fp_eval_accuracy"] == first["metrics"]["fp_eval_accuracy"]
    assert resumed["metrics"]["eval_accuracy"] == pytest.approx(first["metrics"]["eval_accuracy"], abs=0.02)


@pytest.fixture
def no_data(monkeypatch):
    """Fails the test if the run gets as far as loading data."""
    import acs_hf.integrations.models

    def refuse(*args, **kwargs):
        raise AssertionError("the bad argument was not caught before loading data")

    monkeypatch.setattr(acs_hf.run.recipe, "load_image_datasets", refuse)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_train_epochs", "0"], "num_train_epochs must be a finite number > 0"),
        (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be an integer >= 1, got 0"),
        (["--per_device_eval_batch_size", "-2"], "per_device_eval_batch_size must be an integer >= 1, got -2"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be an integer >= 1, got 0"),
        (["--dataloader_num_workers", "-1"], "dataloader_num_workers must be an integer >= 0, got -1"),
        (["--fp_warmup_epochs", "nan"], "fp_warmup_epochs must be a finite number >= 0, got nan"),
        (["--step_lr_scale", "inf"], "step_lr_scale must be a finite number > 0, got inf"),
        (
            ["--resume_from_checkpoint", "no/such/checkpoint-5"],
            "resume_from_checkpoint='no/such/checkpoint-5' does not",
        ),
        (["--resume_from_checkpoint", "true"], "resume_from_checkpoint=true but .* holds no complete checkpoint"),
        (["--teacher_cache_dir", "/proc/acs_cache"], "teacher_cache_dir='/proc/acs_cache' is not writable"),
        (["--push_to_hub", "true", "--hub_model_id", "me/x"], "needs the network, but HF_HUB_OFFLINE is set"),
    ],
)
def test_late_failures_fail_before_loading_data(recipe, tmp_path, no_data, argv, message):
    with pytest.raises(ValueError, match=message):
        recipe.main([DEMO, "--output_dir", str(tmp_path / "out"), *argv])


def test_missing_tracker_fails_before_loading_data(recipe, tmp_path, no_data, monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: [])
    with pytest.raises(ValueError, match=r"report_to=\['tensorboard'\] names trackers that are not installed"):
        recipe.main([DEMO, "--output_dir", str(tmp_path), "--report_to", "tensorboard"])


def test_yaml_null_fraction_is_a_clear_error(recipe, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("fraction: null\n")
    with pytest.raises(ValueError, match="fraction must be a number in \\(0, 1\\], got None"):
        recipe.parse([str(config)])


def test_folder_of_another_run_refused_unless_overwrite(recipe, tmp_path, no_data):
    (tmp_path / "model.safetensors").write_bytes(b"another run")
    with pytest.raises(ValueError, match="holds another run's results \\(model.safetensors\\)"):
        recipe.main([DEMO, "--output_dir", str(tmp_path)])
    with pytest.raises(AssertionError, match="not caught before loading data"):  # past the checks
        recipe.main([DEMO, "--output_dir", str(tmp_path), "--overwrite_output_dir", "true"])


def test_second_run_on_a_folder_refused_and_stale_lock_taken_over(recipe, tmp_path, no_data):
    import socket
    import subprocess
    import sys

    from acs_hf.run.checks import LOCK_NAME, RunInUseError

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "started": "now"}
        (tmp_path / LOCK_NAME).write_text(json.dumps(lock))
        with pytest.raises(RunInUseError, match=f"in use by another run \\(pid {holder.pid} on host"):
            recipe.main([DEMO, "--output_dir", str(tmp_path)])
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead now: its lock is stale and taken over (the run then gets past the checks).
    with pytest.raises(AssertionError, match="not caught before loading data"):
        recipe.main([DEMO, "--output_dir", str(tmp_path)])
    assert not (tmp_path / LOCK_NAME).exists()  # released even though the run failed


@pytest.mark.slow
def test_failed_push_keeps_the_model_and_exits_nonzero(recipe, tmp_path, monkeypatch):
    import acs_hf.integrations.models
    from acs_hf.integrations.hub import HubPushError

    def failing_push(directory, repo_id, **kwargs):
        raise HubPushError(f"push to {repo_id!r} failed (simulated); the checkpoint is intact at {directory}")

    monkeypatch.setattr(acs_hf.run.recipe, "push_folder_to_hub", failing_push)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(SystemExit) as exit_info:
        recipe.main([DEMO, "--output_dir", str(tmp_path), *TINY_RUN, "--push_to_hub", "true", "--hub_model_id", "me/x"])
    assert exit_info.value.code == 1
    summary = json.loads((tmp_path / "acs_summary.json").read_text())
    assert "simulated" in summary["hub_error"]
    load_quantized(tmp_path)  # the trained model is there and loads


def test_local_folder_student_and_teacher(recipe, tmp_path):
    """--model_name and --teacher_model_name as local timm folders (what hf-hub: ids resolve to)."""
    import timm
    from timm.models import save_for_hf

    teacher = timm.create_model("test_resnet", num_classes=10)
    save_for_hf(teacher, tmp_path / "teacher")
    save_for_hf(timm.create_model("test_resnet", num_classes=10), tmp_path / "student")
    import acs_hf.integrations.models

    built = acs_hf.integrations.models.create_model(str(tmp_path / "teacher"), True, 10)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), teacher.state_dict().values()))
    out = tmp_path / "out"
    summary = recipe.main([DEMO, "--output_dir", str(out), *TINY_RUN, "--model_name", str(tmp_path / "student"),
                           "--teacher_model_name", str(tmp_path / "teacher"), "--fp_warmup_epochs", "0"])  # fmt: skip
    assert summary["metrics"]["eval_accuracy"] >= 0
    assert load_quantized(out).pretrained_cfg["architecture"] == "test_resnet"
    assert not (out / "fp_warmup").exists()  # no warm-up: no empty folder left behind
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and "# test_resnet W4A4 (LSQ QAT, acs)" in card  # the architecture, no path


def test_hf_hub_model_name_accepted_without_network(recipe):
    from acs_hf.integrations.models import check_model_name

    check_model_name("hf-hub:timm/resnet18.a1_in1k")  # resolved by timm at creation, not here
    with pytest.raises(ValueError, match="not a timm model"):
        check_model_name("resnet_that_does_not_exist")


def test_empty_coreset_fails_before_the_warmup(recipe, tmp_path, monkeypatch):
    import acs_hf.integrations.models

    def no_warmup(*args, **kwargs):
        raise AssertionError("the empty coreset was not caught before the FP warm-up")

    monkeypatch.setattr(acs_hf.run.recipe, "_warmup", no_warmup)
    with pytest.raises(ValueError, match="fraction=0.001 of 64 samples selects no sample"):
        recipe.main([DEMO, "--output_dir", str(tmp_path), *TINY_RUN, "--fraction", "0.001"])
    # 0.1 of 64 digits: 6 slots per round for 10 classes, refused before the warm-up too
    with pytest.raises(ValueError, match="gives 6 slots per round for 10 classes"):
        recipe.main([DEMO, "--output_dir", str(tmp_path / "b"), *TINY_RUN, "--fraction", "0.1"])


def test_truncated_fp_warmup_model_is_named(tmp_path):
    import timm
    from safetensors.torch import save_file

    from acs_hf.training.checkpoints import load_warmup as _load_warmup

    model = timm.create_model("test_resnet", num_classes=3)
    path = tmp_path / "fp_warmup" / "model.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"FP warm-up model {path} is unreadable.*delete it"):
        _load_warmup(model, path)


def write_hub_schema(root: Path, schema: str) -> None:
    """Small local parquet datasets with the exact features and splits of two Hub datasets:
    ``ILSVRC/imagenet-1k`` (image, label with 1000 classes; train/validation/test, test labels -1)
    and ``uoft-cs/cifar100`` (img, fine_label, coarse_label; train/test)."""
    import io

    import datasets
    from PIL import Image

    def png(i: int) -> dict:
        buf = io.BytesIO()
        Image.new("RGB", (20, 16), color=(30 * (i % 4), 7 * i % 255, 90)).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    if schema == "imagenet":
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"n{i:08d}" for i in range(1000)])}
        )
        splits = {"train": 48, "validation": 16, "test": 8}
        rows = lambda split, i: {"image": png(i), "label": -1 if split == "test" else i % 4}  # noqa: E731
    else:
        features = datasets.Features({
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=[f"fine{i}" for i in range(100)]),
            "coarse_label": datasets.ClassLabel(names=[f"coarse{i}" for i in range(20)]),
        })  # fmt: skip
        splits = {"train": 48, "test": 16}
        rows = lambda split, i: {"img": png(i), "fine_label": i % 4, "coarse_label": 19 - i % 4}  # noqa: E731
    (root / "data").mkdir(parents=True)
    for split, n in splits.items():
        table = [rows(split, i) for i in range(n)]
        ds = datasets.Dataset.from_list(table, features=features)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))


@pytest.mark.slow
@pytest.mark.parametrize("schema, columns, eval_split", [("imagenet", ("image", "label"), "validation"),
                                                         ("cifar100", ("img", "fine_label"), "test")])  # fmt: skip
def test_hub_dataset_schemas_end_to_end(recipe, tmp_path, schema, columns, eval_split):
    """The recipe on local copies of the Hub schemas: columns detected, the labelled held-out split
    chosen (never ImageNet's unlabelled test split), trained, saved, carded."""
    from acs_hf.data import detect_columns, load_image_datasets

    data = tmp_path / schema
    write_hub_schema(data, schema)
    raw = load_image_datasets(str(data), cache_dir=str(tmp_path / "cache"))
    assert detect_columns(raw["train"]) == columns
    assert len(raw["validation"]) == 16 and raw["validation"].split == eval_split
    out = tmp_path / "out"
    argv = ["--dataset_name", str(data), "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out),
            "--image_size", "16", *TINY_RUN, "--max_train_samples", "48"]  # fmt: skip
    summary = recipe.main(argv)
    model = load_quantized(out)
    assert model.num_classes == (1000 if schema == "imagenet" else 100)
    assert 0 <= summary["metrics"]["eval_accuracy"] <= 1
    assert ModelCard.load(out / "README.md").data.datasets == [str(data)]


@pytest.mark.parametrize("null", ["null", "none", "None"])
def test_weights_only_from_the_command_line(recipe, null):
    """``--act_bits null`` used to fail in argparse (invalid int value: 'null'): weights only
    worked from YAML alone. Same for ``--first_last_bits``."""
    _, _, quant_args, _, training_args, _ = recipe.parse(["--act_bits", null, "--first_last_bits", null])
    assert quant_args.act_bits is None and quant_args.first_last_bits is None
    assert training_args.output_dir == "outputs/resnet18-w4a32-acs20"  # the default name of a weights-only run
    _, _, quant_args, _, _, _ = recipe.parse(["--act_bits", "3", "--output_dir", "x"])
    assert quant_args.act_bits == 3 and quant_args.first_last_bits == 8
    with pytest.raises(ValueError, match="QuantConfig.act_bits must be an integer in 2..8 or None, got 'four'"):
        recipe.parse(["--act_bits", "four", "--output_dir", "x"])


@pytest.fixture
def quick_lock(monkeypatch):
    """The output-dir lock's heartbeat and staleness shortened from 30 s / 300 s."""
    import acs_hf.run.checks as run_checks

    monkeypatch.setattr(run_checks, "HEARTBEAT_S", 0.05, raising=False)
    monkeypatch.setattr(run_checks, "STALE_AFTER_S", 0.5, raising=False)
    return run_checks


def test_lock_of_a_dead_run_on_another_host_taken_over(recipe, tmp_path, no_data, quick_lock, caplog):
    """A job requeued on another node used to be refused by its own dead predecessor's lock."""
    import logging

    lock = tmp_path / quick_lock.LOCK_NAME
    lock.write_text(json.dumps({"pid": 4242, "host": "node-that-died", "started": "yesterday"}))
    with caplog.at_level(logging.WARNING, logger="acs_hf.run.checks"):
        with pytest.raises(AssertionError, match="not caught before loading data"):  # past the lock
            recipe.main([DEMO, "--output_dir", str(tmp_path)])
    assert f"Taking over {lock} of pid 4242 on host node-that-died: not touched for 0 s" in caplog.text
    assert not lock.exists()


def test_live_run_on_another_host_keeps_its_lock(tmp_path, quick_lock):
    """A run elsewhere that touches its lock is not taken over; the error gives the command that frees it."""
    import re
    import threading

    lock = tmp_path / quick_lock.LOCK_NAME
    lock.write_text(json.dumps({"pid": 4242, "host": "node-alive", "started": "now"}))
    stop = threading.Event()

    def touch():  # the other host's run, alive
        while not stop.wait(0.05):
            lock.touch()

    beat = threading.Thread(target=touch)
    beat.start()
    try:
        with pytest.raises(
            quick_lock.RunInUseError, match=f"pid 4242 on host node-alive.*rm -f {re.escape(str(lock))}"
        ):
            with quick_lock.output_dir_lock(tmp_path):
                pass
    finally:
        stop.set()
        beat.join()
    assert json.loads(lock.read_text())["host"] == "node-alive"


def test_held_lock_is_touched_and_released_only_while_ours(tmp_path, quick_lock):
    import time

    lock = tmp_path / quick_lock.LOCK_NAME
    with quick_lock.output_dir_lock(tmp_path):
        first, deadline = lock.stat().st_mtime_ns, time.monotonic() + 5
        while lock.stat().st_mtime_ns == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.stat().st_mtime_ns != first  # the heartbeat
    assert not lock.exists()
    with quick_lock.output_dir_lock(tmp_path):
        lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "now"}))  # taken over meanwhile
    assert json.loads(lock.read_text())["host"] == "elsewhere"  # not ours to remove


@pytest.mark.slow
def test_export_onnx_flag_writes_a_model_onnxruntime_runs(recipe, tmp_path):
    """--export_onnx leaves model.onnx beside the checkpoint; ONNX Runtime gives the reloaded
    checkpoint's predictions on the run's validation images. The run records model.onnx's accuracy on
    those images and its agreement with PyTorch (eval_results.json, the model card)."""
    import onnxruntime as ort

    from acs_hf.data import digits_dataset, prepare_datasets

    out = tmp_path / "out"
    learns = ["--max_train_samples", "128", "--fp_warmup_epochs", "4", "--fp_warmup_learning_rate", "0.01",
              "--per_device_train_batch_size", "16"]  # fmt: skip
    summary = recipe.main([DEMO, "--output_dir", str(out), *TINY_RUN, *learns, "--export_onnx", "true"])
    assert summary["onnx"] == str(out / "model.onnx") and (out / "model.onnx").is_file()
    model = load_quantized(out).eval()
    ds = prepare_datasets(digits_dataset(), model, image_size=32, max_eval_samples=32, seed=0)
    x = torch.stack([ds.eval_dataset[i]["pixel_values"] for i in range(len(ds.eval_dataset))])
    labels = torch.tensor([ds.eval_dataset[i]["labels"] for i in range(len(ds.eval_dataset))])
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_logits = torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])
    with torch.no_grad():
        torch_logits = model(x)
    assert torch.equal(onnx_logits.argmax(1), torch_logits.argmax(1))
    # `learns`: a model that predicts many classes (TINY_RUN's gives one class to every image), so that
    # accuracy and agreement say something (44% and 100% when this was written, PyTorch's top-1 44%)
    assert len(torch_logits.argmax(1).unique()) >= 3
    # the run's own evaluation of model.onnx: every validation image, the same accuracy as computed here
    results = json.loads((out / "eval_results.json").read_text())
    assert results["onnx_eval_accuracy"] == (onnx_logits.argmax(1) == labels).double().mean().item()
    # An activation at a rounding tie may take the neighbouring code in ONNX Runtime (it sums convolutions in
    # another order), which can change the class of an image whose two best logits are that close: rare, so
    # nearly every image, not every one, must get PyTorch's class (all 32 did when this was written).
    assert results["onnx_agreement"] >= 0.9
    assert summary["metrics"]["onnx_eval_accuracy"] == results["onnx_eval_accuracy"]
    card = (out / "README.md").read_text()
    assert f"| top-1 (model.onnx in ONNX Runtime) | {results['onnx_eval_accuracy']:.4f} |" in card
    assert f"| top-1 agreement of model.onnx with PyTorch | {results['onnx_agreement']:.4f} |" in card
    # ONNX Runtime sums convolutions in another order: an activation at a rounding tie may take the
    # neighbouring code in an 8-bit layer (stem, classifier). Most images must agree to float rounding.
    close = ((onnx_logits - torch_logits).abs().amax(1) <= 1e-4).float().mean()
    assert close >= 0.9, f"only {close:.0%} of images agree within 1e-4"


@pytest.mark.slow
def test_integer_graph_run_exports_integer_kernels_and_logs_the_speed(recipe, tmp_path, caplog):
    """--integer_graph true: the checkpoint carries the output quantizers, and --export_onnx writes a model
    whose every convolution and residual addition ONNX Runtime runs as an integer kernel; the run says how
    fast it is against FP32 on this machine."""
    from acs_hf import integer_kernel_counts

    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="acs_hf.run"):
        recipe.main([DEMO, "--output_dir", str(out), *TINY_RUN, "--integer_graph", "true", "--export_onnx", "true"])
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["config"]["integer_graph"] is True and qcfg["format_version"] == 3 and qcfg["outputs"]
    counts = integer_kernel_counts(out / "model.onnx")  # test_resnet: 15 convolutions, 4 residual additions
    assert counts["conv"] == {"integer": 15, "float": 0} and counts["add"] == {"integer": 4, "float": 0}
    assert re.search(
        r"model\.onnx runs at \d+\.\d\dx the speed of the FP32 model .*15 of 15 convolutions, 4 of 4 additions",
        caplog.text,
    )


def test_export_onnx_needs_the_extra(recipe, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ValueError, match=r"--export_onnx needs onnxscript: pip install 'acs_hf\[onnx\]'"):
        recipe.main([DEMO, "--output_dir", str(tmp_path), *TINY_RUN, "--export_onnx", "true"])


def _checkpoint(folder: Path, quantization: dict | None = None, weights: dict | None = None) -> Path:
    """A checkpoint folder with what the resume checks read: the ACS state (and its recorded
    quantization settings) and, optionally, weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {"global_step": 5, **({"quantization": quantization} if quantization is not None else {})}
    (folder / "acs_state.json").write_text(json.dumps(state))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    if weights is not None:
        save_file(weights, folder / "model.safetensors")
    return folder


W4A4 = {"weight_bits": 4, "act_bits": 4, "first_last_bits": 8, "per_channel_weights": False, "exclude": [],
        "integer_graph": False}  # fmt: skip


def test_resume_with_other_quantization_settings_refused_before_loading_data(recipe, tmp_path, no_data):
    """Issue 37: a W4A4 checkpoint resumed at W8A8 ran to the end and saved a W8A8 config; one resumed
    with --integer_graph flipped failed in transformers' checkpoint loading, after the data and the
    calibration, naming no setting. Both are refused before any data is loaded, naming each change."""
    ckpt = _checkpoint(tmp_path / "old" / "checkpoint-5", W4A4)
    argv = [DEMO, "--output_dir", str(tmp_path / "new"), "--resume_from_checkpoint", str(ckpt)]
    changed = ["--weight_bits", "8", "--act_bits", "8", "--integer_graph", "true"]
    with pytest.raises(ValueError, match="other quantization settings") as refused:
        recipe.main([*argv, *changed])
    for expected in ("weight_bits: 4 in the checkpoint, 8 on the command line",
                     "act_bits: 4 in the checkpoint, 8 on the command line",
                     "integer_graph: False in the checkpoint, True on the command line"):  # fmt: skip
        assert expected in str(refused.value)
    assert "first_last_bits" not in str(refused.value)  # unchanged settings are not named
    with pytest.raises(AssertionError, match="not caught before loading data"):  # the same settings pass
        recipe.main([*argv, "--compile_kernels", "true"])  # kernels may change: same quantizers, same math


def test_resume_of_an_older_checkpoint_with_integer_graph_flipped_refused(recipe, tmp_path, no_data):
    """A checkpoint that records no settings (older versions, the ``full`` selector): its weights show
    whether it has output quantizers (--integer_graph)."""
    weights = {"conv1.weight": torch.zeros(1), "layer1.0.bn2.output_quantizer.step": torch.ones(1)}
    ckpt = _checkpoint(tmp_path / "old" / "checkpoint-5", weights=weights)
    argv = [DEMO, "--output_dir", str(tmp_path / "new"), "--resume_from_checkpoint", str(ckpt)]
    with pytest.raises(ValueError, match="integer_graph: True in the checkpoint, False on the command line"):
        recipe.main(argv)
    with pytest.raises(AssertionError, match="not caught before loading data"):
        recipe.main([*argv, "--integer_graph", "true"])
