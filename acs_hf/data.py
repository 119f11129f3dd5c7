"""Datasets for ACS training: Hub or image-folder loading, timm transforms, the embedded digits set.

The training split is wrapped twice with ``with_transform``: once with timm's training
augmentation (``train_dataset``) and once with the eval transform (``score_dataset``, what the
scoring pass sees), both yielding ``pixel_values``, ``labels`` and the example's dataset ``index``.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Image

from .scoring import INDEX_KEY

__all__ = [
    "ImageDatasets",
    "digits_dataset",
    "load_image_datasets",
    "detect_columns",
    "class_names",
    "prepare_datasets",
    "timm_transforms",
    "DIGITS",
]

logger = logging.getLogger(__name__)

#: ``--dataset_name`` of the embedded, offline default: scikit-learn's 8x8 handwritten digits.
DIGITS = "digits"
IMAGE_COLUMNS = ("image", "img", "pixel_values", "jpg", "png")
LABEL_COLUMNS = ("label", "labels", "fine_label", "cls", "class")
VALIDATION_SPLITS = ("validation", "val", "valid", "test")


def digits_dataset(validation_fraction: float = 0.2, seed: int = 0) -> DatasetDict:
    """scikit-learn's handwritten digits (1797 real 8x8 scans, shipped with the package) as PIL
    images with a ClassLabel, split into stratified ``train`` / ``validation``."""
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [PILImage.fromarray((img * (255.0 / 16.0)).astype(np.uint8), mode="L") for img in digits.images]
    features = datasets.Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    ds = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    split = ds.train_test_split(test_size=validation_fraction, stratify_by_column="label", seed=seed)
    return DatasetDict(train=split["train"], validation=split["test"])


def load_image_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> DatasetDict:
    """``train`` and ``validation`` splits from the Hub, local image folders or the embedded digits.

    Hub ids go through ``datasets.load_dataset`` (ImageNet: ``ILSVRC/imagenet-1k``; CIFAR-100:
    ``uoft-cs/cifar100``), downloaded as map-style datasets: a coreset is a set of indices into the
    dataset, re-drawn every few epochs, which a stream cannot give.
    """
    if dataset_name and train_dir:
        raise ValueError("give either dataset_name or train_dir/validation_dir, not both")
    if train_dir:
        files = {"train": f"{train_dir}/**"}
        if validation_dir:
            files["validation"] = f"{validation_dir}/**"
        raw = datasets.load_dataset("imagefolder", data_files=files, cache_dir=cache_dir)
    elif dataset_name in (None, DIGITS):
        raw = digits_dataset(seed=seed)
    else:
        raw = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    if "train" not in raw:
        raise ValueError(f"the dataset has no 'train' split; splits: {list(raw)}")
    val_name = next((s for s in VALIDATION_SPLITS if s in raw), None)
    if val_name is None:
        raise ValueError(
            f"the dataset has no validation split (looked for {', '.join(VALIDATION_SPLITS)}; found "
            f"{', '.join(raw)}); pass --validation_dir or a dataset with a held-out split"
        )
    return DatasetDict(train=raw["train"], validation=raw[val_name])


def detect_columns(ds: Dataset, image_column: str | None = None, label_column: str | None = None) -> tuple[str, str]:
    """The image and label column names: as given, else the first Image / ClassLabel feature or a
    conventional name. Errors list the available columns."""
    columns = list(ds.column_names)
    for given, what in ((image_column, "image_column"), (label_column, "label_column")):
        if given is not None and given not in columns:
            raise ValueError(f"{what}={given!r} is not a column of the dataset; columns: {columns}")
    if image_column is None:
        image_column = next((c for c in columns if isinstance(ds.features[c], Image)), None) or next(
            (c for c in IMAGE_COLUMNS if c in columns), None
        )
        if image_column is None:
            raise ValueError(f"cannot find the image column; pass --image_column (columns: {columns})")
    if label_column is None:
        label_column = next((c for c in columns if isinstance(ds.features[c], ClassLabel)), None) or next(
            (c for c in LABEL_COLUMNS if c in columns), None
        )
        if label_column is None:
            raise ValueError(f"cannot find the label column; pass --label_column (columns: {columns})")
    return image_column, label_column


def class_names(ds: Dataset, label_column: str) -> list[str]:
    """Class names from the ClassLabel feature, else "0".."max label"."""
    feature = ds.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(i) for i in range(int(max(ds[label_column])) + 1)]


def timm_transforms(model, image_size: int | None = None) -> tuple[Any, Any]:
    """(train, eval) transforms from timm's ``resolve_data_config`` + ``create_transform``."""
    from timm.data import create_transform, resolve_data_config

    overrides = {"input_size": (3, image_size, image_size)} if image_size else {}
    config = resolve_data_config(overrides, model=model)
    return create_transform(**config, is_training=True), create_transform(**config, is_training=False)


def _decode(value: Any, split: str, row: int):
    from PIL import Image as PILImage

    try:
        if isinstance(value, PILImage.Image):
            img = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            img = PILImage.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            img = PILImage.open(value["path"])
        else:
            raise TypeError(f"unsupported image value {type(value).__name__}")
        img.load()
        return img.convert("RGB")  # grayscale, palette and RGBA all become RGB
    except Exception as e:  # PIL raises many types for broken files
        path = value.get("path") if isinstance(value, dict) else getattr(value, "filename", None)
        where = f"{split} row {row}" + (f" ({path})" if path else "")
        raise ValueError(f"cannot decode the image of {where}: {e}; pass --skip_bad_images to drop such rows") from e


def _transform(tf, image_column: str, label_column: str, split: str):
    def apply(batch: dict[str, list]) -> dict[str, list]:
        rows = batch[INDEX_KEY]
        return {
            "pixel_values": [tf(_decode(v, split, r)) for v, r in zip(batch[image_column], rows)],
            "labels": batch[label_column],
            INDEX_KEY: rows,
        }

    return apply


def _decodable(example: dict, image_column: str) -> bool:
    try:
        _decode(example[image_column], "", 0)
        return True
    except ValueError:
        return False


@dataclass
class ImageDatasets:
    """What :func:`prepare_datasets` returns."""

    train_dataset: Dataset  # augmented training view
    score_dataset: Dataset  # the same examples under the eval transform
    eval_dataset: Dataset
    id2label: dict[int, str]
    label2id: dict[str, int]
    num_skipped: int = 0
    #: Identifies the training set as indexed (datasets fingerprint, N, labels): a resume or a
    #: teacher cache on other data is refused (see ``ACSTrainer(data_fingerprint=...)``).
    fingerprint: str | None = None


def _check_labels(labels: np.ndarray, num_classes: int, split: str, label_column: str) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"the {split} split has {int(bad.sum())} labels outside [0, {num_classes}) in column {label_column!r} "
            f"(row {row}: {int(labels[row])}); unlabelled splits (e.g. ImageNet's 'test', labels -1) cannot be "
            "used for training or evaluation: pick a labelled split or a validation folder"
        )


def _fingerprint(train: Dataset, labels: np.ndarray) -> str:
    digest = hashlib.sha256(f"{len(train)}:{train._fingerprint}:".encode())
    digest.update(labels.astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def prepare_datasets(
    raw: DatasetDict,
    model,
    image_column: str | None = None,
    label_column: str | None = None,
    image_size: int | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    skip_bad_images: bool = False,
    seed: int = 0,
) -> ImageDatasets:
    """Select, index and wrap the splits with timm transforms (see the module docstring)."""
    train, val = raw["train"], raw["validation"]
    image_column, label_column = detect_columns(train, image_column, label_column)
    names = class_names(train, label_column)
    for n, what in ((max_train_samples, "max_train_samples"), (max_eval_samples, "max_eval_samples")):
        if n is not None and n < 1:
            raise ValueError(f"{what} must be >= 1, got {n}")
    if max_train_samples is not None and max_train_samples < len(train):
        train = train.shuffle(seed=seed).select(range(max_train_samples))
    if max_eval_samples is not None and max_eval_samples < len(val):
        val = val.shuffle(seed=seed).select(range(max_eval_samples))
    # Decode ourselves, so that a broken file names its split and row.
    train, val = (d.cast_column(image_column, Image(decode=False)) for d in (train, val))
    skipped = 0
    if skip_bad_images:
        before = len(train), len(val)
        train = train.filter(_decodable, fn_kwargs={"image_column": image_column}, desc="Checking train images")
        val = val.filter(_decodable, fn_kwargs={"image_column": image_column}, desc="Checking eval images")
        skipped = before[0] - len(train) + before[1] - len(val)
        if skipped:
            logger.warning("Skipped %d images that cannot be decoded", skipped)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"empty split after filtering: {len(train)} training and {len(val)} validation images")
    train_labels = np.asarray(train[label_column])
    _check_labels(train_labels, len(names), "train", label_column)
    _check_labels(np.asarray(val[label_column]), len(names), "validation", label_column)
    train = train.add_column(INDEX_KEY, np.arange(len(train)))
    val = val.add_column(INDEX_KEY, np.arange(len(val)))
    train_tf, eval_tf = timm_transforms(model, image_size)
    return ImageDatasets(
        train_dataset=train.with_transform(_transform(train_tf, image_column, label_column, "train")),
        score_dataset=train.with_transform(_transform(eval_tf, image_column, label_column, "train")),
        eval_dataset=val.with_transform(_transform(eval_tf, image_column, label_column, "validation")),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        num_skipped=skipped,
        fingerprint=_fingerprint(train, train_labels),
    )
