"""tools.prepare_voc on a tiny fake VOCdevkit; tools.prepare_coco on a hand-written instances json."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from datasets.voc import read_cls_labels, read_mask, read_name_list
from tools.prepare_coco import prepare_coco
from tools.prepare_voc import main as prepare_voc_main, prepare_voc
from utils.io import atomic_open


def _presence_loop(mask: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros(k, dtype=np.uint8)
    for v in mask.ravel():
        if 1 <= v <= k:
            out[v - 1] = 1
    return out


def _fake_voc(root: str, k: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "SegmentationClassAug"))
    os.makedirs(os.path.join(root, "ImageSets", "Segmentation"))
    masks = {}
    for i, name in enumerate(["2007_000032", "2007_000039", "2008_000002", "2009_000010",
                              "2011_003276"]):
        m = np.zeros((9, 11), dtype=np.uint8)
        for c in rng.choice(np.arange(1, k + 1), size=i % 3, replace=False):
            y, x = rng.integers(0, 7, 2)
            m[y:y + 3, x:x + 3] = c
        m[0, :] = 255 if i % 2 else m[0, :]
        masks[name] = m
        img = Image.fromarray(m)
        if i == 3:  # a palette PNG: indices must be read, not colours
            img = img.convert("P")
            img.putpalette(list(rng.integers(0, 256, 768)))
        img.save(os.path.join(root, "SegmentationClassAug", name + ".png"))
    seg = os.path.join(root, "ImageSets", "Segmentation")
    with open(os.path.join(seg, "val.txt"), "w") as f:
        f.write("2007_000039\n2009_000010\n")
    with open(os.path.join(seg, "test.txt"), "w") as f:
        f.write("2008_000001\n2008_000003\n")
    return masks


def test_prepare_voc_lists_and_labels(tmp_path):
    root = str(tmp_path / "VOC2012")
    masks = _fake_voc(root, k=20)
    prepare_voc_main(["--root", root])
    seg = os.path.join(root, "ImageSets", "Segmentation")
    assert read_name_list(os.path.join(seg, "train_aug.txt")) == ["2007_000032", "2008_000002",
                                                                  "2011_003276"]
    assert read_name_list(os.path.join(seg, "val.txt")) == ["2007_000039", "2009_000010"]
    assert read_name_list(os.path.join(seg, "test.txt")) == ["2008_000001", "2008_000003"]
    names, labels = read_cls_labels(os.path.join(seg, "cls_labels.npz"))
    assert names == sorted(masks)
    assert labels.dtype == np.uint8 and labels.shape == (5, 20)
    for name, row in zip(names, labels):
        np.testing.assert_array_equal(row, _presence_loop(masks[name], 20))
    assert labels.sum() > 0
    with np.load(os.path.join(seg, "cls_labels.npz"), allow_pickle=False) as z:
        assert z["names"].dtype.kind == "U"
    assert not [f for f in os.listdir(seg) if f.endswith(".tmp")]


def test_prepare_voc_list_dir_and_num_fg_classes(tmp_path):
    root = str(tmp_path / "VOC2012")
    masks = _fake_voc(root, k=5, seed=1)
    out = str(tmp_path / "lists")
    counts = prepare_voc(root, list_dir=out, num_fg_classes=5)
    assert counts == {"train_aug": 3, "val": 2, "test": 2}
    assert not os.path.exists(os.path.join(root, "ImageSets", "Segmentation", "train_aug.txt"))
    names, labels = read_cls_labels(os.path.join(out, "cls_labels.npz"))
    assert labels.shape == (5, 5)
    for name, row in zip(names, labels):
        np.testing.assert_array_equal(row, _presence_loop(masks[name], 5))


def test_prepare_voc_without_val_list(tmp_path):
    root = str(tmp_path / "VOC2012")
    _fake_voc(root)
    os.remove(os.path.join(root, "ImageSets", "Segmentation", "val.txt"))
    counts = prepare_voc(root)
    assert counts["train_aug"] == 5 and "val" not in counts


def test_prepare_voc_bad_mask_value_names_the_file(tmp_path, capsys):
    root = str(tmp_path / "VOC2012")
    _fake_voc(root, k=20)
    bad = os.path.join(root, "SegmentationClassAug", "2008_000002.png")
    Image.fromarray(np.full((4, 4), 37, np.uint8)).save(bad)
    with pytest.raises(SystemExit) as exc:
        prepare_voc_main(["--root", root])
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the progress bar
    assert exc.value.code == 2 and re.match(r"error: .*2008_000002\.png.*37", err)


def test_prepare_voc_val_without_mask(tmp_path):
    root = str(tmp_path / "VOC2012")
    _fake_voc(root)
    os.remove(os.path.join(root, "SegmentationClassAug", "2009_000010.png"))
    with pytest.raises(FileNotFoundError, match="2009_000010"):
        prepare_voc(root)


def test_atomic_open_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_open(str(target), "w") as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with atomic_open(str(target), "w") as f:
        f.write("done")
    assert target.read_text() == "done" and os.listdir(tmp_path) == ["out.txt"]


# ---------------------------------------------------------------------------------------------
# COCO: category ids 1, 3, 18 (listed out of order) -> classes 1, 2, 3.

def _rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _coco_json(path, images, annotations):
    cats = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": cats}, f)


def _fake_coco(root: str) -> None:
    from pycocotools import mask as mask_utils
    ann_dir = os.path.join(root, "annotations")
    os.makedirs(ann_dir)
    h, w = 20, 30
    crowd = np.zeros((h, w), dtype=np.uint8)
    crowd[12:18, 20:28] = 1  # crowd region over a car instance and background
    crowd_counts = _rle_counts(crowd)
    rle_dog = mask_utils.encode(np.asfortranarray(_disc(16, 16, 6, 6, 5)))
    rle_dog["counts"] = rle_dog["counts"].decode("ascii")  # compressed RLE as in the json files
    val_images = [
        {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": h, "width": w},
        {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "height": 16, "width": 16},
        {"id": 99, "file_name": "COCO_val2014_000000000099.jpg", "height": 8, "width": 8},
    ]
    # json areas (as the official files carry them), listed neither by size nor by class; the
    # dog/car triangle of image 7 has none (its pixel count stands in)
    val_anns = [
        {"id": 3, "image_id": 42, "category_id": 3, "iscrowd": 0, "segmentation": _rect(8, 5, 24, 16),
         "area": 176.0},
        {"id": 1, "image_id": 42, "category_id": 1, "iscrowd": 0, "segmentation": _rect(2, 2, 12, 10),
         "area": 80.0},
        {"id": 4, "image_id": 42, "category_id": 18, "iscrowd": 1,
         "segmentation": {"size": [h, w], "counts": crowd_counts}, "area": 48.0},
        {"id": 2, "image_id": 42, "category_id": 1, "iscrowd": 0, "segmentation": _rect(9, 1, 15, 6),
         "area": 30.0},
        {"id": 7, "image_id": 42, "category_id": 3, "iscrowd": 0, "segmentation": _rect(3, 3, 6, 6),
         "area": 9.0},
        {"id": 5, "image_id": 7, "category_id": 18, "iscrowd": 0, "segmentation": rle_dog,
         "area": 81.0},
        {"id": 6, "image_id": 7, "category_id": 3, "iscrowd": 0,
         "segmentation": [[0, 0, 9, 0, 0, 9]]},
    ]
    _coco_json(os.path.join(ann_dir, "instances_val2014.json"), val_images, val_anns)
    train_images = [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "height": 10, "width": 12}]
    train_anns = [{"id": 9, "image_id": 5, "category_id": 18, "iscrowd": 0,
                   "segmentation": _rect(1, 1, 8, 8)}]
    _coco_json(os.path.join(ann_dir, "instances_train2014.json"), train_images, train_anns)


def _disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def _rle_counts(m: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE (column-major run lengths starting with zeros), written by hand."""
    flat = m.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return counts


def _expected_mask(coco, image_id: int, cat_index: dict[int, int], rule: str) -> np.ndarray:
    """The documented rules, pixel by pixel, on pycocotools' own annToMask rasterisation."""
    info = coco.imgs[image_id]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=None))
    masks = [(cat_index[a["category_id"]], a["iscrowd"], coco.annToMask(a), a.get("area"))
             for a in anns]
    out = np.zeros((info["height"], info["width"]), dtype=np.uint8)
    for y in range(info["height"]):
        for x in range(info["width"]):
            if rule == "area":   # the smallest covering annotation (first in the file on ties)
                best = None
                for i, (c, crowd, m, area) in enumerate(masks):
                    size = area if area is not None else int(m.sum())
                    if m[y, x] and (best is None or size < best[0]):
                        best = (size, c)
                out[y, x] = best[1] if best else 0
                continue
            classes = {c for c, crowd, m, _ in masks if not crowd and m[y, x]}
            in_crowd = any(crowd and m[y, x] for c, crowd, m, _ in masks)
            if in_crowd or len(classes) > 1:
                out[y, x] = 255
            elif classes:
                out[y, x] = classes.pop()
    return out


# hand-checked pixels (y, x) of image 42: person only, person+person (same class), person+big
# car, small car inside the person, car only, car+crowd dog, crowd only, background
SPOTS = [(8, 4), (3, 10), (8, 10), (4, 4), (12, 15), (14, 22), (16, 26), (18, 2)]
SPOT_VALUES = {"area": (1, 1, 1, 2, 2, 3, 3, 0), "strict": (1, 1, 255, 255, 2, 255, 255, 0)}


@pytest.mark.parametrize("workers, rule", [(1, "area"), (2, "area"), (1, "strict")])
def test_prepare_coco_masks_lists_labels(tmp_path, workers, rule):
    from pycocotools.coco import COCO
    root = str(tmp_path / "COCO")
    _fake_coco(root)
    extra = {} if rule == "area" else {"rule": rule}   # area is the default
    counts = prepare_coco(root, workers=workers, **extra)
    assert counts == {"train": 1, "val": 2, "val_part": 2}
    seg = os.path.join(root, "ImageSets", "Segmentation")
    assert read_name_list(os.path.join(seg, "val.txt")) == ["COCO_val2014_000000000007",
                                                            "COCO_val2014_000000000042"]
    assert read_name_list(os.path.join(seg, "val_part.txt")) == read_name_list(
        os.path.join(seg, "val.txt"))
    assert read_name_list(os.path.join(seg, "train.txt")) == ["COCO_train2014_000000000005"]
    assert not os.path.exists(os.path.join(root, "SegmentationClass", "val2014", "000000000099.png"))

    cat_index = {1: 1, 3: 2, 18: 3}
    coco = COCO(os.path.join(root, "annotations", "instances_val2014.json"))
    names, labels = read_cls_labels(os.path.join(seg, "cls_labels.npz"))
    rows = dict(zip(names, labels))
    for image_id in (42, 7):
        got = read_mask(os.path.join(root, "SegmentationClass", "val2014", f"{image_id:012d}.png"))
        want = _expected_mask(coco, image_id, cat_index, rule)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(rows[f"COCO_val2014_{image_id:012d}"], _presence_loop(want, 3))
    m42 = read_mask(os.path.join(root, "SegmentationClass", "val2014", "000000000042.png"))
    assert tuple(int(m42[y, x]) for y, x in SPOTS) == SPOT_VALUES[rule]
    assert set(np.unique(m42)) == ({0, 1, 2, 3} if rule == "area" else {0, 1, 2, 255})
    m7 = read_mask(os.path.join(root, "SegmentationClass", "val2014", "000000000007.png"))
    # the triangle (about 36 pixels, no json area) is smaller than the dog disc: it wins the overlap
    assert m7[3, 3] == (2 if rule == "area" else 255)
    np.testing.assert_array_equal(rows["COCO_train2014_000000000005"], [0, 0, 1])


def test_prepare_coco_refuses_masks_of_another_rule(tmp_path, capsys):
    from tools.prepare_coco import main as prepare_coco_main
    root = str(tmp_path / "COCO")
    _fake_coco(root)
    prepare_coco(root, subsets=["val2014"])
    mask = os.path.join(root, "SegmentationClass", "val2014", "000000000042.png")
    before = open(mask, "rb").read()
    lists = os.path.join(root, "ImageSets", "Segmentation")
    with pytest.raises(SystemExit) as exc:
        prepare_coco_main(["--root", root, "--rule", "strict", "--workers", "1"])
    assert exc.value.code == 2
    msg = capsys.readouterr().err.strip().splitlines()[-1]   # after the progress bar
    assert msg.startswith("error: ")
    assert "rule 'area'" in msg and "--rule area" in msg and "\n" not in msg
    assert open(mask, "rb").read() == before
    assert not os.path.exists(os.path.join(lists, "train.txt"))   # nothing half-written
    assert not os.path.exists(os.path.join(root, "SegmentationClass", "train2014"))
    # masks of the tool before --rule (no .rule file) were strict
    os.remove(os.path.join(root, "SegmentationClass", "val2014", ".rule"))
    with pytest.raises(ValueError, match="--rule strict"):
        prepare_coco(root, subsets=["val2014"])
    prepare_coco(root, subsets=["val2014"], rule="strict")   # resumed as strict


def test_prepare_coco_is_resumable(tmp_path):
    root = str(tmp_path / "COCO")
    _fake_coco(root)
    prepare_coco(root)
    mask_dir = os.path.join(root, "SegmentationClass", "val2014")
    paths = sorted(os.path.join(mask_dir, f) for f in os.listdir(mask_dir) if f.endswith(".png"))
    before = {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in paths}
    os.remove(paths[0])
    prepare_coco(root)
    for p in paths[1:]:
        assert os.stat(p).st_mtime_ns == before[p][0]  # kept, not rewritten
    assert open(paths[0], "rb").read() == before[paths[0]][1]  # rewritten identically
    seg = os.path.join(root, "ImageSets", "Segmentation")
    names, _ = read_cls_labels(os.path.join(seg, "cls_labels.npz"))
    assert len(names) == 3
    # converting one subset again keeps the other subset's label rows
    prepare_coco(root, subsets=["val2014"])
    names2, _ = read_cls_labels(os.path.join(seg, "cls_labels.npz"))
    assert names2 == names
