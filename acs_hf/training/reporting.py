"""What each selection round chose, written where users look: a JSONL log, the subsets, a plot.

:class:`SelectionReporter` is a ``TrainerCallback`` that ACSTrainer adds by default. After each round,
on every process, it receives ``on_selection`` (:func:`acs_hf.training.callback.dispatch_selection`);
it writes only on the main process. It holds no state a resume needs: the history comes with each call
(ACSTrainer checkpoints it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from ..layout import RunLayout
from ..utils.io import atomic_save_npy, atomic_write, atomic_write_bytes

__all__ = ["SelectionReporter", "plot_selection_history"]

logger = logging.getLogger(__name__)

MAX_STACKED_CLASSES = 20  # beyond this the per-class share is drawn as an image


class SelectionReporter(TrainerCallback):
    """Writes ``acs_selection.jsonl`` (one line per round), ``selection/epoch_XXXX.npy`` (each
    round's indices) and, at the end of training, ``acs_selection.png`` into ``args.output_dir``."""

    def __init__(self, plot: bool = True) -> None:
        self.plot = plot
        self.history: list[dict[str, Any]] = []

    def on_selection(self, args, state, control, record: dict, subset: torch.Tensor, history: list, **kwargs):
        self.history = history
        if not state.is_world_process_zero:
            return
        layout = RunLayout(args.output_dir)
        lines = "".join(json.dumps(r) + "\n" for r in history)
        atomic_write_bytes(layout.selection_log, lines.encode())
        atomic_save_npy(layout.subset(record["epoch"]), subset.numpy())

    def on_train_end(self, args, state, control, **kwargs):
        if not (self.plot and self.history and state.is_world_process_zero):
            return
        path = plot_selection_history(self.history, RunLayout(args.output_dir).selection_plot)
        logger.info("ACS selection history plot: %s", path)


def plot_selection_history(history: list[dict[str, Any]], path: Path) -> Path:
    """PNG of beta, mean EVS/DS of all and of the selected samples, overlap and per-class share.

    Uses matplotlib's object API (``Figure``), so no global backend is switched.
    """
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    ax = axes[0]
    for key in ("beta", "evs_mean", "ds_mean", "evs_selected_mean", "ds_selected_mean"):
        if any(key in r for r in history):
            ax.plot(epochs, [r.get(key, np.nan) for r in history], marker="o", label=key)
    ax.set(title="Scores per round", xlabel="epoch")
    if ax.lines:
        ax.legend(fontsize=8)
    overlap = [np.nan if r["overlap_with_previous"] is None else r["overlap_with_previous"] for r in history]
    axes[1].plot(epochs, overlap, marker="o")
    axes[1].set(title="Overlap with previous subset", xlabel="epoch", ylim=(0, 1.05))
    width = max(len(r["class_counts"]) for r in history)
    counts = np.array([r["class_counts"] + [0] * (width - len(r["class_counts"])) for r in history], dtype=float)
    share = counts / counts.sum(1, keepdims=True)
    if share.shape[1] <= MAX_STACKED_CLASSES:
        bottom = np.zeros(len(history))
        for c in range(share.shape[1]):
            axes[2].bar(range(len(history)), share[:, c], bottom=bottom, width=0.8)
            bottom += share[:, c]
        axes[2].set(title="Per-class share of the subset", xlabel="round", ylim=(0, 1))
    else:  # one bar per class and round would take seconds to draw at ImageNet's 1,000 classes
        image = axes[2].imshow(share.T, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
        fig.colorbar(image, ax=axes[2], label="share of the subset")
        axes[2].set(title="Per-class share of the subset", xlabel="round", ylabel="class")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return path
