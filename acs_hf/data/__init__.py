"""The data of a run: datasets from the Hub, image folders or the embedded digits, viewed by row index.

:mod:`~acs_hf.data.loading` loads and prepares the two views of the training split,
:mod:`~acs_hf.data.images` decodes on access, :mod:`~acs_hf.data.view_cache` keeps decoded score
views on disk, :mod:`~acs_hf.data.batch` names the batch's keys. ``from acs_hf.data import ...``
gives the loading API.
"""

from .images import check_images, column_values
from .loading import (
    DIGITS,
    ImageDatasets,
    ImageView,
    class_names,
    data_config,
    decode_image,
    detect_columns,
    digits_dataset,
    load_image_datasets,
    prepare_datasets,
    score_transform,
    timm_transforms,
)

__all__ = [
    "DIGITS",
    "ImageDatasets",
    "ImageView",
    "check_images",
    "class_names",
    "column_values",
    "data_config",
    "decode_image",
    "detect_columns",
    "digits_dataset",
    "load_image_datasets",
    "prepare_datasets",
    "score_transform",
    "timm_transforms",
]
