from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from PIL import Image

from acs_hf.data import detect_columns, digits_dataset, load_image_datasets, prepare_datasets


@pytest.fixture(scope="module")
def model():
    return timm.create_model("resnet18", num_classes=10)


def test_digits_is_the_real_sklearn_set():
    from sklearn.datasets import load_digits

    ds = digits_dataset()
    assert len(ds["train"]) + len(ds["validation"]) == len(load_digits().target) == 1797
    assert isinstance(ds["train"].features["label"], ClassLabel)
    assert ds["train"].features["label"].names == [str(i) for i in range(10)]
    # Stratified: every class in both splits.
    assert set(ds["validation"]["label"]) == set(range(10))
    img = ds["train"][0]["image"]
    assert img.size == (8, 8) and img.mode == "L"


def test_prepare_digits_views(model):
    raw = digits_dataset()
    ds = prepare_datasets(raw, model, image_size=32)
    assert len(ds.train_dataset) == len(ds.score_dataset) == 1437
    assert ds.id2label[3] == "3" and ds.label2id["7"] == 7
    ex_train, ex_score = ds.train_dataset[5], ds.score_dataset[5]
    assert ex_train["index"] == ex_score["index"] == 5
    assert ex_train["labels"] == ex_score["labels"] == raw["train"][5]["label"]
    assert ex_score["pixel_values"].shape == (3, 32, 32)  # grayscale became 3-channel RGB
    # The eval view is deterministic, the training view is augmented.
    assert torch.equal(ds.score_dataset[5]["pixel_values"], ex_score["pixel_values"])
    train_views = [ds.train_dataset[5]["pixel_values"] for _ in range(4)]
    assert any(not torch.equal(train_views[0], v) for v in train_views[1:])


def test_max_samples(model):
    ds = prepare_datasets(digits_dataset(), model, image_size=32, max_train_samples=100, max_eval_samples=20)
    assert len(ds.train_dataset) == 100 and len(ds.eval_dataset) == 20
    assert ds.score_dataset[99]["index"] == 99
    with pytest.raises(ValueError, match="max_train_samples must be >= 1"):
        prepare_datasets(digits_dataset(), model, max_train_samples=0)


def test_detect_columns_cifar_style_and_errors():
    from datasets import Features
    from datasets import Image as ImageFeature

    features = Features(
        {"img": ImageFeature(), "fine_label": ClassLabel(names=["a", "b"]), "coarse_label": ClassLabel(names=["x"])}
    )
    ds = Dataset.from_dict(
        {"img": [Image.new("RGB", (4, 4))], "fine_label": [1], "coarse_label": [0]}, features=features
    )
    assert detect_columns(ds) == ("img", "fine_label")
    assert detect_columns(ds, label_column="coarse_label") == ("img", "coarse_label")
    with pytest.raises(
        ValueError, match=r"label_column='target' is not a column.*\['img', 'fine_label', 'coarse_label'\]"
    ):
        detect_columns(ds, label_column="target")
    plain = Dataset.from_dict({"picture": [1], "y": [0]})
    with pytest.raises(ValueError, match=r"cannot find the image column.*picture"):
        detect_columns(plain)


def write_folder(root, sizes, modes=("RGB", "L", "RGBA")):
    for c, n in enumerate(sizes):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(n):
            mode = modes[i % len(modes)]
            Image.new(mode, (10, 12), color=(i * 20 % 255) if mode == "L" else tuple([i * 20 % 255] * len(mode))).save(
                d / f"{i}.png"
            )


def test_imagefolder_splits_and_modes(tmp_path, model):
    write_folder(tmp_path / "train", [4, 3])
    write_folder(tmp_path / "val", [2, 2])
    raw = load_image_datasets(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"))
    assert len(raw["train"]) == 7 and len(raw["validation"]) == 4
    ds = prepare_datasets(raw, model, image_size=16)
    assert sorted(ds.id2label.values()) == ["class_0", "class_1"]
    x = torch.stack([ds.score_dataset[i]["pixel_values"] for i in range(7)])
    assert x.shape == (7, 3, 16, 16)  # L and RGBA converted to RGB


def test_missing_validation(tmp_path):
    write_folder(tmp_path / "train", [2, 2])
    with pytest.raises(ValueError, match="no validation split.*--validation_dir"):
        load_image_datasets(train_dir=str(tmp_path / "train"))


def test_unlabelled_split_refused_before_training(model):
    """ImageNet's test split has labels -1: refused when the datasets are prepared, not after training."""
    raw = digits_dataset()
    val = raw["validation"].cast_column("label", datasets.Value("int64")).map(lambda r: {"label": -1})
    with pytest.raises(ValueError, match="validation split has 360 labels outside \\[0, 10\\).*row 0: -1"):
        prepare_datasets(DatasetDict(train=raw["train"], validation=val), model, image_size=16)


def test_fingerprint_follows_the_indexed_data(model):
    a = prepare_datasets(digits_dataset(), model, image_size=16, max_train_samples=300, seed=0)
    b = prepare_datasets(digits_dataset(), model, image_size=16, max_train_samples=300, seed=0)
    c = prepare_datasets(digits_dataset(), model, image_size=16, max_train_samples=300, seed=1)
    assert a.fingerprint == b.fingerprint and a.fingerprint != c.fingerprint


def test_bad_image_named_or_skipped(tmp_path, model):
    write_folder(tmp_path / "train", [3, 3])
    write_folder(tmp_path / "val", [1, 1])
    raw = load_image_datasets(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"))
    broken = raw["train"].cast_column("image", raw["train"].features["image"].__class__(decode=False))
    rows = broken.to_dict()
    # In-memory bytes, as from the Hub: decoded on access only (image folders' files are opened when prepared).
    rows["image"] = [{"bytes": Path(v["path"]).read_bytes(), "path": None} for v in rows["image"]]
    rows["image"][4] = {"bytes": b"not an image", "path": None}
    raw = DatasetDict(train=Dataset.from_dict(rows, features=broken.features), validation=raw["validation"])
    ds = prepare_datasets(raw, model, image_size=16)
    ds.score_dataset[3]  # fine
    with pytest.raises(ValueError, match="cannot decode the image of train row 4.*--skip_bad_images"):
        ds.score_dataset[4]
    rows["image"][4] = {"bytes": b"not an image", "path": "/data/train/cat/4.jpg"}
    named = DatasetDict(train=Dataset.from_dict(rows, features=broken.features), validation=raw["validation"])
    with pytest.raises(ValueError, match="train row 4 \\(/data/train/cat/4.jpg\\)"):
        prepare_datasets(named, model, image_size=16).score_dataset[4]
    rows["image"][4] = {"bytes": b"not an image", "path": None}
    skipped = prepare_datasets(raw, model, image_size=16, skip_bad_images=True)
    assert skipped.num_skipped == 1 and len(skipped.train_dataset) == 5
    assert [skipped.score_dataset[i]["index"] for i in range(5)] == list(range(5))
    labels = np.array([skipped.score_dataset[i]["labels"] for i in range(5)])
    assert labels.tolist() == [r for i, r in enumerate(rows["label"]) if i != 4]


def test_column_values_match_row_by_row_reads():
    """The arrow path gives what reading every row does, through shuffle, select and filter maps."""
    from acs_hf.data import column_values

    ds = Dataset.from_dict({"label": [7, 3, 9, 1, 4, 4, 8], "x": list(range(7))})
    views = [ds, ds.shuffle(seed=3), ds.shuffle(seed=3).select([5, 0, 2]), ds.filter(lambda r: r["x"] % 2 == 0)]
    for view in views:
        assert column_values(view, "label").tolist() == [view[i]["label"] for i in range(len(view))]


def test_views_keep_the_table_and_offer_labels(model):
    """Selecting and filtering keep an index map (no copy of the image bytes), and ``labels``
    equals the labels the rows yield."""
    ds = prepare_datasets(digits_dataset(), model, image_size=16, max_train_samples=200, skip_bad_images=True)
    assert ds.train_dataset.dataset._indices is not None  # not flattened into a new table
    expected = [ds.score_dataset[i]["labels"] for i in range(len(ds.score_dataset))]
    assert ds.score_dataset.labels.tolist() == expected and ds.score_dataset.labels.dtype == np.int64
    batch = ds.score_dataset.__getitems__([3, 1])
    assert [b["index"] for b in batch] == [3, 1]
    assert torch.equal(batch[0]["pixel_values"], ds.score_dataset[3]["pixel_values"])


def _steps(transform) -> dict:
    return {type(t).__name__: t for t in transform.transforms}


def test_augmentation_controls_reach_timm_transforms(model):
    """timm train.py's controls, underscored, go to create_transform; the defaults are timm's."""
    from timm.data import create_transform, resolve_data_config

    from acs_hf.run.arguments import DataArguments

    default = prepare_datasets(digits_dataset(), model, image_size=32, augmentation=DataArguments().augmentation())
    timm_default = create_transform(**resolve_data_config({"input_size": (3, 32, 32)}, model=model), is_training=True)
    assert repr(default.train_dataset.transform) == repr(timm_default)  # today's behaviour kept
    args = DataArguments(hflip=0.0, vflip=1.0, scale=[0.5, 1.0], ratio=[0.9, 1.1], color_jitter=0.0, reprob=0.25,
                         interpolation="bilinear", crop_pct=0.5)  # fmt: skip
    ds = prepare_datasets(digits_dataset(), model, image_size=32, augmentation=args.augmentation())
    train, evaluation = _steps(ds.train_dataset.transform), _steps(ds.eval_dataset.transform)
    assert "RandomHorizontalFlip" not in train and train["RandomVerticalFlip"].p == 1.0
    crop = train["RandomResizedCropAndInterpolation"]
    assert crop.scale == (0.5, 1.0) and crop.ratio == (0.9, 1.1)
    assert "ColorJitter" not in train or train["ColorJitter"].brightness is None  # jitter 0: identity
    assert train["RandomErasing"].probability == 0.25
    assert evaluation["Resize"].size == 64 and str(evaluation["Resize"].interpolation) == "InterpolationMode.BILINEAR"
    x = ds.train_dataset[0]["pixel_values"]
    assert x.shape == (3, 32, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hflip": 1.5}, "hflip must be a finite number in \\[0, 1\\], got 1.5"),
        ({"scale": [0.5]}, "scale must be two numbers"),
        ({"scale": [0.9, 0.5]}, "scale must be two numbers 0 < low <= high <= 1"),
        ({"ratio": [0, 1]}, "ratio must be two numbers"),
        ({"interpolation": "cubic"}, "interpolation='cubic' is not one of bilinear"),
        ({"crop_pct": 1.5}, "crop_pct must be a finite number in \\(0, 1\\] or unset, got 1.5"),
        ({"auto_augment": "bogus"}, "auto_augment='bogus' is not a timm policy"),
        ({"color_jitter": -1}, "color_jitter must be a finite number >= 0"),
    ],
)
def test_augmentation_arguments_validated(kwargs, message):
    from acs_hf.run.arguments import DataArguments

    with pytest.raises(ValueError, match=message):
        DataArguments(**kwargs)


def test_score_view_at_another_resolution(model):
    """The scoring view at 16 px: timm's eval transform built independently at that size, same rows;
    training and evaluation views keep the run's 32 px."""
    from timm.data import create_transform

    raw = digits_dataset()
    ds = prepare_datasets(raw, model, image_size=32, score_image_size=16)
    small = ds.score_dataset[7]
    assert small["pixel_values"].shape == (3, 16, 16) and small["index"] == 7
    assert ds.eval_dataset[0]["pixel_values"].shape == (3, 32, 32)
    assert ds.train_dataset[7]["pixel_values"].shape == (3, 32, 32)
    expected = create_transform(**{**ds.data_config, "input_size": (3, 16, 16)}, is_training=False)(
        raw["train"][7]["image"].convert("RGB")
    )
    torch.testing.assert_close(small["pixel_values"], expected)
    with pytest.raises(ValueError, match="score_image_size must be an integer >= 8, got 4"):
        prepare_datasets(raw, model, image_size=32, score_image_size=4)
