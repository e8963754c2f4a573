"""PASCAL VOC 2012 (METHOD.md §9) and the file formats shared by every dataset here.

Layout: <root>/JPEGImages/<name>.jpg, <root>/SegmentationClassAug/<name>.png (class indices,
255 = ignore). Split lists `<list_dir>/<split>.txt` (one name a line) and image labels
`<list_dir>/cls_labels.npz` (`names` unicode (N,), `labels` uint8 (N, K), no pickle), written by
`python -m tools.prepare_voc`; list_dir defaults to <root>/ImageSets/Segmentation.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.errors import first_line
from utils.metrics import IGNORE_INDEX

from .sampler import SampleError
from .transforms import JITTER, RESCALE, build_train_transform, normalise

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor")
LABEL_FILE = "cls_labels.npz"


def default_list_dir(root: str) -> str:
    return os.path.join(root, "ImageSets", "Segmentation")


def read_image(path: str) -> Image.Image:
    """RGB PIL image (grayscale / CMYK converted, gray stacked to 3 channels); one-line errors."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now so a truncated file fails here, naming its path
            return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from None


def image_size(path: str) -> tuple[int, int]:
    """(H, W) from the image's header only; ValueError "cannot read image (...)" (the caller
    names the file and the fix)."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image ({exc})") from None


def read_mask(path: str) -> np.ndarray:
    """(H, W) uint8 class indices from an 8-bit L or palette PNG (palette indices, not colours)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P"):
                raise ValueError(f"mode {img.mode}, expected an 8-bit L or P index PNG")
            return np.array(img, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot read mask {path}: {exc}") from None


def read_label(path: str, image: Image.Image) -> torch.Tensor:
    """The mask at `path` as a label (H, W) long; ValueError when its size is not the image's."""
    mask = read_mask(path)
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask {path} is {mask.shape}, image is {(image.height, image.width)}")
    return torch.from_numpy(mask.astype(np.int64))


def read_name_list(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise FileNotFoundError(f"split list not found: {path}") from None


def read_cls_labels(path: str) -> tuple[list[str], np.ndarray]:
    """-> names (N,), labels (N, K) uint8."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names, labels = z["names"], z["labels"]
    except FileNotFoundError:
        raise FileNotFoundError(f"image-label file not found: {path}") from None
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"bad image-label file {path}: {exc}") from None
    if labels.ndim != 2 or len(names) != len(labels):
        raise ValueError(f"bad image-label file {path}: names {names.shape}, labels {labels.shape}")
    return [str(n) for n in names], labels


class VOCDataset(Dataset):
    """stage "train": (name, image (3, crop, crop) float, cls_label (K,) float);
    stage "val": (name, image (3, H, W) float at the original size, label (H, W) long,
    cls_label (K,) float); stage "test" (no masks, e.g. VOC test): like "val" with label all 255
    and cls_label all 0. K = num_classes - 1 (num_classes counts the background)."""

    image_folder = "JPEGImages"
    mask_folder = "SegmentationClassAug"
    default_aug = "voc"

    def __init__(self, root: str, split: str, stage: str, num_classes: int = 21,
                 list_dir: str | None = None, crop_size: int | None = None, aug: str | None = None,
                 rescale: Sequence[float] = RESCALE, jitter_p: float | None = None,
                 jitter: Sequence[float] = JITTER):
        if stage not in ("train", "val", "test"):
            raise ValueError(f"stage must be train, val or test; got {stage!r}")
        if stage == "train" and crop_size is None:
            raise ValueError("stage 'train' needs crop_size (the config's data.crop_size)")
        self.root, self.split, self.stage = root, split, stage
        self.num_classes = num_classes
        self.list_dir = list_dir or default_list_dir(root)
        self.names = read_name_list(os.path.join(self.list_dir, f"{split}.txt"))
        self.labels = self._load_labels() if stage != "test" else None
        self.transform = build_train_transform(aug or self.default_aug, crop_size, rescale,
                                               jitter_p, jitter) if stage == "train" else None

    def _load_labels(self) -> np.ndarray:
        path = os.path.join(self.list_dir, LABEL_FILE)
        names, labels = read_cls_labels(path)
        if labels.shape[1] != self.num_classes - 1:
            raise ValueError(f"{path} has {labels.shape[1]} classes, expected "
                             f"num_classes - 1 = {self.num_classes - 1}")
        row = {n: i for i, n in enumerate(names)}
        missing = [n for n in self.names if n not in row]
        if missing:
            raise ValueError(f"{path} has no labels for {len(missing)} names of split "
                             f"{self.split!r} (first: {missing[0]})")
        return labels[[row[n] for n in self.names]].astype(np.float32)

    @classmethod
    def image_path(cls, root: str, name: str) -> str:
        return os.path.join(root, cls.image_folder, name + ".jpg")

    @classmethod
    def mask_path(cls, root: str, name: str) -> str:
        return os.path.join(root, cls.mask_folder, name + ".png")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int):
        try:
            return self._load(index)
        except (OSError, ValueError) as exc:
            # every data error names its file: the readers do; anything else raised while
            # loading (a transform on a strange image) gets the image's path in front
            msg = first_line(exc)
            folders = (os.path.join(self.root, self.image_folder),
                       os.path.join(self.root, self.mask_folder))
            if not any(folder in msg for folder in folders):
                try:
                    msg = f"{self.image_path(self.root, self.names[index])}: {msg}"
                except ValueError:  # a COCO name that does not parse
                    msg = f"{self.names[index]}: {msg}"
            raise SampleError(msg) from None

    def _load(self, index: int):
        name = self.names[index]
        image = read_image(self.image_path(self.root, name))
        if self.stage == "train":
            return name, self.transform(image), torch.from_numpy(self.labels[index])
        if self.stage == "val":
            label = read_label(self.mask_path(self.root, name), image)
            return name, normalise(image), label, torch.from_numpy(self.labels[index])
        label = torch.full((image.height, image.width), IGNORE_INDEX, dtype=torch.long)
        return name, normalise(image), label, torch.zeros(self.num_classes - 1)
