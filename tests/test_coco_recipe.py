"""COCO's thresholds (METHOD.md §4, 7) reach their consumers in the training step: refined labels
(cam.high / cam.low), L_aux for UNE and PTC (cam.aux_thresholds); L_cle / L_fin stay VOC's."""
import torch

from scripts.train_coco import COCO
from scripts.train_voc import VOC
from wetr.config import make_config
from wetr import step as wstep
from wetr.factory import model_from_config
from wetr.cam import cam_to_label

# the real functions, so that a second spied step does not wrap the first one's spies
REAL = {"refine": wstep.refine_label, "tokens": wstep.token_labels,
        "ptc": wstep.L.ptc_loss, "une": wstep.L.une_loss}
TINY = ["model.pretrained=false", "model.embed_dim=32", "model.depth=3", "model.num_heads=2",
        "data.num_classes=4"]


def test_token_labels_use_the_config_thresholds():
    """An aux-CAM score of 0.68 lies between COCO's 0.65 and VOC's 0.7: L_aux labels it with its
    class under COCO and 255 (uncertain) under VOC; L_cle and L_fin are the same in both."""
    aux = torch.tensor([0.68, 0.55, 0.3, 0.1]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    aux[:, 1] *= 0.5
    cls = torch.tensor([[1.0, 1.0]])
    coco, voc = make_config(COCO).cam, make_config(VOC).cam
    got = {name: wstep.token_labels(aux, aux, cls, (2, 2), make_config(d))
           for name, d in (("coco", COCO), ("voc", VOC))}
    assert got["coco"]["aux"].flatten().tolist() == [1, 255, 255, 0]
    assert got["voc"]["aux"].flatten().tolist() == [255, 255, 255, 0]
    for name, cam in (("coco", coco), ("voc", voc)):
        want = cam_to_label(aux, cls, high=cam.aux_thresholds[0], low=cam.aux_thresholds[1])
        assert torch.equal(got[name]["aux"], want)
    for key in ("cle", "fin"):
        assert torch.equal(got["coco"][key], got["voc"][key])


def _spied_step(monkeypatch, argv, step):
    """compute_losses on a tiny model; returns what refine_label, ptc_loss and une_loss got and
    what token_labels returned."""
    cfg = make_config(COCO, TINY + argv)
    seen = {}

    def spy(name):
        def wrapper(*args, **kwargs):
            out = REAL[name](*args, **kwargs)
            seen[name] = (args, kwargs, out)
            return out
        return wrapper

    monkeypatch.setattr(wstep, "refine_label", spy("refine"))
    monkeypatch.setattr(wstep, "token_labels", spy("tokens"))
    monkeypatch.setattr(wstep.L, "ptc_loss", spy("ptc"))
    monkeypatch.setattr(wstep.L, "une_loss", spy("une"))
    torch.manual_seed(0)
    model = model_from_config(cfg).train()
    par = wstep.build_par(cfg)
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    cls_label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    torch.manual_seed(1)
    wstep.compute_losses(wstep.Training(model, model, None, None, par), wstep.Batch(images, cls_label),
                         step, cfg)
    return cfg, seen


def test_compute_losses_passes_the_coco_thresholds(monkeypatch):
    """Every term on, before cam2mask: refine_label gets 0.65 / 0.25, PTC and UNE get L_aux."""
    cfg, seen = _spied_step(monkeypatch, [], step=20000)
    assert cfg.cam.cam2mask > 20000 > max(cfg.loss.after.values())
    _, kwargs, refined = seen["refine"]
    assert (kwargs["high"], kwargs["low"]) == (0.65, 0.25)
    labels = seen["tokens"][2]
    assert seen["ptc"][0][1] is labels["aux"]
    assert seen["une"][0][2] is labels["aux"]
    # the refined labels move with cam.high (same weights, images and CAMs)
    _, other = _spied_step(monkeypatch, ["cam.high=0.95"], step=20000)
    assert other["refine"][1]["high"] == 0.95
    assert not torch.equal(other["refine"][2], refined)
    assert torch.equal(other["tokens"][2]["aux"], labels["aux"])


def test_ptc_and_une_labels_move_with_aux_thresholds(monkeypatch):
    _, base = _spied_step(monkeypatch, [], step=20000)
    _, moved = _spied_step(monkeypatch, ["cam.aux_thresholds=[0.3,0.1]"], step=20000)
    assert not torch.equal(base["ptc"][0][1], moved["ptc"][0][1])
    assert not torch.equal(base["une"][0][2], moved["une"][0][2])
    assert torch.equal(base["tokens"][2]["cle"], moved["tokens"][2]["cle"])
    assert torch.equal(base["refine"][2], moved["refine"][2])
