"""The layout of a run's output folder: every name in it, in one place.

``RunLayout(output_dir)`` gives each path a run writes; the class constants are the names, grouped
by role, and the three lists other modules act on are derived from those groups, never typed
twice: what ``--overwrite_output_dir`` moves aside (:meth:`RunLayout.previous_run_files`), what a
Hub push skips (:meth:`RunLayout.upload_ignore`) and what shows that a finished run is there
(:meth:`RunLayout.result_markers`).

```
output_dir/
  model.safetensors, config.json, preprocessor_config.json, README.md   the packed student and its card
  acs_summary.json, all_results.json, {train,eval}_results.json      metrics
  acs_selection.jsonl, acs_selection.png, selection/epoch_XXXX.npy    what every round selected
  model.onnx (+ model.onnx.data)                                       with --export_onnx
  trainer_state.json                                                   the Trainer's, at the end
  checkpoint-<step>/  acs_state.json, acs_subset.npy, acs_selector_subset.npy,
                      acs_training_scores.npz + the Trainer's files     (work: not uploaded)
  fp_warmup/, teacher_cache/, runs/                                    (work: not uploaded)
  .acs_hf.lock                                                         held while a run writes here
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .quantization.packed import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["RunLayout", "CHECKPOINT_PREFIX"]

#: transformers' ``PREFIX_CHECKPOINT_DIR`` (a test checks they agree): ``checkpoint-<step>``.
CHECKPOINT_PREFIX = "checkpoint"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run's output folder (see the module's docstring for the tree)."""

    output_dir: str | os.PathLike

    # The finished run's files (uploaded by a push).
    WEIGHTS = WEIGHTS_NAME
    CONFIG = CONFIG_NAME
    PREPROCESSOR = "preprocessor_config.json"  # transformers students' image processor
    MODEL_CARD = "README.md"
    SUMMARY = "acs_summary.json"
    ALL_RESULTS = "all_results.json"
    RESULTS = "*_results.json"  # the Trainer's save_metrics: all_, train_, eval_results.json
    TRAINER_STATE = "trainer_state.json"  # the Trainer's, also in each checkpoint
    SELECTION_LOG = "acs_selection.jsonl"
    SELECTION_PLOT = "acs_selection.png"
    SUBSETS = "selection"
    ONNX = "model.onnx"
    ONNX_DATA = "model.onnx.data"  # its external data, when the graph is over 2 GB
    # Work folders (never uploaded).
    CHECKPOINTS = f"{CHECKPOINT_PREFIX}-*"
    FP_WARMUP = "fp_warmup"
    TEACHER_CACHE = "teacher_cache"
    TRACKER_LOGS = "runs"  # TensorBoard's default logging_dir
    LOCK = ".acs_hf.lock"
    # Inside checkpoint-<step>/, beside the Trainer's files.
    ACS_STATE = "acs_state.json"
    SUBSET = "acs_subset.npy"
    SELECTOR_SUBSET = "acs_selector_subset.npy"
    TRAINING_SCORES = "acs_training_scores.npz"

    _RESULT_FILES = (WEIGHTS, CONFIG, PREPROCESSOR, MODEL_CARD, SUMMARY, RESULTS, TRAINER_STATE,
                     SELECTION_LOG, SELECTION_PLOT, SUBSETS, ONNX, ONNX_DATA)  # fmt: skip
    _WORK_FOLDERS = (CHECKPOINTS, FP_WARMUP, TEACHER_CACHE, TRACKER_LOGS)

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_dir", Path(self.output_dir))  # a str or any PathLike is accepted

    # ------------------------------------------------------------------ paths
    def __truediv__(self, name: str) -> Path:
        return self.output_dir / name

    @property
    def weights(self) -> Path:
        return self.output_dir / self.WEIGHTS

    @property
    def summary(self) -> Path:
        return self.output_dir / self.SUMMARY

    @property
    def selection_log(self) -> Path:
        return self.output_dir / self.SELECTION_LOG

    @property
    def selection_plot(self) -> Path:
        return self.output_dir / self.SELECTION_PLOT

    def subset(self, epoch: int) -> Path:
        """The indices selected for ``epoch`` (``selection/epoch_XXXX.npy``)."""
        return self.output_dir / self.SUBSETS / f"epoch_{epoch:04d}.npy"

    @property
    def onnx(self) -> Path:
        return self.output_dir / self.ONNX

    @property
    def fp_warmup(self) -> Path:
        return self.output_dir / self.FP_WARMUP

    @property
    def teacher_cache(self) -> Path:
        return self.output_dir / self.TEACHER_CACHE

    @property
    def lock(self) -> Path:
        return self.output_dir / self.LOCK

    def checkpoint(self, step: int) -> Path:
        return self.output_dir / f"{CHECKPOINT_PREFIX}-{step}"

    # ------------------------------------------------------------------ derived lists
    @classmethod
    def previous_run_files(cls) -> tuple[str, ...]:
        """Glob patterns of everything a run leaves (``--overwrite_output_dir`` moves them aside)."""
        return cls._WORK_FOLDERS + cls._RESULT_FILES

    @classmethod
    def upload_ignore(cls) -> list[str]:
        """``huggingface_hub`` ignore patterns of a push: the work folders, temporary and hidden files."""
        return [p for folder in cls._WORK_FOLDERS for p in (folder, f"{folder}/**")] + ["*.tmp", ".*"]

    @classmethod
    def result_markers(cls) -> tuple[str, ...]:
        """Files whose presence shows that a run finished (or got far) in a folder."""
        return (cls.WEIGHTS, cls.SELECTION_LOG, cls.SUMMARY, cls.ALL_RESULTS)
