"""datasets.layout.check_layout: one test per broken layout; each error is one line naming the
path and a fix command."""
from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from datasets.layout import LayoutError, check_layout
from datasets.synthetic import PARAMS_FILE, SyntheticParams, make_synthetic
from datasets.voc import read_cls_labels
from datasets.voc_lists import write_cls_labels, write_name_list

K = 3
SPLITS = ["train_aug", "val"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("layout") / "syn")
    make_synthetic(root, SyntheticParams(num_fg_classes=K, num_train=5, num_val=3, size=48, seed=0),
                   progress=False)
    return root


@pytest.fixture
def root(pristine, tmp_path) -> str:
    copy = str(tmp_path / "data")
    shutil.copytree(pristine, copy)
    return copy


def _cfg(root: str, **kw) -> SimpleNamespace:
    return SimpleNamespace(**{"name": "voc", "root": root, "list_dir": None,
                              "num_classes": K + 1, **kw})


def _error(cfg, path: str, fix: str = "python -m", **kw) -> str:
    with pytest.raises(LayoutError) as info:
        check_layout(cfg, SPLITS, **kw)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in msg and path in msg and "fix:" in msg and fix in msg, msg
    return msg


def _seg(root: str, *parts: str) -> str:
    return os.path.join(root, "ImageSets", "Segmentation", *parts)


def test_valid_layout_passes(root):
    from omegaconf import OmegaConf
    check_layout(_cfg(root), SPLITS)
    check_layout(OmegaConf.create(vars(_cfg(root))), SPLITS, max_masks=None)


def test_missing_root(tmp_path):
    missing = str(tmp_path / "nowhere")
    _error(_cfg(missing), missing, "tools.prepare_voc")


def test_missing_image_folder(root):
    shutil.rmtree(os.path.join(root, "JPEGImages"))
    _error(_cfg(root), os.path.join(root, "JPEGImages"))


def test_missing_mask_folder(root):
    shutil.rmtree(os.path.join(root, "SegmentationClassAug"))
    _error(_cfg(root), os.path.join(root, "SegmentationClassAug"))


def test_missing_split_list(root):
    os.remove(_seg(root, "val.txt"))
    msg = _error(_cfg(root), _seg(root, "val.txt"), "datasets.synthetic")
    assert "--force" in msg


def test_empty_split_list(root):
    write_name_list(_seg(root, "val.txt"), [])
    _error(_cfg(root), _seg(root, "val.txt"))


def test_list_names_a_missing_image(root):
    path = os.path.join(root, "JPEGImages", "val_00001.jpg")
    os.remove(path)
    _error(_cfg(root), path)


def test_list_names_a_missing_mask(root):
    path = os.path.join(root, "SegmentationClassAug", "train_00002.png")
    os.remove(path)
    _error(_cfg(root), path)


def test_mask_with_values_outside_range(root):
    path = os.path.join(root, "SegmentationClassAug", "val_00000.png")
    mask = np.array(Image.open(path))
    mask[:4, :4] = K + 2
    Image.fromarray(mask).save(path)
    msg = _error(_cfg(root), path)
    assert str(K + 2) in msg


def test_bad_mask_beyond_max_masks_is_not_read(root):
    path = os.path.join(root, "SegmentationClassAug", "val_00002.png")
    Image.fromarray(np.full((48, 48), 99, np.uint8)).save(path)
    check_layout(_cfg(root), SPLITS, max_masks=2)  # only the first 2 masks of each split
    _error(_cfg(root), path, max_masks=None)


def test_unreadable_mask(root):
    path = os.path.join(root, "SegmentationClassAug", "train_00001.png")
    with open(path, "wb") as f:
        f.write(b"broken")
    _error(_cfg(root), path)


def test_mask_size_differs_from_image(root):
    path = os.path.join(root, "SegmentationClassAug", "train_00000.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(path)
    _error(_cfg(root), path)


def test_missing_label_file(root):
    os.remove(_seg(root, "cls_labels.npz"))
    _error(_cfg(root), _seg(root, "cls_labels.npz"))


def test_label_file_with_wrong_k(root):
    msg = _error(_cfg(root, num_classes=21), _seg(root, "cls_labels.npz"), "data.num_classes")
    assert f"data.num_classes={K + 1}" in msg


def test_label_file_missing_names(root):
    names, labels = read_cls_labels(_seg(root, "cls_labels.npz"))
    write_cls_labels(_seg(root, "cls_labels.npz"), names[:-2], labels[:-2])
    _error(_cfg(root), _seg(root, "cls_labels.npz"))


def test_label_file_disagrees_with_masks(root):
    names, labels = read_cls_labels(_seg(root, "cls_labels.npz"))
    labels = labels.copy()
    labels[0] = 1 - labels[0]
    write_cls_labels(_seg(root, "cls_labels.npz"), names, labels)
    msg = _error(_cfg(root), _seg(root, "cls_labels.npz"))
    assert names[0] in msg


def test_label_file_not_an_npz(root):
    with open(_seg(root, "cls_labels.npz"), "wb") as f:
        f.write(b"pickle-free? no, just junk")
    _error(_cfg(root), _seg(root, "cls_labels.npz"))


def test_voc_fix_names_prepare_voc_with_list_dir(root, tmp_path):
    os.remove(os.path.join(root, PARAMS_FILE))  # now a plain VOC-layout folder
    list_dir = str(tmp_path / "lists")
    msg = _error(_cfg(root, list_dir=list_dir), os.path.join(list_dir, "train_aug.txt"))
    assert f"python -m tools.prepare_voc --root {root} --list-dir {list_dir} --num-fg-classes {K}" in msg


def test_coco_layout_errors(tmp_path):
    root = tmp_path / "COCO"
    (root / "JPEGImages" / "val2014").mkdir(parents=True)
    cfg = _cfg(str(root), name="coco")
    _error(cfg, str(root / "SegmentationClass"), "tools.prepare_coco")
    (root / "SegmentationClass" / "val2014").mkdir(parents=True)
    name = "COCO_val2014_000000000042"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "JPEGImages" / "val2014" / f"{name}.jpg")
    write_name_list(str(root / "ImageSets" / "Segmentation" / "val.txt"), [name])
    write_cls_labels(str(root / "ImageSets" / "Segmentation" / "cls_labels.npz"), [name],
                     np.zeros((1, K), np.uint8))
    with pytest.raises(LayoutError) as info:
        check_layout(cfg, ["val"])
    assert str(root / "SegmentationClass" / "val2014" / "000000000042.png") in str(info.value)
    assert "tools.prepare_coco" in str(info.value)
    write_name_list(str(root / "ImageSets" / "Segmentation" / "val.txt"), ["42"])
    with pytest.raises(LayoutError, match="val.txt.*12 digits"):
        check_layout(cfg, ["val"])


def test_unreadable_image_and_mask_are_named(root):
    """A JPEG cut inside its header (PIL: "Truncated File Read", no path of its own) and a
    corrupt PNG mask: the one-line error names the file."""
    image = os.path.join(root, "JPEGImages", "val_00001.jpg")
    with open(image, "rb") as f:
        head = f.read(100)
    with open(image, "wb") as f:
        f.write(head)
    msg = _error(_cfg(root), image)
    assert "cannot read image" in msg and "Truncated" in msg
    shutil.copy(os.path.join(root, "JPEGImages", "val_00000.jpg"), image)   # repaired
    check_layout(_cfg(root), SPLITS)
    mask = os.path.join(root, "SegmentationClassAug", "val_00002.png")
    with open(mask, "rb") as f:
        data = f.read()
    with open(mask, "wb") as f:
        f.write(data[: len(data) // 2])
    _error(_cfg(root), mask)
