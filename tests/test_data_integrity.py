"""Image folders whose faults used to surface only mid-training, or never: refused when prepared."""

import pytest
import timm
from PIL import Image

from acs_hf.data import load_image_datasets, prepare_datasets


@pytest.fixture(scope="module")
def model():
    return timm.create_model("test_resnet", num_classes=3)


def write_classes(root, classes, per_class=2):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), color=(60 * i, 0, 0)).save(root / name / f"{i}.jpg")


def folders(tmp_path):
    return load_image_datasets(
        train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"), cache_dir=str(tmp_path / "cache")
    )


def test_validation_class_without_training_images_is_refused(tmp_path, model):
    """imagefolder builds its classes from both splits: a class folder only under the validation
    folder would be an output the model never trains, and images it can never get right."""
    write_classes(tmp_path / "train", ["cat", "dog"])
    write_classes(tmp_path / "val", ["cat", "dog", "zebra"], per_class=3)
    with pytest.raises(
        ValueError, match="validation split has 1 classes with no training images: 'zebra' \\(3 images\\)"
    ):
        prepare_datasets(folders(tmp_path), model, image_size=16)


def test_training_class_without_validation_images_is_fine(tmp_path, model):
    write_classes(tmp_path / "train", ["cat", "dog", "emu"])
    write_classes(tmp_path / "val", ["cat", "emu"])
    ds = prepare_datasets(folders(tmp_path), model, image_size=16)
    assert list(ds.id2label.values()) == ["cat", "dog", "emu"] and len(ds.eval_dataset) == 4


def test_files_that_are_not_images_fail_before_training(tmp_path, model):
    """A zero-byte and a text file named .jpg are found when the datasets are prepared (listed,
    with the way out), not when training first draws their rows; --skip_bad_images drops them."""
    write_classes(tmp_path / "train", ["cat", "dog"], per_class=3)
    write_classes(tmp_path / "val", ["cat", "dog"])
    (tmp_path / "train" / "cat" / "empty.jpg").write_bytes(b"")
    (tmp_path / "train" / "dog" / "notes.jpg").write_text("not an image\n")
    raw = folders(tmp_path)
    with pytest.raises(ValueError, match="2 train files are not images PIL can open: .*--skip_bad_images") as e:
        prepare_datasets(raw, model, image_size=16)
    assert "cat/empty.jpg" in str(e.value) and "dog/notes.jpg" in str(e.value)
    skipped = prepare_datasets(raw, model, image_size=16, skip_bad_images=True)
    assert skipped.num_skipped == 2 and len(skipped.train_dataset) == 6 and len(skipped.eval_dataset) == 4


def test_validation_files_checked_too(tmp_path, model):
    write_classes(tmp_path / "train", ["cat", "dog"])
    write_classes(tmp_path / "val", ["cat", "dog"])
    (tmp_path / "val" / "dog" / "blank.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="1 eval files are not images PIL can open: .*dog/blank.jpg"):
        prepare_datasets(folders(tmp_path), model, image_size=16)
