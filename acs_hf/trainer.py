"""ACSTrainer: a ``transformers.Trainer`` that trains every round on a freshly selected coreset.

The Trainer builds its train dataloader once and fixes steps per epoch, the LR schedule and the
progress bar from its length. :class:`CoresetSampler` therefore has a fixed length,
``round(fraction * N)``, and only its contents change: at the start of epoch 0 and every
``selection_interval`` epochs a callback scores the whole training set (un-augmented view),
selects, and swaps the subset before the epoch's batches are drawn. The sampler's order is a
pure function of (seed, epoch, subset), so every process draws the same batches (accelerate
shards them) and a mid-epoch resume skips exactly the batches already trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ._io import atomic_save_npy, atomic_write, atomic_write_bytes
from .arguments import ACSArguments
from .quantization import LSQQuantizer, calibrate_quantizers, quantizers_initialized
from .scoring import TeacherCache, score_dataset
from .selection import coreset_size, create_selector, selection_generator

__all__ = ["ACSTrainer", "CoresetSampler", "subset_hash"]

logger = logging.getLogger(__name__)

STATE_NAME = "acs_state.json"
SUBSET_NAME = "acs_subset.npy"
SELECTOR_STATE_NAME = "acs_selector_subset.npy"
RECORD_NAME = "acs_selection.jsonl"
PLOT_NAME = "acs_selection.png"


def subset_hash(indices: torch.Tensor) -> str:
    """Short content hash of a subset (hex), equal on every process iff the subsets are equal."""
    return hashlib.sha256(indices.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


class CoresetSampler(Sampler[int]):
    """Fixed-length sampler over the current coreset, reshuffled by (seed, epoch).

    ``len()`` never changes, so the Trainer's step counts stay exact when the subset does.
    ``set_epoch`` is idempotent; the permutation depends only on (seed, epoch, subset).
    """

    def __init__(self, num_selected: int, seed: int) -> None:
        self.num_selected = num_selected
        self.seed = seed
        self.epoch = 0
        self.subset: torch.Tensor | None = None

    def set_subset(self, subset: torch.Tensor) -> None:
        if subset.numel() != self.num_selected:
            raise ValueError(f"subset has {subset.numel()} indices, the sampler is fixed at {self.num_selected}")
        self.subset = subset.to(torch.int64).cpu()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_selected

    def __iter__(self):
        if self.subset is None:
            raise RuntimeError("CoresetSampler: no subset selected yet (selection runs at on_epoch_begin)")
        g = selection_generator(self.seed, self.epoch)
        return iter(self.subset[torch.randperm(self.num_selected, generator=g)].tolist())


class _SelectionCallback(TrainerCallback):
    """Calibrates at train begin, selects at epoch begin, plots at train end (transformers calls
    ``on_epoch_begin`` before ``set_epoch`` and ``iter`` on the train dataloader)."""

    def __init__(self, trainer: ACSTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._calibrate_if_needed()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._on_epoch_begin(math.floor(state.epoch + 1e-6), state.num_train_epochs)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._on_train_end()


class ACSTrainer(Trainer):
    """``transformers.Trainer`` for QAT on adaptively selected coresets.

    Args:
        acs_args: :class:`~acs_hf.ACSArguments`.
        teacher_model: frozen FP model for distillation and the DS score (moved to the device,
            kept in eval mode, never optimised or checkpointed).
        score_dataset: the training set under the eval transform, same order and length as
            ``train_dataset``, yielding ``pixel_values``, ``labels`` and ``index``. Required by
            every method but ``full``.
        *args, **kwargs: as for ``transformers.Trainer``. ``model`` is a timm model prepared with
            :func:`acs_hf.quantize_model`; batches are dicts with ``pixel_values`` and ``labels``.

    Sets ``remove_unused_columns=False`` and ``label_names=["labels"]`` (timm models take a tensor,
    so the Trainer cannot infer them from the forward signature).
    """

    def __init__(
        self,
        *args: Any,
        acs_args: ACSArguments | None = None,
        teacher_model: nn.Module | None = None,
        score_dataset: torch.utils.data.Dataset | None = None,
        **kwargs: Any,
    ) -> None:
        self.acs_args = acs_args = acs_args or ACSArguments()
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False
        if self.args.label_names is None:
            self.args.label_names = ["labels"]
            self.label_names = ["labels"]
        self._check_distributed()
        self.selector = create_selector(
            acs_args.selection_method,
            class_balanced=acs_args.class_balanced,
            **({"schedule": acs_args.evs_schedule} if acs_args.selection_method == "acs" else {}),
        )
        if self.train_dataset is None:
            raise ValueError("ACSTrainer needs a train_dataset")
        self.num_samples = len(self.train_dataset)
        needs_scores = acs_args.selection_method != "full"
        if needs_scores and score_dataset is None:
            raise ValueError(
                f"selection_method={acs_args.selection_method!r} needs score_dataset: the training set under "
                "the eval transform (see acs_hf.data)"
            )
        if score_dataset is not None and len(score_dataset) != self.num_samples:
            raise ValueError(
                f"score_dataset has {len(score_dataset)} examples, train_dataset {self.num_samples}; "
                "they must be the same examples in the same order"
            )
        if "ds" in self.selector.required_stats and teacher_model is None:
            raise ValueError(
                f"selection_method={acs_args.selection_method!r} (schedule {acs_args.evs_schedule!r}) uses the "
                "disagreement score and needs teacher_model (the FP model the student started from)"
            )
        self.score_dataset = score_dataset
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.requires_grad_(False).eval().to(self.args.device)
        self._coreset_sampler: CoresetSampler | None = None
        self._score_loader: DataLoader | None = None
        self._teacher_cache: TeacherCache | None = None
        self.selection_round = 0
        self.selected_epoch: int | None = None
        self.subset: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self._resumed = False
        self.add_callback(_SelectionCallback(self))

    # ------------------------------------------------------------------ setup checks
    def _check_distributed(self) -> None:
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if env_world > 1 and self.args.world_size == 1:
            raise RuntimeError(
                f"WORLD_SIZE={env_world} in the environment but the Trainer runs a single process: each process "
                "would train alone on the whole dataset. On CPU pass --use_cpu (TrainingArguments(use_cpu=True)) "
                "so that accelerate starts the gloo process group."
            )

    # ------------------------------------------------------------------ data
    def _get_train_sampler(self, train_dataset=None):
        if self.acs_args.selection_method == "full":
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self._coreset_sampler = CoresetSampler(coreset_size(self.num_samples, self.acs_args.fraction), seed)
        if self.subset is not None:  # restored from a checkpoint
            self._coreset_sampler.set_subset(self.subset)
        return self._coreset_sampler

    @property
    def _score_batch_size(self) -> int:
        return self.acs_args.score_batch_size or self.args.per_device_eval_batch_size

    def _score_dataloader(self) -> DataLoader:
        if self._score_loader is None:
            batch_size = self._score_batch_size
            loader = DataLoader(
                self.score_dataset,
                batch_size=batch_size,
                shuffle=False,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory and self.args.device.type == "cuda",
            )
            self._score_loader = self.accelerator.prepare(loader)
        return self._score_loader

    def _calibrate_if_needed(self) -> None:
        """Initialise every LSQ step before the first scoring or training step (not done by the
        reference code). Uses the same leading examples on every process, so ranks agree."""
        model = self.accelerator.unwrap_model(self.model)
        if not any(isinstance(m, LSQQuantizer) for m in model.modules()) or quantizers_initialized(model):
            return
        dataset = self.score_dataset if self.score_dataset is not None else self.train_dataset
        batch_size = self._score_batch_size
        n = min(len(dataset), batch_size * self.acs_args.calibration_batches)
        loader = DataLoader(
            torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size, collate_fn=self.data_collator
        )
        logger.info("Calibrating quantizers on %d examples", n)
        with self.accelerator.autocast():
            calibrate_quantizers(model, (batch["pixel_values"].to(self.args.device) for batch in loader))

    # ------------------------------------------------------------------ selection
    def _on_epoch_begin(self, epoch: int, num_epochs: int) -> None:
        if self.acs_args.selection_method == "full":
            return
        due = epoch % self.acs_args.selection_interval == 0
        # A resume inside an epoch finds that epoch's subset restored from the checkpoint.
        if epoch != self.selected_epoch and (self.subset is None or (due and self.selector.dynamic)):
            self._select(epoch, num_epochs)
        self._coreset_sampler.set_epoch(epoch)

    def _select(self, epoch: int, num_epochs: int) -> None:
        model = self.accelerator.unwrap_model(self.model)
        start = time.perf_counter()
        stats = score_dataset(
            model,
            self._score_dataloader(),
            self.accelerator,
            self.selector.required_stats,
            self.num_samples,
            teacher=self.teacher_model,
            teacher_cache=self._get_teacher_cache(),
            desc=f"ACS scoring (epoch {epoch})",
        )
        scoring_seconds = time.perf_counter() - start
        generator = selection_generator(self.acs_args.selection_seed, epoch)
        subset = self.selector.select(stats, epoch, max(num_epochs, 1), self.acs_args.fraction, generator)
        self._check_same_subset(subset)
        previous = self.subset
        self.subset = subset
        self.selected_epoch = epoch
        self.selection_round += 1
        self._coreset_sampler.set_subset(subset)
        self._record(epoch, num_epochs, subset, previous, stats, scoring_seconds)

    def _get_teacher_cache(self) -> TeacherCache | None:
        if not (self.acs_args.cache_teacher_outputs and "ds" in self.selector.required_stats):
            return None
        if self._teacher_cache is None:
            directory = self.teacher_cache_dir
            self._teacher_cache = TeacherCache(
                self.num_samples, directory, rank=self.accelerator.process_index, reuse=self._resumed
            )
        return self._teacher_cache

    @property
    def teacher_cache_dir(self) -> str | None:
        d = self.acs_args.teacher_cache_dir
        if d == "memory":
            return None
        return d or os.path.join(self.args.output_dir, "teacher_cache")

    def _check_same_subset(self, subset: torch.Tensor) -> None:
        """All processes must train on the same subset: compare hashes (one small all_gather)."""
        if self.accelerator.num_processes == 1:
            return
        digest = int(subset_hash(subset)[:15], 16)
        gathered = self.accelerator.gather(torch.tensor([digest], device=self.accelerator.device)).cpu().tolist()
        if len(set(gathered)) > 1:
            groups: dict[int, list[int]] = {}
            for rank, h in enumerate(gathered):
                groups.setdefault(h, []).append(rank)
            raise RuntimeError(
                "ACS selection diverged across processes: ranks "
                + " vs ".join(str(ranks) for ranks in groups.values())
                + " selected different subsets; refusing to train on inconsistent data"
            )

    def _record(self, epoch, num_epochs, subset, previous, stats, scoring_seconds) -> None:
        labels = stats["labels"]
        record: dict[str, Any] = {
            "epoch": epoch,
            "round": self.selection_round,
            "method": self.acs_args.selection_method,
            **self.selector.describe(epoch, max(num_epochs, 1)),
            "num_selected": int(subset.numel()),
            "num_samples": self.num_samples,
            "world_size": self.accelerator.num_processes,
            "subset_hash": subset_hash(subset),
            "overlap_with_previous": (
                None
                if previous is None
                else float(np.intersect1d(previous.numpy(), subset.numpy()).size / subset.numel())
            ),
            "scoring_seconds": round(scoring_seconds, 3),
            "class_counts": torch.bincount(labels[subset], minlength=int(labels.max()) + 1).tolist(),
        }
        for name in ("evs", "ds"):
            if name in stats:
                v = stats[name]
                record[f"{name}_mean"], record[f"{name}_min"], record[f"{name}_max"] = (
                    float(v.mean()),
                    float(v.min()),
                    float(v.max()),
                )
                record[f"{name}_selected_mean"] = float(v[subset].mean())
        self.history.append(record)
        if self.is_world_process_zero():
            out = Path(self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(r) + "\n" for r in self.history)
            atomic_write_bytes(out / RECORD_NAME, lines.encode())
            (out / "selection").mkdir(exist_ok=True)
            atomic_save_npy(out / "selection" / f"epoch_{epoch:04d}.npy", subset.numpy())
        scalars = {f"acs/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.log(scalars)
        logger.info(
            "ACS round %d at epoch %d: %d of %d samples selected (%s), scoring %.1fs",
            self.selection_round,
            epoch,
            subset.numel(),
            self.num_samples,
            record["subset_hash"],
            scoring_seconds,
        )

    # ------------------------------------------------------------------ loss and optimizer
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["pixel_values"])
        labels = inputs["labels"]
        alpha, T = self.acs_args.kd_alpha, self.acs_args.kd_temperature
        if self.teacher_model is not None and alpha > 0:
            with torch.no_grad(), self.accelerator.autocast():
                t_logits = self.teacher_model(inputs["pixel_values"])
            kd = -(F.softmax(t_logits.float() / T, -1) * F.log_softmax(logits.float() / T, -1)).sum(-1).mean()
            loss = alpha * kd * T * T
            if alpha < 1:
                loss = loss + (1 - alpha) * F.cross_entropy(logits.float(), labels)
        else:
            loss = F.cross_entropy(logits.float(), labels)
        return (loss, {"loss": loss, "logits": logits}) if return_outputs else loss

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Weight decay on conv/linear weights only: not on norms, biases or LSQ step sizes."""
        names = set(super().get_decay_parameter_names(model))
        no_decay = set()
        for mod_name, module in model.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, LSQQuantizer)):
                no_decay.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        return sorted(n for n in names if n not in no_decay and not n.endswith(".bias"))

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with every LSQ step size moved to a group at ``lr * step_lr_scale``.

        The paper lowers the LR of activation steps; weight steps need it as well under Adam, whose
        updates are about ``lr`` whatever the gradient: an 8-bit weight step is ~5e-3, so at lr 1e-3
        it crossed zero within a few epochs on digits and the run collapsed to chance.
        """
        # transformers < 5.2x has create_optimizer(self) without the model argument.
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        target = self.model if model is None else model
        steps = {id(m.step) for m in target.modules() if isinstance(m, LSQQuantizer) and m.step.requires_grad}
        opt = getattr(optimizer, "optimizer", optimizer)
        moved = []
        for group in opt.param_groups:
            keep = [p for p in group["params"] if id(p) not in steps]
            moved += [p for p in group["params"] if id(p) in steps]
            group["params"] = keep
        if moved:
            base = opt.param_groups[0]
            opt.add_param_group(
                {
                    **{k: v for k, v in base.items() if k != "params"},
                    "params": moved,
                    "lr": self.args.learning_rate * self.acs_args.step_lr_scale,
                    "weight_decay": 0.0,
                }
            )
        return optimizer

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.is_world_process_zero() or self.subset is None:
            return
        ckpt = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        state = {
            "selection_round": self.selection_round,
            "selected_epoch": self.selected_epoch,
            "method": self.acs_args.selection_method,
            "fraction": self.acs_args.fraction,
            "num_samples": self.num_samples,
            "subset_hash": subset_hash(self.subset),
            "teacher_cache_dir": self.teacher_cache_dir if self._teacher_cache is not None else None,
            "history": self.history,
        }
        atomic_save_npy(ckpt / SUBSET_NAME, self.subset.numpy())
        selector_subset = self.selector.state_dict().get("subset")
        if selector_subset is not None:
            atomic_save_npy(ckpt / SELECTOR_STATE_NAME, selector_subset.numpy())
        atomic_write_bytes(ckpt / STATE_NAME, json.dumps(state, indent=2).encode())  # last: marks complete

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.acs_args.selection_method == "full":
            return
        ckpt = Path(resume_from_checkpoint)
        if not (ckpt / STATE_NAME).is_file():
            raise FileNotFoundError(
                f"{ckpt} has no {STATE_NAME}: it was not written by ACSTrainer, or its save was interrupted"
            )
        state = json.loads((ckpt / STATE_NAME).read_text())
        if state["method"] != self.acs_args.selection_method or state["num_samples"] != self.num_samples:
            raise ValueError(
                f"checkpoint {ckpt} selected with method={state['method']!r} over {state['num_samples']} samples; "
                f"this run uses {self.acs_args.selection_method!r} over {self.num_samples}"
            )
        subset = torch.from_numpy(np.load(ckpt / SUBSET_NAME))
        if subset_hash(subset) != state["subset_hash"]:
            raise ValueError(f"{ckpt / SUBSET_NAME} does not match the hash in {STATE_NAME}")
        if (ckpt / SELECTOR_STATE_NAME).is_file():
            self.selector.load_state_dict({"subset": torch.from_numpy(np.load(ckpt / SELECTOR_STATE_NAME))})
        self.subset, self.selected_epoch = subset, state["selected_epoch"]
        self.selection_round, self.history = state["selection_round"], state["history"]
        self._resumed = True
        if self._coreset_sampler is not None:
            self._coreset_sampler.set_subset(subset)

    # ------------------------------------------------------------------ end of training
    def _on_train_end(self) -> None:
        if not self.history or not self.is_world_process_zero():
            return
        path = Path(self.args.output_dir) / PLOT_NAME
        plot_selection_history(self.history, path)
        logger.info("ACS selection history plot: %s", path)


def plot_selection_history(history: list[dict[str, Any]], path: Path) -> Path:
    """PNG of beta, mean EVS/DS of all and of the selected samples, overlap and per-class share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for key in ("beta", "evs_mean", "ds_mean", "evs_selected_mean", "ds_selected_mean"):
        if any(key in r for r in history):
            ax.plot(epochs, [r.get(key, np.nan) for r in history], marker="o", label=key)
    ax.set(title="Scores per round", xlabel="epoch")
    if ax.lines:
        ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(
        epochs,
        [r["overlap_with_previous"] if r["overlap_with_previous"] is not None else np.nan for r in history],
        marker="o",
    )
    ax.set(title="Overlap with previous subset", xlabel="epoch", ylim=(0, 1.05))
    ax = axes[2]
    counts = np.array(
        [
            r["class_counts"] + [0] * (max(len(h["class_counts"]) for h in history) - len(r["class_counts"]))
            for r in history
        ],
        dtype=float,
    )
    share = counts / counts.sum(1, keepdims=True)
    bottom = np.zeros(len(history))
    for c in range(share.shape[1]):
        ax.bar(range(len(history)), share[:, c], bottom=bottom, width=0.8)
        bottom += share[:, c]
    ax.set(title="Per-class share of the subset", xlabel="round", ylim=(0, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path
