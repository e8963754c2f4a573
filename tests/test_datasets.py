"""Datasets, augmentations and the synthetic generator on tiny inputs."""
from __future__ import annotations

import os
import random
import shutil
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datasets import COCODataset, VOCDataset, build_dataset, seed_worker
from datasets.sampler import SampleError
from datasets.synthetic import SyntheticParams, class_recipe, make_synthetic, read_params, render
from datasets.transforms import (IMAGENET_MEAN, IMAGENET_STD, JITTER, COCOTrainTransform,
                                 VOCTrainTransform, color_jitter, normalise, random_pad_crop)
from datasets.voc import read_cls_labels, read_mask, read_name_list
from datasets.voc_lists import write_cls_labels, write_name_list

K = 3
SIZE = 64


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("syn") / "synthetic")
    make_synthetic(root, SyntheticParams(num_fg_classes=K, num_train=6, num_val=3, size=SIZE,
                                         seed=0), progress=False)
    return root


def _denorm_loop(image: torch.Tensor, y: int, x: int) -> list[float]:
    return [float(image[c, y, x]) * IMAGENET_STD[c] + IMAGENET_MEAN[c] for c in range(3)]


# --- datasets -------------------------------------------------------------------------------

def test_train_stage_types_and_shapes(syn):
    ds = VOCDataset(syn, "train_aug", "train", num_classes=K + 1, crop_size=48)
    names, labels = read_cls_labels(os.path.join(syn, "ImageSets", "Segmentation", "cls_labels.npz"))
    rows = dict(zip(names, labels))
    assert len(ds) == 6
    for i in range(len(ds)):
        name, image, cls_label = ds[i]
        assert isinstance(name, str) and name == ds.names[i]
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32
        assert cls_label.shape == (K,) and cls_label.dtype == torch.float32
        np.testing.assert_array_equal(cls_label.numpy(), rows[name])


def test_val_stage_original_size_and_values(syn):
    ds = VOCDataset(syn, "val", "val", num_classes=K + 1)
    name, image, label, cls_label = ds[1]
    assert image.shape == (3, SIZE, SIZE) and label.shape == (SIZE, SIZE)
    assert label.dtype == torch.long and cls_label.shape == (K,)
    pixels = np.asarray(Image.open(os.path.join(syn, "JPEGImages", name + ".jpg")).convert("RGB"))
    for y, x in [(0, 0), (5, 17), (SIZE - 1, SIZE - 2), (31, 40)]:
        np.testing.assert_allclose(_denorm_loop(image, y, x), pixels[y, x] / 255.0, atol=1e-5)
    np.testing.assert_array_equal(label.numpy(), read_mask(
        os.path.join(syn, "SegmentationClassAug", name + ".png")))


def test_test_stage_has_no_labels(syn):
    ds = VOCDataset(syn, "val", "test", num_classes=K + 1)
    name, image, label, cls_label = ds[0]
    assert image.shape == (3, SIZE, SIZE)
    assert (label == 255).all() and label.dtype == torch.long and (cls_label == 0).all()


def test_build_dataset_duck_typed(syn):
    from omegaconf import OmegaConf
    fields = dict(name="voc", root=syn, list_dir=None, num_classes=K + 1, crop_size=32,
                  rescale=[0.5, 1.0], jitter_p=0.0, aug="voc")
    for cfg in (SimpleNamespace(**fields), OmegaConf.create(fields)):
        ds = build_dataset(cfg, "train_aug", "train")
        assert isinstance(ds, VOCDataset) and ds[0][1].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset(SimpleNamespace(**{**fields, "name": "ade"}), "val", "val")


def test_wrong_num_classes_names_the_label_file(syn):
    with pytest.raises(ValueError, match="cls_labels.npz"):
        VOCDataset(syn, "val", "val", num_classes=21)


def test_dataloader_with_seeded_workers(syn):
    ds = VOCDataset(syn, "train_aug", "train", num_classes=K + 1, crop_size=32)

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True, num_workers=2,
                                             worker_init_fn=seed_worker, generator=g)
        return [b for b in loader]

    a, b = batches(0), batches(0)
    assert [x[0] for x in a] == [x[0] for x in b]
    assert a[0][1].shape == (3, 3, 32, 32) and a[0][2].shape == (3, K)
    for x, y in zip(a, b):
        torch.testing.assert_close(x[1], y[1])


def test_seed_worker_derives_numpy_and_python_seeds():
    def draw(seed):
        torch.manual_seed(seed)
        seed_worker(0)
        return np.random.rand(), random.random()

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_bad_images_raise_one_line_errors(tmp_path, syn):
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    good = Image.open(os.path.join(syn, "JPEGImages", "val_00000.jpg"))
    good.save(root / "JPEGImages" / "whole.jpg")
    data = (root / "JPEGImages" / "whole.jpg").read_bytes()
    (root / "JPEGImages" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "JPEGImages" / "garbage.jpg").write_bytes(b"not an image at all")
    lists = root / "ImageSets" / "Segmentation"
    write_name_list(str(lists / "val.txt"), ["truncated", "garbage", "missing"])
    write_cls_labels(str(lists / "cls_labels.npz"), ["truncated", "garbage", "missing"],
                     np.zeros((3, K), np.uint8))
    ds = VOCDataset(str(root), "val", "train", num_classes=K + 1, crop_size=32)
    for i, what in enumerate(["cannot decode image", "cannot decode image", "image not found"]):
        with pytest.raises(SampleError) as info:
            ds[i]
        msg = str(info.value)
        assert msg.startswith(what)
        assert os.path.join(str(root), "JPEGImages", ds.names[i] + ".jpg") in msg
        assert "\n" not in msg


def test_coco_paths_and_grayscale(tmp_path):
    root = tmp_path / "COCO"
    names = ["COCO_val2014_000000000042", "COCO_train2014_000000000009"]
    rng = np.random.default_rng(0)
    for name, sub in zip(names, ["val2014", "train2014"]):
        (root / "JPEGImages" / sub).mkdir(parents=True)
        (root / "SegmentationClass" / sub).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(  # grayscale JPEG
            root / "JPEGImages" / sub / f"{name}.jpg")
        Image.fromarray(np.full((20, 24), 2, np.uint8)).save(
            root / "SegmentationClass" / sub / f"{name[-12:]}.png")
    lists = root / "ImageSets" / "Segmentation"
    write_name_list(str(lists / "val.txt"), names)
    write_cls_labels(str(lists / "cls_labels.npz"), names, np.array([[0, 1, 0], [0, 1, 0]]))
    ds = COCODataset(str(root), "val", "val", num_classes=K + 1)
    name, image, label, cls_label = ds[1]
    assert name == names[1] and image.shape == (3, 20, 24)
    torch.testing.assert_close(image[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0],
                               image[2] * IMAGENET_STD[2] + IMAGENET_MEAN[2])
    assert (label == 2).all()
    train = COCODataset(str(root), "val", "train", num_classes=K + 1, crop_size=32)
    assert train[0][1].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="12 digits"):
        COCODataset.image_path(str(root), "000000000042")


# --- transforms -----------------------------------------------------------------------------

def test_normalise_matches_loop():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = normalise(img)
    assert out.shape == (3, 5, 7) and out.dtype == torch.float32
    for y in range(5):
        for x in range(7):
            for c in range(3):
                want = (img[y, x, c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
                assert abs(float(out[c, y, x]) - want) < 1e-5


def _bounds():
    lo = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)
    return lo - 1e-5, hi + 1e-5


@pytest.mark.parametrize("transform", [VOCTrainTransform(32, (0.32, 1.0), 1.0),
                                       COCOTrainTransform(32, (0.32, 1.0), 1.0)])
def test_train_transforms_shape_range_and_seeding(transform):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    lo, hi = _bounds()
    torch.manual_seed(3)
    a = transform(img)
    torch.manual_seed(3)
    b = transform(img)
    torch.manual_seed(4)
    c = transform(img)
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert ((a >= lo) & (a <= hi)).all()
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_voc_transform_keeps_a_constant_colour():
    img = Image.new("RGB", (40, 30), (200, 30, 120))
    out = VOCTrainTransform(24, (0.32, 1.0), jitter_p=0.0)(img)
    want = normalise(np.array([[[200, 30, 120]]], np.uint8))[:, 0, 0]
    torch.testing.assert_close(out, want.view(3, 1, 1).expand(3, 24, 24), atol=1e-5, rtol=0)


def test_jitter_strengths_default_to_spec_and_reach_the_transform(syn):
    """METHOD.md §6: ColorJitter(0.4, 0.4, 0.2, 0.1) in both recipes; `data.jitter` sets the four."""
    from wetr.config import make_config
    assert JITTER == (0.4, 0.4, 0.2, 0.1)
    assert tuple(make_config({}).data.jitter) == JITTER
    j = color_jitter()
    assert (j.brightness, j.contrast, j.saturation, j.hue) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2),
                                                               (-0.1, 0.1))
    cfg = SimpleNamespace(name="voc", root=syn, num_classes=K + 1, crop_size=32,
                          rescale=(0.5, 1.0), jitter_p=1.0, jitter=(0.0, 0.0, 0.3, 0.0))
    jit = build_dataset(cfg, "train_aug", "train").transform.pipeline.transforms[-1].transforms[0]
    assert jit.brightness is None and jit.contrast is None and jit.hue is None
    assert jit.saturation == (0.7, 1.3)


def test_zero_jitter_changes_no_colour():
    """All-zero strengths with p=1 give the same crop as no jitter at all."""
    img = Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    torch.manual_seed(7)
    a = VOCTrainTransform(24, (0.5, 1.0), jitter_p=1.0, jitter=(0, 0, 0, 0))(img)
    torch.manual_seed(7)
    b = VOCTrainTransform(24, (0.5, 1.0), jitter_p=0.0)(img)
    torch.testing.assert_close(a, b)
    torch.manual_seed(7)
    c = VOCTrainTransform(24, (0.5, 1.0), jitter_p=1.0, jitter=(0, 0, 0, 0.3))(img)
    assert not torch.allclose(a, c)  # hue alone moves the colours


@pytest.mark.parametrize("bad", [(0.4, 0.4, 0.2), (0.4, -0.1, 0.2, 0.1), (0.4, 0.4, 0.2, 0.6)])
def test_bad_jitter_is_one_line(bad):
    with pytest.raises(ValueError) as e:
        color_jitter(bad)
    assert "\n" not in str(e.value)


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((t * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _find_window(out: np.ndarray, img: np.ndarray) -> bool:
    """Slow search: is `out` a crop of `img` (or of its flip) placed on a zero canvas?"""
    h, w = img.shape[:2]
    n = out.shape[0]
    H, W = max(n, h), max(n, w)
    for src in (img, img[:, ::-1]):
        for top in range(H - h + 1):
            for left in range(W - w + 1):
                canvas = np.zeros((H, W, 3), np.uint8)
                canvas[top:top + h, left:left + w] = src
                for y0 in range(H - n + 1):
                    for x0 in range(W - n + 1):
                        if np.array_equal(canvas[y0:y0 + n, x0:x0 + n], out):
                            return True
    return False


@pytest.mark.parametrize("shape", [(10, 14), (20, 23)])
def test_coco_transform_is_a_zero_padded_crop(shape):
    img = np.random.default_rng(2).integers(1, 256, (*shape, 3), dtype=np.uint8)
    t = COCOTrainTransform(16, rescale=(1.0, 1.0), jitter_p=0.0)
    for seed in range(4):
        torch.manual_seed(seed)
        out = _to_uint8(t(Image.fromarray(img)))
        assert _find_window(out, img)


def test_coco_rescale_shrinks_then_pads():
    img = np.full((32, 32, 3), 255, np.uint8)
    torch.manual_seed(0)
    out = _to_uint8(COCOTrainTransform(32, rescale=(0.5, 0.5), jitter_p=0.0)(Image.fromarray(img)))
    assert (out == 255).all(axis=2).sum() == 16 * 16 and (out == 0).all(axis=2).sum() == 32 * 32 - 256


def test_random_pad_crop_loop():
    img = np.random.default_rng(3).integers(1, 256, (6, 9, 3), dtype=np.uint8)
    torch.manual_seed(1)
    out = random_pad_crop(img, 8)
    assert out.shape == (8, 8, 3) and _find_window(out, img)


# --- synthetic generator --------------------------------------------------------------------

def _files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_synthetic_is_deterministic(tmp_path, syn):
    other = str(tmp_path / "again")
    make_synthetic(other, SyntheticParams(num_fg_classes=K, num_train=6, num_val=3, size=SIZE,
                                          seed=0), progress=False)
    assert _files(other) == _files(syn)
    make_synthetic(str(tmp_path / "seed1"), SyntheticParams(num_fg_classes=K, num_train=6,
                                                            num_val=3, size=SIZE, seed=1),
                   progress=False)
    assert _files(str(tmp_path / "seed1"))["JPEGImages/train_00000.jpg"] != \
        _files(syn)["JPEGImages/train_00000.jpg"]


def test_synthetic_layout_and_labels(syn):
    seg = os.path.join(syn, "ImageSets", "Segmentation")
    train, val = read_name_list(os.path.join(seg, "train_aug.txt")), read_name_list(
        os.path.join(seg, "val.txt"))
    assert len(train) == 6 and len(val) == 3 and not set(train) & set(val)
    names, labels = read_cls_labels(os.path.join(seg, "cls_labels.npz"))
    assert sorted(names) == sorted(train + val) and labels.shape == (9, K)
    for name, row in zip(names, labels):
        img = cv2.imread(os.path.join(syn, "JPEGImages", name + ".jpg"))
        mask = read_mask(os.path.join(syn, "SegmentationClassAug", name + ".png"))
        assert img.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
        present = np.zeros(K, np.uint8)
        for v in mask.ravel():  # slow, obvious
            assert v <= K or v == 255
            if 1 <= v <= K:
                present[v - 1] = 1
        np.testing.assert_array_equal(row, present)
        assert 1 <= present.sum() <= 2
        # the ignore band is thin: every 255 pixel is within 3 px of a labelled pixel
        border = mask == 255
        assert 0 < border.mean() < 0.2
        near_label = cv2.dilate((~border).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        assert near_label[border].all()
    assert read_params(syn)["num_fg_classes"] == K


def test_synthetic_is_idempotent_and_regenerates_on_change(tmp_path):
    root = str(tmp_path / "s")
    assert make_synthetic(root, SyntheticParams(num_fg_classes=2, num_train=3, num_val=2, size=48),
                          progress=False)
    stamp = os.stat(os.path.join(root, "JPEGImages", "train_00000.jpg")).st_mtime_ns
    assert not make_synthetic(root, SyntheticParams(num_fg_classes=2, num_train=3, num_val=2,
                                                    size=48), progress=False)
    assert os.stat(os.path.join(root, "JPEGImages", "train_00000.jpg")).st_mtime_ns == stamp
    assert make_synthetic(root, SyntheticParams(num_fg_classes=2, num_train=2, num_val=1, size=48),
                          progress=False)
    assert sorted(os.listdir(os.path.join(root, "JPEGImages"))) == [
        "train_00000.jpg", "train_00001.jpg", "val_00000.jpg"]
    assert make_synthetic(root, SyntheticParams(num_fg_classes=2, num_train=2, num_val=1, size=48),
                          force=True, progress=False)


def test_synthetic_variety_and_colour_is_not_the_class():
    """Objects vary in count, size and position; a nearest-mean colour classifier is weak."""
    k, n = 4, 160
    feats, classes, counts, areas, centres = [], [], [], [], []
    for i in range(n):
        img, mask = render(np.random.default_rng([7, i]), k, SIZE)
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
        objects = 0
        for c in range(1, k + 1):
            m = (mask == c).astype(np.uint8)
            if m.sum() == 0:
                continue
            num, comp = cv2.connectedComponents(m)
            objects += num - 1
            feats.append(img[m > 0].mean(0))
            classes.append(c)
            areas.append(m.sum())
            ys, xs = np.nonzero(m)
            centres.append((ys.mean(), xs.mean()))
        counts.append(objects)
    counts, areas, centres = np.array(counts), np.array(areas), np.array(centres)
    assert {1, 2, 3} <= set(counts.tolist())
    assert set(classes) == set(range(1, k + 1))
    assert areas.max() > 3 * areas.min()
    assert centres.std(0).min() > SIZE / 8
    feats, classes = np.array(feats), np.array(classes)
    half = len(feats) // 2
    means = np.stack([feats[:half][classes[:half] == c].mean(0) for c in range(1, k + 1)])
    pred = np.argmin(((feats[half:, None] - means[None]) ** 2).sum(-1), 1) + 1
    # colour is a cue (chance is 0.25) but not the class: neighbouring hues overlap
    assert 0.35 < (pred == classes[half:]).mean() < 0.85
    assert len({class_recipe(c) for c in range(16)}) == 16


def test_train_stage_needs_crop_size(syn):
    """The crop size has its default in the config only: a train-stage dataset must be given it."""
    with pytest.raises(ValueError, match="crop_size"):
        VOCDataset(syn, "train_aug", "train", num_classes=K + 1)


def test_data_errors_name_the_file_through_the_loader(tmp_path, syn, monkeypatch):
    """A corrupt mask (val stage), a truncated JPEG (train stage, in a DataLoader worker) and an
    error raised by a transform are each one SampleError naming the file, on one line."""
    from torch.utils.data import DataLoader

    root = tmp_path / "syn"
    shutil.copytree(syn, root)
    mask = root / "SegmentationClassAug" / "val_00001.png"
    mask.write_bytes(mask.read_bytes()[:40])
    val = VOCDataset(str(root), "val", "val", num_classes=K + 1)
    with pytest.raises(SampleError) as info:
        val[1]
    assert str(mask) in str(info.value) and "\n" not in str(info.value)
    image = root / "JPEGImages" / "val_00000.jpg"
    image.write_bytes(image.read_bytes()[:300])
    train = VOCDataset(str(root), "val", "train", num_classes=K + 1, crop_size=32)
    loader = DataLoader(train, batch_size=1, num_workers=1)
    with pytest.raises(SampleError) as info:
        next(iter(loader))
    assert str(info.value).startswith(f"cannot decode image {image}")
    assert "\n" not in str(info.value)

    def broken(img):
        raise ValueError("bad crop")
    monkeypatch.setattr(train, "transform", broken)
    with pytest.raises(SampleError) as info:
        train[2]
    assert str(info.value) == f"{root / 'JPEGImages' / 'val_00002.jpg'}: bad crop"
