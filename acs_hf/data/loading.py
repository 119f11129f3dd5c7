"""Datasets for ACS training: Hub or image-folder loading, timm transforms, the embedded digits set.

The training split is viewed twice through :class:`ImageView`: once with timm's training
augmentation (``train_dataset``) and once with the eval transform (``score_dataset``, what the
scoring pass sees), both yielding ``pixel_values``, ``labels`` and the example's row ``index``.
Views decode on access and never rewrite the underlying ``datasets`` table, so preparing
ImageNet costs seconds, not a copy of its 140 GB of JPEG bytes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Image

from ..utils.upstream import dataset_fingerprint
from .images import ImageView, check_images, column_values, decode_image

__all__ = [
    "ImageDatasets",
    "ImageView",
    "score_transform",
    "decode_image",
    "digits_dataset",
    "load_image_datasets",
    "detect_columns",
    "class_names",
    "prepare_datasets",
    "timm_transforms",
    "data_config",
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
    return [str(i) for i in range(int(column_values(ds, label_column).max()) + 1)]


def data_config(model, image_size: int | None = None, augmentation: dict | None = None) -> dict[str, Any]:
    """timm's data config of ``model`` (``input_size``, ``interpolation``, ``mean``, ``std``,
    ``crop_pct``, ``crop_mode``) at ``image_size``, with ``augmentation``'s ``interpolation`` and
    ``crop_pct`` overrides: the eval preprocessing, which checkpoints record for their loaders."""
    from timm.data import resolve_data_config

    overrides = {"input_size": (3, image_size, image_size)} if image_size else {}
    overrides.update({k: v for k, v in (augmentation or {}).items() if k in _DATA_KEYS and v is not None})
    return resolve_data_config(overrides, model=model)


_DATA_KEYS = ("interpolation", "crop_pct")


def timm_transforms(model, image_size: int | None = None, augmentation: dict | None = None) -> tuple[Any, Any]:
    """(train, eval) transforms from :func:`data_config` + timm's ``create_transform``.

    ``augmentation`` takes ``create_transform``'s training keywords (``hflip``, ``vflip``,
    ``scale``, ``ratio``, ``color_jitter``, ``auto_augment``, ``re_prob``) plus ``interpolation``
    and ``crop_pct``, which override the model's data config; ``None`` values keep the defaults.
    """
    return _transforms(data_config(model, image_size, augmentation), augmentation)


def score_transform(config: dict[str, Any], image_size: int) -> Any:
    """The eval transform of ``config`` (see :func:`data_config`) at another square resolution:
    the same resize rule, crop share, interpolation and normalisation."""
    from timm.data import create_transform

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"score_image_size must be an integer >= 8, got {image_size!r}")
    return create_transform(**{**config, "input_size": (3, image_size, image_size)}, is_training=False)


def _transforms(config: dict[str, Any], augmentation: dict | None) -> tuple[Any, Any]:
    from timm.data import create_transform

    train_only = {k: v for k, v in (augmentation or {}).items() if k not in _DATA_KEYS and v is not None}
    return create_transform(**config, is_training=True, **train_only), create_transform(**config, is_training=False)


@dataclass
class ImageDatasets:
    """What :func:`prepare_datasets` returns."""

    train_dataset: ImageView  # augmented training view
    score_dataset: ImageView  # the same rows under the eval transform
    eval_dataset: ImageView
    id2label: dict[int, str]
    label2id: dict[str, int]
    num_skipped: int = 0
    #: The dataset's name of the split evaluated on (``validation``, ``test``, ...).
    eval_split: str = "validation"
    #: Identifies the training set as indexed (datasets fingerprint, N, labels): a resume or a
    #: teacher cache on other data is refused (see ``ACSTrainer(data_fingerprint=...)``).
    fingerprint: str | None = None
    #: The eval preprocessing (see :func:`data_config`), recorded in saved checkpoints.
    data_config: dict[str, Any] | None = None


def _check_labels(labels: np.ndarray, num_classes: int, split: str, label_column: str) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"the {split} split has {int(bad.sum())} labels outside [0, {num_classes}) in column {label_column!r} "
            f"(row {row}: {int(labels[row])}); unlabelled splits (e.g. ImageNet's 'test', labels -1) cannot be "
            "used for training or evaluation: pick a labelled split or a validation folder"
        )


def _check_eval_classes(labels: np.ndarray, trained: np.ndarray, names: list[str]) -> None:
    """Classes come from the training split: evaluation images of a class with no training image
    (an image folder's class folder only under --validation_dir) would count as errors the model
    can never avoid. ``trained[c]``: class ``c`` has training images."""
    missing = np.unique(labels[~trained[labels]])
    if missing.size:
        found = ", ".join(f"{names[c]!r} ({int((labels == c).sum())} images)" for c in missing[:10])
        raise ValueError(
            f"the validation split has {missing.size} classes with no training images: {found}"
            f"{' ...' if missing.size > 10 else ''}; classes come from the training split (--train_dir or the "
            "dataset's train split): add training images of these classes or remove them from the validation data "
            "(--validation_dir or the dataset's validation split)"
        )


def _fingerprint(train: Dataset, labels: np.ndarray) -> str:
    digest = hashlib.sha256(f"{len(train)}:{dataset_fingerprint(train)}:".encode())
    digest.update(labels.astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def _truncate(d: Dataset, n: int | None, what: str, seed: int) -> Dataset:
    """A seeded random ``n`` rows of ``d`` (all of them when ``n`` is None or not smaller)."""
    if n is not None and n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    return d.shuffle(seed=seed).select(range(n)) if n is not None and n < len(d) else d


def _trained_classes(train: Dataset, label_column: str, num_classes: int) -> np.ndarray:
    """``[C]`` bool: which classes have images in the whole training split (before max_train_samples)."""
    all_labels = column_values(train, label_column)
    in_range = all_labels[(all_labels >= 0) & (all_labels < num_classes)].astype(np.int64)
    return np.bincount(in_range, minlength=num_classes) > 0


def _checked_labels(
    train: Dataset, val: Dataset, label_column: str, names: list[str], trained: np.ndarray
) -> np.ndarray:
    """The training labels, once both splits' labels are checked (in range, evaluated classes trained)."""
    train_labels = column_values(train, label_column)
    _check_labels(train_labels, len(names), "train", label_column)
    val_labels = column_values(val, label_column)
    _check_labels(val_labels, len(names), "validation", label_column)
    _check_eval_classes(val_labels, trained, names)
    return train_labels


def _undecoded_checked(
    train: Dataset, val: Dataset, image_column: str, skip_bad_images: bool, num_proc: int | None
) -> tuple[Dataset, Dataset, int]:
    """Both splits with undecoded images, checked (see :func:`~acs_hf.data.images.check_images`), and non-empty."""
    # Decode ourselves, so that a broken file names its split and row.
    train, val = (d.cast_column(image_column, Image(decode=False)) for d in (train, val))
    train, val, skipped = check_images(train, val, image_column, skip_bad_images, num_proc)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"empty split after filtering: {len(train)} training and {len(val)} validation images")
    return train, val, skipped


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
    num_proc: int | None = None,
    augmentation: dict | None = None,
    score_image_size: int | None = None,
) -> ImageDatasets:
    """Select and check the splits and view them through timm transforms (module docstring).

    ``score_image_size``: resolution of the scoring view (default: the eval resolution); a lower
    one makes each scoring forward cheaper (about the square of the ratio) for models that take
    any input size (CNNs; not fixed-size ViTs).

    Classes come from the training split: a validation image of a class with no image in the
    whole training split is an error naming the class. Nothing here copies the image data:
    selection and filtering keep an index map over the arrow table. Without ``skip_bad_images``,
    image folders get a header-only pass that fails listing the files that are not images
    (:func:`~acs_hf.data.images.check_images`); ``skip_bad_images`` instead decodes every image once and
    drops the failures. Both run in ``num_proc`` processes (default: every core for splits of 20,000 rows
    or more); on a dataset stored on disk (Hub, image folder, parquet) ``datasets`` caches the
    result, so other processes of the run and a resumed run reuse it: call this on the local
    main process first (``run_acs`` does).
    ``augmentation``: timm's training augmentation controls (see :func:`timm_transforms`).
    """
    if num_proc is not None and num_proc < 1:
        raise ValueError(f"num_proc must be >= 1 or None (automatic), got {num_proc}")
    train, val = raw["train"], raw["validation"]
    eval_split = str(val.split) if getattr(val, "split", None) else "validation"
    image_column, label_column = detect_columns(train, image_column, label_column)
    names = class_names(train, label_column)
    trained = _trained_classes(train, label_column, len(names))
    train = _truncate(train, max_train_samples, "max_train_samples", seed)
    val = _truncate(val, max_eval_samples, "max_eval_samples", seed)
    train, val, skipped = _undecoded_checked(train, val, image_column, skip_bad_images, num_proc)
    train_labels = _checked_labels(train, val, label_column, names, trained)
    eval_config = data_config(model, image_size, augmentation)
    train_tf, eval_tf = _transforms(eval_config, augmentation)
    score_tf = eval_tf if score_image_size is None else score_transform(eval_config, score_image_size)
    columns = (image_column, label_column)
    return ImageDatasets(
        train_dataset=ImageView(train, train_tf, *columns, "train"),
        score_dataset=ImageView(train, score_tf, *columns, "train"),
        eval_dataset=ImageView(val, eval_tf, *columns, "validation"),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        num_skipped=skipped,
        eval_split=eval_split,
        fingerprint=_fingerprint(train, train_labels),
        data_config=eval_config,
    )
