"""Training augmentations (METHOD.md §6) and ImageNet normalisation.

Randomness comes only from torch's global generator (torchvision v1 transforms included), so a
sample's augmentation is reproducible from the seed set by the loader (`seed_worker`, or the
per-sample seeding of `datasets.sampler.SeededDataset`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# METHOD.md §6's augmentation strengths, one home (the training config's defaults read them):
JITTER = (0.4, 0.4, 0.2, 0.1)   # ColorJitter's brightness, contrast, saturation, hue
RESCALE = (0.32, 1.0)           # RandomResizedCrop's area range (voc) / the rescale range (coco)


def color_jitter(strengths: Sequence[float] = JITTER) -> T.ColorJitter:
    """ColorJitter of (brightness, contrast, saturation, hue). A wrong count is one ValueError
    line here, a bad value one from torchvision; the config checks `data.jitter` up front."""
    if len(strengths) != 4:
        raise ValueError(f"jitter takes 4 strengths (brightness, contrast, saturation, hue); "
                         f"got {list(strengths)}")
    b, c, s, h = (float(v) for v in strengths)
    return T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)


def normalise(image: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> float (3, H, W), ImageNet mean/std."""
    t = torch.from_numpy(np.array(image, dtype=np.uint8))  # a writable copy
    t = t.permute(2, 0, 1).float().div_(255.0)
    return TF.normalize(t, IMAGENET_MEAN, IMAGENET_STD)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _randint(high_inclusive: int) -> int:
    return int(torch.randint(high_inclusive + 1, ()).item())


def random_pad_crop(image: np.ndarray, crop_size: int) -> np.ndarray:
    """Reference `random_crop` without label: place the image at a random offset on a zero canvas
    of max(crop, side) per side, then cut a random crop_size window.

    image: (H, W, 3) uint8 -> (crop_size, crop_size, 3) uint8. Padding is 0 in pixel space, as in
    the reference (mean_rgb=[0, 0, 0]), i.e. -mean/std after normalisation.
    """
    h, w = image.shape[:2]
    H, W = max(crop_size, h), max(crop_size, w)
    canvas = np.zeros((H, W, 3), dtype=np.uint8)
    top, left = _randint(H - h), _randint(W - w)
    canvas[top:top + h, left:left + w] = image
    y0, x0 = _randint(H - crop_size), _randint(W - crop_size)
    return canvas[y0:y0 + crop_size, x0:x0 + crop_size]


class VOCTrainTransform:
    """RandomResizedCrop (bicubic) -> h-flip 0.5 -> ColorJitter with p -> normalise."""

    def __init__(self, crop_size: int, rescale: Sequence[float] = RESCALE,
                 jitter_p: float = 0.5, jitter: Sequence[float] = JITTER):
        self.pipeline = T.Compose([
            T.RandomResizedCrop(crop_size, scale=tuple(rescale),
                                interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(0.5),
            T.RandomApply([color_jitter(jitter)], p=jitter_p),
        ])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """image: PIL RGB -> (3, crop, crop) float."""
        return normalise(self.pipeline(image))


class COCOTrainTransform:
    """ColorJitter with p -> rescale by U(rescale) (bilinear) -> h-flip 0.5 -> zero-padded random
    crop -> normalise (reference CocoClsDataset.transform_image)."""

    def __init__(self, crop_size: int, rescale: Sequence[float] = RESCALE,
                 jitter_p: float = 0.8, jitter: Sequence[float] = JITTER):
        self.crop_size = crop_size
        self.rescale = (float(rescale[0]), float(rescale[1]))
        self.jitter = T.RandomApply([color_jitter(jitter)], p=jitter_p)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """image: PIL RGB -> (3, crop, crop) float."""
        image = self.jitter(image)
        s = _uniform(*self.rescale)
        w, h = image.size
        image = image.resize((max(1, int(s * w)), max(1, int(s * h))), Image.BILINEAR)
        arr = np.asarray(image)
        if torch.rand(()).item() < 0.5:
            arr = arr[:, ::-1]
        return normalise(random_pad_crop(arr, self.crop_size))


def build_train_transform(aug: str, crop_size: int, rescale: Sequence[float] = RESCALE,
                          jitter_p: float | None = None, jitter: Sequence[float] = JITTER
                          ) -> Callable[[Image.Image], torch.Tensor]:
    """aug: "voc" | "coco"; jitter_p None takes that recipe's default (0.5 / 0.8); jitter: the
    ColorJitter strengths (brightness, contrast, saturation, hue), both recipes' by default."""
    if aug == "voc":
        return VOCTrainTransform(crop_size, rescale, 0.5 if jitter_p is None else jitter_p, jitter)
    if aug == "coco":
        return COCOTrainTransform(crop_size, rescale, 0.8 if jitter_p is None else jitter_p, jitter)
    raise ValueError(f"unknown augmentation {aug!r}; expected 'voc' or 'coco'")
