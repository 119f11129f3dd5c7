"""The end-to-end job behind ``recipes/run_acs.py``: data -> FP model (optional warm-up) -> teacher
and quantized student -> ACS QAT -> evaluation -> packed checkpoint, model card, optional Hub push."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, TrainingArguments

from ..data.loading import DIGITS, ImageDatasets, class_names, detect_columns, load_image_datasets, prepare_datasets
from ..integrations.hub import HubPushError, base_model_id, push_folder_to_hub, write_model_card
from ..integrations.models import check_model_name, create_model, image_processor_for, model_size_kwargs
from ..integrations.weights import describe_weights, load_weights
from ..layout import RunLayout
from ..metrics import make_compute_metrics, preprocess_logits_for_metrics
from ..quantization import QuantConfig, quantize_model, save_quantized
from ..selection import check_coreset
from ..training.arguments import ACSArguments
from ..training.checkpoint_state import quantization_settings
from ..training.checkpoints import load_resumed_warmup
from ..training.consistency import broadcast_module_state
from ..training.qat_trainer import ImageClassificationTrainer
from ..training.trainer import ACSTrainer
from ..utils.io import atomic_write, atomic_write_json
from .arguments import DataArguments, ModelArguments, RunArguments
from .checks import output_dir_lock, preflight, set_aside_previous_run
from .deploy import ONNX_CARD_ROWS, export_and_evaluate
from .resume_checks import check_resume_quantization, check_resume_start

__all__ = ["run_acs", "prepare_run_data", "default_output_dir", "save_student"]

logger = logging.getLogger(__name__)


def default_output_dir(model_args: ModelArguments, quant_args: QuantConfig, acs_args: ACSArguments) -> str:
    model = Path(model_args.model_name.split(":")[-1]).name
    acts = quant_args.act_bits if quant_args.act_bits is not None else 32
    return os.path.join(
        "outputs",
        f"{model}-w{quant_args.weight_bits}a{acts}-{acs_args.selection_method}{round(acs_args.fraction * 100)}",
    )


def _fp_trainer(model, datasets_, training_args: TrainingArguments, compute_metrics, **overrides):
    """Plain supervised training/evaluation of the FP model (no quantization code), under ``fp_warmup/``."""
    args = dataclasses.replace(
        training_args,
        output_dir=str(RunLayout(training_args.output_dir).fp_warmup),
        save_strategy="no",
        eval_strategy="no",
        push_to_hub=False,
        load_best_model_at_end=False,
        resume_from_checkpoint=None,
        **overrides,
    )
    return ImageClassificationTrainer(model=model, args=args, **_data_and_metrics(datasets_, compute_metrics))


def _data_and_metrics(datasets_, compute_metrics) -> dict[str, Any]:
    """The Trainer arguments every trainer of the run shares."""
    return dict(
        train_dataset=datasets_.train_dataset,
        eval_dataset=datasets_.eval_dataset,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )


def _warmup(model, datasets_, training_args: TrainingArguments, model_args: ModelArguments, compute_metrics):
    """Plain FP training on all data for users without pretrained weights."""
    trainer = _fp_trainer(
        model,
        datasets_,
        training_args,
        compute_metrics,
        num_train_epochs=model_args.fp_warmup_epochs,
        learning_rate=model_args.fp_warmup_learning_rate or training_args.learning_rate,
    )
    logger.info(
        "FP warm-up: %s epochs on all %d training images", model_args.fp_warmup_epochs, len(datasets_.train_dataset)
    )
    trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model)


def run_acs(
    model_args: ModelArguments,
    data_args: DataArguments,
    qconfig: QuantConfig,
    acs_args: ACSArguments,
    training_args: TrainingArguments,
    run_args: RunArguments | None = None,
) -> dict[str, Any]:
    """Run the whole job; returns the final metrics and the paths of what it wrote.

    Checks everything it can before loading data, holds a lock on ``output_dir`` for the whole
    run, and ends the distributed process group when done (on every process): call it once per
    script.
    """
    run_args = run_args or RunArguments()
    for name in filter(None, (model_args.model_name, model_args.teacher_model_name)):
        check_model_name(name)
        model_size_kwargs(name, model_args.image_size)  # a size the model cannot take fails now
    model_args.check_start_weights()
    push, training_args.push_to_hub = training_args.push_to_hub, False  # we push the packed folder ourselves
    if training_args.device.type == "cpu":  # pinned memory needs an accelerator; torch warns at every loader
        training_args.dataloader_pin_memory = False
    if push and not training_args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (the repo to create or update)")
    if run_args.export_onnx:
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"--export_onnx needs {', '.join(missing)}: pip install 'acs_hf[onnx]'")
    teacher_cache_dir = acs_args.teacher_cache_dir if acs_args.cache_teacher_outputs else "memory"
    preflight(training_args, teacher_cache_dir, push, run_args.overwrite_output_dir)
    check_resume_quantization(training_args, qconfig)
    check_resume_start(training_args, model_args.start_settings())
    # One writer per folder: the global main process holds the lock (see output_dir_lock).
    with output_dir_lock(training_args.output_dir, enabled=training_args.process_index == 0):
        if run_args.overwrite_output_dir:  # under the lock: never under a run still writing there
            set_aside_previous_run(training_args)
        summary, trainer = _run(model_args, data_args, qconfig, acs_args, training_args, push, run_args.export_onnx)
    # Last collective of the run, on every process; an exception above skips it on purpose: a
    # barrier would hang the failed run, and the launcher stops the other processes instead.
    trainer.end()
    return summary


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()  # only an empty folder; one another process removed first is fine too
    except OSError:
        pass


def prepare_run_data(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> tuple[ImageDatasets, torch.nn.Module]:
    """Load and prepare the data and build the FP model, on each node's main process first.

    The other processes of the node wait, then find the main one's work in the ``datasets`` and
    Hub caches (downloads, arrow files, the ``--skip_bad_images`` check), instead of repeating it
    at the same time on the same files.
    """
    with training_args.main_process_first(local=True, desc="dataset preparation"):
        raw = load_image_datasets(
            data_args.dataset_name,
            data_args.dataset_config_name,
            data_args.train_dir,
            data_args.validation_dir,
            cache_dir=data_args.cache_dir,
            seed=training_args.seed,
        )
        image_column, label_column = detect_columns(raw["train"], data_args.image_column, data_args.label_column)
        names = class_names(raw["train"], label_column)
        torch.manual_seed(training_args.seed)
        fp_model = create_model(
            model_args.model_name, model_args.pretrained, len(names), model_args.image_size, dict(enumerate(names))
        )
        if model_args.pretrained_weights:
            load_weights(fp_model, model_args.pretrained_weights)
        ds = prepare_datasets(
            raw,
            fp_model,
            image_column,
            label_column,
            image_size=model_args.image_size,
            max_train_samples=data_args.max_train_samples,
            max_eval_samples=data_args.max_eval_samples,
            skip_bad_images=data_args.skip_bad_images,
            seed=training_args.seed,
            num_proc=data_args.preprocessing_num_workers,
            augmentation=data_args.augmentation(),
            score_image_size=data_args.score_image_size,
        )
    return ds, fp_model


def save_student(
    student: torch.nn.Module, out: Path, model_args: ModelArguments, qconfig: QuantConfig, ds: ImageDatasets
) -> None:
    """Save the quantized student so that ``acs_hf.load_quantized`` (timm students) and, after
    ``import acs_hf``, transformers' ``from_pretrained`` / ``pipeline`` load it: timm's config with
    the run's eval preprocessing and class names, or a transformers config plus the image
    processor that preprocesses as the run did."""
    if isinstance(student, PreTrainedModel):
        config = student.config.to_dict()
        config["architectures"] = [type(student).__name__]
        save_quantized(student, out, config=qconfig, model_config=config)
        processor = image_processor_for(model_args.model_name, ds.data_config, model_args.image_size)
        processor.save_pretrained(out)
        return
    model_kwargs = model_size_kwargs(model_args.model_name, model_args.image_size)  # rebuilt at this size
    save_quantized(
        student,
        out,
        model_args=dict(model_kwargs),
        config=qconfig,
        data_config=ds.data_config,
        label_names=list(ds.id2label.values()),
    )


def _run(
    model_args, data_args, qconfig, acs_args, training_args, push: bool, onnx: bool = False
) -> tuple[dict[str, Any], ACSTrainer]:
    ds, fp_model = prepare_run_data(model_args, data_args, training_args)
    selector = acs_args.create_selector()  # built once for the run, handed to the trainer
    if not selector.selects_all:  # an impossible coreset fails here, not after the warm-up
        check_coreset(len(ds.train_dataset), acs_args.fraction, ds.score_dataset.labels, selector.class_balanced)
    compute_metrics = make_compute_metrics(k=min(5, len(ds.id2label)))
    teacher = _teacher(model_args, list(ds.id2label.values()))  # a teacher of its own fails before the warm-up
    if model_args.fp_warmup_epochs > 0:
        fp_model = _warm_model(fp_model, ds, training_args, model_args, compute_metrics)
    teacher = teacher if teacher is not None else copy.deepcopy(fp_model)  # a Module's truth is its len() for some
    student = quantize_model(copy.deepcopy(fp_model), qconfig)

    trainer = ACSTrainer(
        model=student,
        args=training_args,
        acs_args=acs_args,
        teacher_model=teacher,
        selector=selector,
        score_dataset=ds.score_dataset,
        data_fingerprint=ds.fingerprint,
        **_data_and_metrics(ds, compute_metrics),
    )
    trainer.checkpointer.quantization = quantization_settings(qconfig)  # recorded in checkpoints, checked on resume
    trainer.checkpointer.start = model_args.start_settings()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_metrics("train", train_result.metrics)
    out, onnx_metrics = Path(training_args.output_dir), {}
    if trainer.is_world_process_zero():  # the trained model is safe before evaluation, card or push can fail
        student = trainer.accelerator.unwrap_model(trainer.model)
        save_student(student, out, model_args, qconfig, ds)
        if onnx:  # export and ONNX evaluation on process 0 alone; the others wait in _evaluate's broadcast
            onnx_metrics = export_and_evaluate(student, fp_model, ds, trainer, qconfig.integer_graph)
    metrics = _evaluate(trainer, teacher, ds, training_args, compute_metrics, onnx_metrics)

    summary: dict[str, Any] = {"output_dir": str(out), "metrics": metrics}
    if trainer.is_world_process_zero():  # one writer for the shared output folder
        run = (model_args, data_args, qconfig, acs_args, training_args)
        summary.update(_publish(out, trainer, ds, fp_model, metrics, run, push, onnx))
        atomic_write_json(RunLayout(out).summary, summary)
    return summary, trainer


def _warm_model(fp_model, ds, training_args: TrainingArguments, model_args: ModelArguments, compute_metrics):
    """The FP model after its warm-up: the interrupted run's when resuming, else trained (and saved) now."""
    warm = RunLayout(training_args.output_dir).fp_warmup / RunLayout.WEIGHTS
    if training_args.resume_from_checkpoint and load_resumed_warmup(fp_model, training_args):
        return fp_model  # the teacher and the QAT starting point must be the model the interrupted run used
    fp_model = _warmup(fp_model, ds, training_args, model_args, compute_metrics)
    if training_args.process_index == 0:
        state = {k: v.detach().cpu().contiguous() for k, v in fp_model.state_dict().items()}
        atomic_write(warm, lambda tmp: save_file(state, tmp))
    return fp_model


def _teacher(model_args: ModelArguments, names: list[str]) -> torch.nn.Module | None:
    """The teacher named by ``--teacher_model_name`` (None: the teacher is a copy of the FP model)."""
    if not model_args.teacher_model_name:
        return None
    weights = model_args.teacher_pretrained_weights
    teacher = create_model(model_args.teacher_model_name, not weights, len(names), model_args.image_size,
                           dict(enumerate(names)))  # fmt: skip
    return load_weights(teacher, weights, "teacher_pretrained_weights") if weights else teacher


def _evaluate(trainer: ACSTrainer, teacher, ds, training_args, compute_metrics, onnx_metrics) -> dict[str, Any]:
    """The quantized model's evaluation, with the FP teacher's accuracy (and model.onnx's) beside it."""
    # Every process evaluates the model process 0 saved: training leaves each its own BatchNorm statistics.
    broadcast_module_state(trainer.accelerator.unwrap_model(trainer.model))
    metrics = trainer.evaluate()
    fp_metrics = _fp_trainer(teacher, ds, training_args, compute_metrics, report_to=[]).evaluate(
        metric_key_prefix="fp_eval"
    )
    metrics.update({k: v for k, v in fp_metrics.items() if k in ("fp_eval_accuracy", "fp_eval_top5")}, **onnx_metrics)
    _remove_if_empty(RunLayout(training_args.output_dir).fp_warmup)  # the FP evaluation's Trainer made it
    trainer.save_metrics("eval", metrics)
    return metrics


def _publish(out: Path, trainer: ACSTrainer, ds, fp_model, metrics, run, push: bool, onnx: bool) -> dict[str, Any]:
    """Write the model card (and push the folder); returns what the summary records of them."""
    model_args, data_args, qconfig, acs_args, training_args = run
    fp32_bytes = sum(t.numel() * 4 for t in fp_model.state_dict().values() if t.is_floating_point())
    layout = RunLayout(out)
    ckpt_bytes = layout.weights.stat().st_size
    results = {
        "top-1 (quantized)": metrics.get("eval_accuracy"),
        "top-5 (quantized)": metrics.get("eval_top5"),
        "top-1 (FP teacher)": metrics.get("fp_eval_accuracy"),
        **{row: metrics[key] for key, row in ONNX_CARD_ROWS.items() if key in metrics},  # --export_onnx
        "training images per epoch": trainer.num_selected,
        "training set size": len(ds.train_dataset),
    }
    acs_settings = acs_args.settings(trainer.selector)
    acs_settings["num_train_epochs"] = training_args.num_train_epochs
    plot = layout.SELECTION_PLOT if layout.selection_plot.is_file() else None
    card = write_model_card(
        out,
        model_name=model_args.model_name,
        dataset_name=data_args.dataset_name or (data_args.train_dir and "imagefolder") or DIGITS,
        quant_config=qconfig.to_dict(),
        acs_settings=acs_settings,
        results=results,
        fp32_bytes=fp32_bytes,
        checkpoint_bytes=ckpt_bytes,
        plot_name=plot,
        base_model=base_model_id(model_args.model_name, model_args.pretrained),
        weights_source=describe_weights(model_args.pretrained_weights, model_args.teacher_pretrained_weights),
        library="transformers" if isinstance(fp_model, PreTrainedModel) else "timm",
        eval_split=ds.eval_split,
        image_size=ds.data_config["input_size"][-1],
        repo_id=training_args.hub_model_id,
    )
    published = {
        "checkpoint": str(out),
        "model_card": str(card),
        "selection_plot": str(out / plot) if plot else None,
        "selection_log": str(layout.selection_log) if layout.selection_log.is_file() else None,
        "onnx": str(layout.onnx) if onnx else None,
        "compression": fp32_bytes / ckpt_bytes,
    }
    if push:
        try:
            published["hub_url"] = push_folder_to_hub(
                out, training_args.hub_model_id, private=training_args.hub_private_repo, token=training_args.hub_token
            )
        except HubPushError as e:
            published["hub_error"] = str(e)
            logger.error("%s", e)
    return published
