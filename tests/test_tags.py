"""Your own dataset: the tag import (tools/prepare_tags.py), the tag dataset, its layout check,
class names / K resolution, and validation without masks."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import build_dataset, class_names, resolve_classes
from datasets.layout import LayoutError, check_layout
from datasets.tag_dataset_writer import import_tags
from datasets.tag_import import Source, Split, TagImportError, split_cell
from datasets.voc import read_cls_labels, read_name_list
from tools import prepare_tags
from utils.checkpoint import CheckpointError
from utils.dist import DistInfo
from utils.metrics import classifier_scores
from wetr.validate import validate

NAMES = ["a b.jpg", "sub dir/ünï/x (1).PNG", "sub dir/y.jpeg", "z.jpg", "z.png", "deep/er/w.jpg"]
SIZES = {n: (30 + 2 * i, 40 + 3 * i) for i, n in enumerate(NAMES)}   # (H, W), all different


def _image(path: Path, hw, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*hw, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def src(tmp_path) -> Path:
    """Images with odd names (spaces, unicode, nested, both suffixes, a.jpg / a.png pair), a CSV
    with `;` tags, a mask for one image."""
    for i, n in enumerate(NAMES):
        _image(tmp_path / "imgs" / n, SIZES[n], i)
    (tmp_path / "tags.csv").write_text(
        'image,tags\n"a b.jpg",cat;big dog\nx (1).PNG,cat\nsub dir/y.jpeg,\n'
        "z.jpg, big dog ; cat\nz.png,big dog\ndeep/er/w,cat\n", encoding="utf-8")
    mask = np.zeros(SIZES["z.png"], np.uint8)
    mask[2:9, 3:12] = 1
    mask[0] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "z.png.png")
    return tmp_path


def _run(src: Path, *extra: str, out: str = "out") -> Path:
    prepare_tags.main(["--images", str(src / "imgs"), "--csv", str(src / "tags.csv"),
                       "--out", str(src / out), *extra])
    return src / out


def _cfg(root, **kw):
    return SimpleNamespace(name="tags", root=str(root), list_dir=None, num_classes=21,
                           train_split="train_aug", val_split="val", crop_size=32, **kw)


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_csv_import_layout_labels_and_rerun(src, capsys):
    out = _run(src, "--masks", str(src / "masks"), "--val-fraction", "0.34", "--seed", "3")
    lists = out / "ImageSets" / "Segmentation"
    assert (lists / "class_names.txt").read_text() == "big dog\ncat\n"   # sorted tag names
    train, val = read_name_list(str(lists / "train.txt")), read_name_list(str(lists / "val.txt"))
    assert sorted(train + val) == sorted(NAMES) and not set(train) & set(val)
    assert "z.png" in val and len(val) == 2                 # the masked image, topped up to 2
    names, labels = read_cls_labels(str(lists / "cls_labels.npz"))
    want = {"a b.jpg": [1, 1], "sub dir/ünï/x (1).PNG": [0, 1], "sub dir/y.jpeg": [0, 0],
            "z.jpg": [1, 1], "z.png": [1, 0], "deep/er/w.jpg": [0, 1]}
    assert {n: row.tolist() for n, row in zip(names, labels)} == want
    assert (out / "masks" / "z.png.png").read_bytes() == (src / "masks" / "z.png.png").read_bytes()
    # z.png is tagged "big dog" (class 1) and its mask shows class 1 only: no note
    assert "other classes" not in capsys.readouterr().out
    meta = json.loads((out / "tags.json").read_text())
    assert meta["counts"] == {"train": 4, "val": 2, "masks": 1, "untagged": 1}
    before = _files(out)
    _run(src, "--masks", str(src / "masks"), "--val-fraction", "0.34", "--seed", "3")
    assert _files(out) == before                             # a rerun writes the same bytes
    assert not [p for p in out.rglob(".*") if p.is_file()]   # no temp files left
    _run(src, "--val-fraction", "0.34", "--seed", "3")       # without masks: the old one goes
    assert not list((out / "masks").rglob("*.png"))
    Image.fromarray(np.full(SIZES["z.png"], 2, np.uint8)).save(src / "masks" / "z.png.png")
    _run(src, "--masks", str(src / "masks"))
    assert "1 mask(s) show other classes than their image's tags (first: z.png)" in \
        capsys.readouterr().out


def test_output_inside_the_images_folder(src):
    """--out inside --images (or equal to it): its masks are not taken for images on a rerun."""
    import shutil
    for case, sub in ((1, "out"), (2, "")):
        images = src / f"imgs{case}"
        shutil.copytree(src / "imgs", images)
        for _ in range(2):
            res = import_tags(str(images), Source(csv=str(src / "tags.csv")), str(images / sub),
                              Split(0.34), str(src / "masks"))
            assert res.unlisted == 0 and sorted(res.names) == sorted(NAMES)


def test_val_draw_is_seeded_and_val_list_wins(src):
    a = read_name_list(str(_run(src, "--seed", "1", "--val-fraction", "0.5", out="a")
                           / "ImageSets/Segmentation/val.txt"))
    b = read_name_list(str(_run(src, "--seed", "1", "--val-fraction", "0.5", out="b")
                           / "ImageSets/Segmentation/val.txt"))
    draws = {tuple(read_name_list(str(_run(src, "--seed", str(s), "--val-fraction", "0.5",
                                           out=f"s{s}") / "ImageSets/Segmentation/val.txt")))
             for s in range(6)}
    assert a == b and len(a) == 3 and len(draws) > 1
    (src / "val.txt").write_text("z.jpg\nsub dir/y.jpeg\n")
    out = _run(src, "--val-list", str(src / "val.txt"), out="c")
    assert read_name_list(str(out / "ImageSets/Segmentation/val.txt")) == ["sub dir/y.jpeg", "z.jpg"]


def test_json_indices_and_folders(tmp_path):
    for i, n in enumerate(["cat/1.jpg", "cat/sub/2.png", "big dog/3.jpg"]):
        _image(tmp_path / "imgs" / n, (20, 20), i)
    (tmp_path / "classes.txt").write_text("cat\nbig dog\n")
    (tmp_path / "t.json").write_text(json.dumps({"cat/1.jpg": ["cat"], "2.png": [1, 2],
                                                 "big dog/3.jpg": "big dog"}))
    res = import_tags(str(tmp_path / "imgs"), Source(json=str(tmp_path / "t.json"),
                      classes=str(tmp_path / "classes.txt")), str(tmp_path / "o1"), Split(0.3))
    assert dict(zip(res.names, res.labels.tolist())) == {
        "cat/1.jpg": [1, 0], "cat/sub/2.png": [1, 1], "big dog/3.jpg": [0, 1]}
    (tmp_path / "t.csv").write_text("1.jpg,0\n2.png,0 1\n3.jpg,1\n")
    res = import_tags(str(tmp_path / "imgs"), Source(csv=str(tmp_path / "t.csv"), index_base=0,
                      classes=str(tmp_path / "classes.txt")), str(tmp_path / "o2"), Split(0.3))
    assert dict(zip(res.names, res.labels.tolist()))["cat/sub/2.png"] == [1, 1]
    res = import_tags(str(tmp_path / "imgs"), Source(folders=True), str(tmp_path / "o3"),
                      Split(0.3))
    assert res.classes == ["big dog", "cat"]
    assert dict(zip(res.names, res.labels.tolist()))["cat/sub/2.png"] == [0, 1]


def test_split_cell():
    assert split_cell("cat; big dog ;") == ["cat", "big dog"]
    assert split_cell(" cat  dog ") == ["cat", "dog"]
    assert split_cell("big dog", semicolons=True) == ["big dog"]


def _error(capsys, src, *args) -> str:
    with pytest.raises(SystemExit) as exc:
        prepare_tags.main(["--images", str(src / "imgs"), "--out", str(src / "bad"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert not (src / "bad" / "tags.json").exists()          # nothing (complete) written
    return err


def test_bad_inputs_are_one_line(src, capsys):
    csv = str(src / "tags.csv")
    (src / "t1.csv").write_text("image,tags\nz.jpg,cat\nx (1).PNG,cat;horse\n")
    (src / "classes.txt").write_text("cat\nbig dog\n")
    e = _error(capsys, src, "--csv", str(src / "t1.csv"), "--classes", str(src / "classes.txt"))
    assert "not in the class list" in e and "classes.txt" in e and "row 3" in e and "'horse'" in e
    (src / "t2.csv").write_text("image,tags\nz.jpg,cat\nmissing.jpg,cat\n")
    assert "missing.jpg" in (e := _error(capsys, src, "--csv", str(src / "t2.csv"))) and "row 3" in e
    (src / "t3.csv").write_text("image,tags\nz.jpg,cat\nz.jpg,cat\n")
    assert "duplicate row" in (e := _error(capsys, src, "--csv", str(src / "t3.csv"))) and "row 2" in e
    (src / "t.json").write_text('{"z.jpg": ["cat"], "z.jpg": ["cat"]}')
    assert "twice" in _error(capsys, src, "--json", str(src / "t.json"))
    (src / "t4.csv").write_text("image,tags\nz,cat\n")         # z.jpg and z.png
    assert "matches 2 images" in _error(capsys, src, "--csv", str(src / "t4.csv"))
    (src / "imgs" / "z.jpg").write_bytes(b"not an image")
    e = _error(capsys, src, "--csv", csv)
    assert "z.jpg" in e and "cannot read image" in e and "row 5" in e


@pytest.mark.parametrize("kind", ["size", "values", "rgb", "orphan"])
def test_bad_masks_are_one_line(src, capsys, kind):
    path = src / "masks" / "z.png.png"
    h, w = SIZES["z.png"]
    if kind == "size":
        Image.fromarray(np.zeros((h + 1, w), np.uint8)).save(path)
    elif kind == "values":
        Image.fromarray(np.full((h, w), 7, np.uint8)).save(path)
    elif kind == "rgb":
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)
    else:
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(src / "masks" / "nobody.png")
    e = _error(capsys, src, "--csv", str(src / "tags.csv"), "--masks", str(src / "masks"))
    want = {"size": "image's size", "values": "[7]", "rgb": "mode RGB", "orphan": "nobody"}[kind]
    assert want in e and ("nobody" in e if kind == "orphan" else "z.png.png" in e)


def test_dataset_resolution_names_and_val_labels(src):
    (src / "val.txt").write_text("z.png\nz.jpg\nsub dir/y.jpeg\n")
    out = _run(src, "--masks", str(src / "masks"), "--val-list", str(src / "val.txt"))
    cfg = _cfg(out)
    resolve_classes(cfg)                       # the VOC recipe's 21 stands for "not set"
    assert (cfg.num_classes, cfg.train_split) == (3, "train")
    check_layout(cfg, ["val"])
    assert class_names(cfg) == ["background", "big dog", "cat"]
    val = build_dataset(cfg, "val", "val")
    items = {n: val[i] for i, n in enumerate(val.names)}
    label = items["z.png"][2]
    assert label.shape == SIZES["z.png"] and set(label.unique().tolist()) == {0, 1, 255}
    assert (items["z.jpg"][2] == 255).all() and items["z.jpg"][1].shape[1:] == SIZES["z.jpg"]
    assert items["sub dir/y.jpeg"][3].tolist() == [0, 0]
    typed = _cfg(out)
    typed.num_classes = 5
    with pytest.raises(ValueError, match="data.num_classes=5 but .*class_names.txt lists 2"):
        resolve_classes(typed)
    with pytest.raises(CheckpointError, match="lists 2 classes but the checkpoint has K = 4"):
        class_names(SimpleNamespace(**{**vars(cfg), "num_classes": 5}))
    with pytest.raises(LayoutError, match="class_names.txt: lists 2 classes"):
        check_layout(SimpleNamespace(**{**vars(cfg), "num_classes": 5}), ["val"])
    gone = SimpleNamespace(**{**vars(cfg), "root": str(out) + "_moved"})   # predict elsewhere
    assert class_names(gone) == ["background", "class_1", "class_2"]
    voc = SimpleNamespace(name="voc", root="x", list_dir=None, num_classes=21,
                          train_split="train_aug")
    resolve_classes(voc)
    assert (voc.num_classes, voc.train_split) == (21, "train_aug") and class_names(voc)[15] == "person"


def test_layout_names_a_missing_image(src):
    out = _run(src)
    cfg = _cfg(out)
    resolve_classes(cfg)
    os.remove(src / "imgs" / "sub dir" / "y.jpeg")
    with pytest.raises(LayoutError, match="y.jpeg: image listed in .* not found"):
        check_layout(cfg, ["train", "val"])


def test_classifier_scores_match_loop():
    rng = np.random.default_rng(0)
    pred, target = rng.random((50, 4)) > 0.5, rng.random((50, 4)) > 0.6
    target[:, 3] = pred[:, 3] = False                         # a class never tagged nor predicted
    counts = torch.tensor([[(pred[:, c] & target[:, c]).sum() for c in range(4)],
                           [(pred[:, c] & ~target[:, c]).sum() for c in range(4)],
                           [(~pred[:, c] & target[:, c]).sum() for c in range(4)]])
    got = classifier_scores(counts)
    for c in range(3):
        tp = sum(p and t for p, t in zip(pred[:, c], target[:, c]))
        assert got["precision"][c] == pytest.approx(tp / pred[:, c].sum())
        assert got["recall"][c] == pytest.approx(tp / target[:, c].sum())
        assert got["support"][c] == target[:, c].sum()
    assert all(np.isnan(got[k][3]) for k in ("precision", "recall", "f1"))


def same(a, b) -> bool:
    """Equality of score dicts that hold NaN (NaN != NaN in ==)."""
    return json.dumps(a) == json.dumps(b)


def test_validate_without_masks_scores_the_classifier(caplog, monkeypatch):
    """No mask: NaN mIoU, no CAM pass, per-class counts; one note per run; with one masked
    image the mIoU is that image's alone (same as validating it by itself)."""
    from tests.test_validate import FakeModel, K
    model = FakeModel().eval()
    torch.manual_seed(2)
    ims = [torch.randn(1, 3, 40, 48) for _ in range(3)]
    tags = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]], [[1.0, 1.0, 0.0]]])
    blank = [("a", ims[i], torch.full((1, 40, 48), 255), tags[i]) for i in range(3)]
    cfg = SimpleNamespace(data=SimpleNamespace(name="voc", root="x", num_classes=K + 1),
                          val=SimpleNamespace(size=64), tag="t_nomask",
                          cam=SimpleNamespace(bkg=0.5, scales=[1.0, 0.5]))
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    import logging
    caplog.set_level(logging.INFO, logger="more")
    # the logger as a fresh process has it (a training run earlier in this process gave it
    # handlers of its own)
    monkeypatch.setattr(logging.getLogger("more"), "handlers", [])
    monkeypatch.setattr(logging.getLogger("more"), "propagate", True)
    res = [validate(model, blank, cfg, dist) for _ in range(2)]
    assert res[0]["masked_images"] == 0 and np.isnan(res[0]["seg"]["miou"])
    assert sum("mIoU needs masks" in r.message for r in caplog.records) == 1
    assert sum("val classifier" in r.message for r in caplog.records) == 2
    with torch.no_grad():
        pred = torch.cat([model(torch.nn.functional.interpolate(i, size=(64, 64), mode="bilinear",
                                                                align_corners=False)).cls_logits
                          for i in ims]) > 0
    target = tags[:, 0].bool()
    assert res[0]["cls"]["support"] == target.sum(0).tolist()
    tp = (pred & target).sum(0)
    assert res[0]["cls"]["precision"] == pytest.approx(
        [float(tp[c] / pred[:, c].sum()) if pred[:, c].any() else float("nan") for c in range(K)],
        nan_ok=True)
    masked = (*blank[1][:2], torch.randint(0, K + 1, (1, 40, 48)), blank[1][3])
    mixed = validate(model, [blank[0], masked, blank[2]], cfg, dist)
    alone = validate(model, [masked], cfg, dist)
    assert mixed["masked_images"] == 1 and not np.isnan(mixed["seg"]["miou"])
    assert all(same(mixed[k], alone[k]) for k in ("cam", "lam", "fused", "seg"))
    # the masked image's classifier output is the same forward as without its mask
    assert mixed["f1"] == res[0]["f1"] and same(mixed["cls"], res[0]["cls"])


def test_csv_cell_that_is_a_known_class_stays_whole(tmp_path):
    from datasets.tag_import import read_csv
    (tmp_path / "t.csv").write_text("a.jpg,traffic light\nb.jpg,cat dog\n")
    rows = read_csv(str(tmp_path / "t.csv"), known=["traffic light", "cat", "dog"])
    assert [r[2] for r in rows] == [["traffic light"], ["cat", "dog"]]
    assert read_csv(str(tmp_path / "t.csv"))[0][2] == ["traffic", "light"]


def test_synthetic_tags_format_is_the_voc_set_renamed(tmp_path):
    """Same seed: the tag-format images and labels are the VOC-format ones under odd names; the
    val masks come through the import; a second call is a no-op."""
    from datasets.synthetic import SyntheticParams, make_synthetic, tag_file_name
    voc, tags = tmp_path / "voc", tmp_path / "tags"
    for root, fmt in ((voc, "voc"), (tags, "tags")):
        assert make_synthetic(str(root), SyntheticParams(num_fg_classes=3, num_train=8, num_val=4,
                                                         size=48, fmt=fmt), progress=False)
    assert not make_synthetic(str(tags), SyntheticParams(num_fg_classes=3, num_train=8, num_val=4,
                                                         size=48, fmt="tags"), progress=False)
    vn, vl = read_cls_labels(str(voc / "ImageSets/Segmentation/cls_labels.npz"))
    tn, tl = read_cls_labels(str(tags / "ImageSets/Segmentation/cls_labels.npz"))
    by_tag = dict(zip(tn, tl.tolist()))
    for n, row in zip(vn, vl.tolist()):
        split, i = n.split("_")
        rel = tag_file_name("train" if split == "train" else "val", int(i))
        assert by_tag[rel] == row, n
        if split == "val":
            assert (tags / "masks" / (rel + ".png")).read_bytes() == \
                (voc / "SegmentationClassAug" / (n + ".png")).read_bytes()
        if rel.endswith(".jpg"):
            assert (tags / "photos" / rel).read_bytes() == (voc / "JPEGImages" / (n + ".jpg")).read_bytes()
    cfg = _cfg(tags)
    resolve_classes(cfg)
    check_layout(cfg, ["train", "val"])
    assert class_names(cfg)[1:] == (tags / "classes.txt").read_text().split()


def test_val_scalars_are_named_by_class_on_tag_datasets_only(src):
    from wetr.validate import val_scalars
    cfg = _cfg(_run(src))
    resolve_classes(cfg)
    result = {"cls": {"precision": [0.5, float("nan")], "recall": [1.0, 0.25]}}
    assert val_scalars(result, SimpleNamespace(data=cfg)) == {
        "val/cls_precision/big_dog": 0.5, "val/cls_precision/cat": result["cls"]["precision"][1],
        "val/cls_recall/big_dog": 1.0, "val/cls_recall/cat": 0.25}
    voc = SimpleNamespace(name="voc", root="x", list_dir=None, num_classes=3)
    assert val_scalars(result, SimpleNamespace(data=voc)) == {}
