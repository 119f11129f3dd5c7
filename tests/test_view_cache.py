"""The decoded score-view cache gives the plain view's pixels bit for bit, the same scores and
subsets through ACSTrainer, and leaves nothing behind."""

import numpy as np
import pytest
import timm
import torch
from trainer_utils import NUM_CLASSES, RecordingACSTrainer, models, training_args, write_parquet_dataset
from transformers import TrainerCallback

from acs_hf import ACSArguments
from acs_hf.data import load_image_datasets, prepare_datasets
from acs_hf.data.view_cache import ScoreViewCache, split_transform


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """A parquet dataset of 40 PNGs of 12x10 pixels seen by a model at 16x16: decode, resize and crop
    all do work, and the cached uint8 pixels must reproduce them."""
    root = tmp_path_factory.mktemp("parquet")
    write_parquet_dataset(root, {"train": 40, "validation": 8}, num_classes=NUM_CLASSES)
    raw = load_image_datasets(str(root), cache_dir=str(root / "cache"))
    return prepare_datasets(raw, timm.create_model("test_resnet", num_classes=NUM_CLASSES), image_size=16)


def test_cached_pixels_equal_the_plain_view(views, tmp_path):
    plain = views.score_dataset
    cache = ScoreViewCache(plain, tmp_path, tag="t")
    rows = [5, 0, 39, 5]
    for _ in range(2):  # first read decodes and writes, second reads the cache
        for got, want in zip(cache.__getitems__(rows), plain.__getitems__(rows)):
            assert torch.equal(got["pixel_values"], want["pixel_values"])
            assert got["labels"] == want["labels"] and got["index"] == want["index"]
    done = np.fromfile(cache.directory / "done.u8", dtype=np.uint8)
    assert sorted(np.flatnonzero(done).tolist()) == [0, 5, 39]
    assert cache.nbytes == 40 * 16 * 16 * 3
    cache.close()
    assert not cache.directory.exists()
    assert list(tmp_path.iterdir()) == []


def _trainer(out, views, **acs):
    student, teacher = models()
    return RecordingACSTrainer(
        model=student,
        args=training_args(out, num_train_epochs=3, dataloader_num_workers=1),
        train_dataset=views.train_dataset,
        acs_args=ACSArguments(fraction=0.25, selection_interval=1, teacher_cache_dir="memory", **acs),
        teacher_model=teacher,
        score_dataset=views.score_dataset,
    )


@pytest.mark.slow
def test_same_scores_and_subsets_with_the_cache(views, tmp_path):
    """Three rounds with one loader worker: the first fills the cache, the others read it."""
    plain = _trainer(tmp_path / "plain", views)
    plain.train()
    cached = _trainer(tmp_path / "cached", views, score_cache_dir=str(tmp_path / "pixels"))
    opened = []

    class Spy(TrainerCallback):
        def on_selection(self, *args, **kwargs):
            opened.append(cached.rounds.statistics.view_cache)

    cached.add_callback(Spy())
    cached.train()
    keys = ("subset_hash", "evs_mean", "ds_mean", "evs_selected_mean", "ds_selected_mean")
    assert [{k: r[k] for k in keys} for r in cached.history] == [{k: r[k] for k in keys} for r in plain.history]
    assert len(cached.history) == 3 and all(c is opened[0] for c in opened) and opened[0] is not None
    assert list((tmp_path / "pixels").iterdir()) == []  # removed when training ended


def test_cache_refuses_a_dataset_it_cannot_split(views, tmp_path):
    from trainer_utils import tiny_dataset

    student, teacher = models()
    ds = tiny_dataset()
    with pytest.raises(ValueError, match="score_cache_dir=.* needs a score_dataset from acs_hf.data"):
        RecordingACSTrainer(
            model=student,
            args=training_args(tmp_path),
            train_dataset=ds,
            acs_args=ACSArguments(score_cache_dir=str(tmp_path)),
            teacher_model=teacher,
            score_dataset=ds,
        )
    with pytest.raises(ValueError, match="a Compose with ToTensor"):
        split_transform(lambda img: img)
