"""utils.tensorboard_log: events read back with TensorBoard's own reader, a resume without
duplicated steps, the overlay panels."""
import time

import numpy as np
import pytest

from utils.tensorboard_log import TBWriter, seg_blend, val_overlay


def _read(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _panel(seed=0, h=20, w=30):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cam = rng.random((2, h, w))
    seg = rng.integers(0, 3, (h, w))
    return val_overlay(image, cam, cam[0], seg, gt=seg)


def _run(run_dir, steps, start_step=0):
    tb = TBWriter(run_dir, enabled=True, start_step=start_step)
    for step in steps:
        tb.scalars(step, {"loss/total": 1.0 / step, "lr": 1e-3 * step, "speed/images_per_s": 8.0,
                          "note": "text is skipped", "loss/bad": float("nan")})
        if step % 4 == 0:
            tb.scalars(step, {"val/cam_miou": 0.5, "val/lam_miou": 0.6, "val/fused_miou": 0.55,
                              "val/seg_miou": 0.4, "val/f1": 0.8})
            tb.images(step, "val", [_panel(0), _panel(1, 16, 24)])
    tb.close()


def test_scalars_and_images_are_read_back(tmp_path):
    _run(tmp_path, range(1, 9))
    acc = _read(tmp_path / "tb")
    tags = acc.Tags()
    assert {"loss/total", "lr", "speed/images_per_s", "val/cam_miou", "val/lam_miou",
            "val/fused_miou", "val/seg_miou", "val/f1"} <= set(tags["scalars"])
    assert "note" not in tags["scalars"] and "loss/bad" not in tags["scalars"]
    assert [e.step for e in acc.Scalars("lr")] == list(range(1, 9))
    assert acc.Scalars("lr")[2].value == pytest.approx(3e-3)
    assert {"val/0", "val/1"} <= set(tags["images"])
    img = acc.Images("val/1")
    assert [e.step for e in img] == [4, 8]
    assert (img[0].width, img[0].height) == (24 * 5, 16)


def test_resume_appends_without_duplicated_steps(tmp_path):
    _run(tmp_path, range(1, 11))          # the first run logged up to step 10, then died
    _run(tmp_path, range(7, 13), start_step=7)   # resumed from the checkpoint of step 6
    acc = _read(tmp_path / "tb")
    for tag in ("lr", "loss/total", "val/seg_miou", "val/0"):
        events = acc.Images(tag) if tag.startswith("val/0") else acc.Scalars(tag)
        steps = [e.step for e in events]
        assert steps == sorted(set(steps)), (tag, steps)
    assert [e.step for e in acc.Scalars("lr")] == list(range(1, 13))
    assert [e.step for e in acc.Scalars("val/seg_miou")] == [4, 8, 12]


def test_disabled_writer_writes_nothing(tmp_path):
    tb = TBWriter(tmp_path, enabled=False, start_step=5)
    tb.scalars(1, {"lr": 1.0})
    tb.images(1, "val", [_panel()])
    tb.close()
    assert not tb.enabled and not (tmp_path / "tb").exists()


def test_overlay_panels():
    image = np.full((4, 6, 3), 100, np.uint8)
    seg = np.zeros((4, 6), np.int64)
    seg[1, 2], seg[2, 3] = 1, 255
    blend = seg_blend(image, seg)
    assert (blend[0, 0] == 100).all() and (blend[2, 3] == 100).all()   # background, ignore
    assert (blend[1, 2] == np.round(0.5 * np.array([128, 0, 0]) + 50)).all()   # class 1 colour
    panel = val_overlay(image, np.zeros((2, 4, 6)), np.ones((4, 6)), seg)
    assert panel.shape == (4, 24, 3) and panel.dtype == np.uint8
    assert (panel[:, :6] == image).all()
    with pytest.raises(ValueError, match="cam"):
        val_overlay(image, np.zeros((5, 6)), np.zeros((4, 6)), seg)
    with pytest.raises(ValueError, match="uint8"):
        TBWriter("unused", enabled=False).images(0, "x", [np.zeros((2, 2, 3))])


class _Stop(Exception):
    pass


def test_training_run_writes_events_and_a_resume_keeps_each_step_once(tmp_path, monkeypatch):
    """A short CPU run of the engine stops after step 5 (last checkpoint: step 4), then resumes to
    step 6: every loss term, lr, throughput and the validation scores are scalars, the val
    overlays are images, and each step appears once."""
    from datasets.synthetic import SyntheticParams, make_synthetic
    from scripts.train_voc import VOC
    from wetr.config import make_config
    from wetr import engine

    data = tmp_path / "data"
    make_synthetic(str(data), SyntheticParams(num_fg_classes=2, num_train=8, num_val=2, size=48),
                   progress=False)
    argv = [f"data.root={data}", "data.num_classes=3", "data.crop_size=48", "data.num_workers=0",
            "model.pretrained=false", "model.embed_dim=32", "model.depth=3", "model.num_heads=2",
            "batch_size=2", "val.size=48", "cam.scales=[1.0]", "par.num_iter=1", "device=cpu",
            "loss.after.seg=0", "loss.after.reg=0", "log_every=1", "save_every=2", "eval_every=2",
            "log.images=2", "max_iters=6", f"work_dir={tmp_path}", "tag=run"]

    next_batch = engine._next_batch

    def stop_at_5(ctx, state, batches):
        if state.step == 5:
            raise _Stop
        return next_batch(ctx, state, batches)

    with monkeypatch.context() as m:
        m.setattr(engine, "_next_batch", stop_at_5)
        with pytest.raises(_Stop):
            engine.main(make_config(VOC, argv))
    # TensorBoard reads event files in name order: <seconds>.<host>.<pid>.<writer count>. Both
    # runs share this process, so in the same second the count decides, and it sorts as text
    # ("10" < "9" once earlier tests made writers): start the resumed run a second later, as a
    # real resume (a new process) always is.
    time.sleep(1.1)
    engine.main(make_config(VOC, argv + ["resume=auto"]))
    acc = _read(tmp_path / "run" / "tb")
    scalars = set(acc.Tags()["scalars"])
    terms = {f"loss/{k}" for k in ("total", "cls", "cls_aux", "tokens", "cle", "une", "ptc", "seg",
                                   "reg")}
    assert terms | {"lr", "speed/images_per_s", "val/cam_miou", "val/lam_miou", "val/fused_miou",
                    "val/seg_miou", "val/f1"} <= scalars
    for tag in sorted(terms) + ["lr"]:
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4, 5, 6], tag
    assert [e.step for e in acc.Scalars("val/seg_miou")] == [2, 4, 6]
    assert {"val/0", "val/1"} <= set(acc.Tags()["images"])
    image = acc.Images("val/0")
    assert [e.step for e in image] == [2, 4, 6]
    assert (image[0].width, image[0].height) == (5 * 48, 48)
