"""MS COCO 2014 in VOC style (METHOD.md §9).

Names are the official file stems, e.g. `COCO_train2014_000000000009` (as in the reference lists):
image <root>/JPEGImages/train2014/<name>.jpg, mask <root>/SegmentationClass/train2014/
000000000009.png (12-digit id, values 0..80, 255 ignore). The folder follows the name's prefix,
so a split list may mix train2014 and val2014 images. Lists and masks come from
`python -m tools.prepare_coco`.
"""
from __future__ import annotations

import os
import re

from .voc import VOCDataset

CLASS_NAMES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")
SUBSETS = ("train2014", "val2014")
_NAME = re.compile(r"COCO_(train2014|val2014)_(\d{12})")


def parse_name(name: str) -> tuple[str, str]:
    """'COCO_val2014_000000000042' -> ('val2014', '000000000042')."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"COCO name {name!r} is not of the form "
                         "COCO_<train2014|val2014>_<12 digits>")
    return m.group(1), m.group(2)


class COCODataset(VOCDataset):
    """Same stages and return types as `VOCDataset`; num_classes 81, COCO augmentation."""

    image_folder = "JPEGImages"
    mask_folder = "SegmentationClass"
    default_aug = "coco"

    def __init__(self, root: str, split: str, stage: str, num_classes: int = 81, **kwargs):
        super().__init__(root, split, stage, num_classes=num_classes, **kwargs)

    @classmethod
    def image_path(cls, root: str, name: str) -> str:
        subset, _ = parse_name(name)
        return os.path.join(root, cls.image_folder, subset, name + ".jpg")

    @classmethod
    def mask_path(cls, root: str, name: str) -> str:
        subset, image_id = parse_name(name)
        return os.path.join(root, cls.mask_folder, subset, image_id + ".png")
