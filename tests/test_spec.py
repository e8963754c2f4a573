"""One model spec (wetr.model.MoReSpec): built from the config, saved in every checkpoint as a
plain dict, read back by the tools; checkpoints saved before it (meta only) still load."""
from dataclasses import asdict

import pytest
import torch

from utils.checkpoint import CheckpointError, load_file
from utils.config import to_container
from wetr.config import make_config
from wetr.factory import check_resume_checkpoint, model_from_checkpoint, model_from_config
from wetr.model import MoReSpec
from wetr.optim import build_optimizer
from wetr.run import save_checkpoint
from wetr.step import Training

K = 4
TINY = ["model.pretrained=false", "model.embed_dim=32", "model.depth=3", "model.num_heads=4",
        f"data.num_classes={K + 1}"]
# a value other than the default for every spec key the config sets
NON_DEFAULT = ["model.patch_size=8", "model.decoder_dim=24", "model.decoder_dilation=2",
               "model.aux_layer=-2", "model.gcr_topk_ratio=0.75", "model.gcr_gate_score=dot"]


def _trained(argv, tmp_path, optimizer=False):
    """A perturbed model of the config and its checkpoint, saved as the engine saves one."""
    cfg = make_config(None, TINY + argv)
    torch.manual_seed(0)
    model = model_from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    opt = build_optimizer(model.param_groups(), cfg) if optimizer else None
    ranks = {"rng": [], "sums": [], "count": 0} if optimizer else None
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, Training(model, model, opt, None, par=None), 3, cfg, {"best_miou": 0.5},
                    ranks)
    return cfg, model, path


def _same_outputs(a, b):
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, u, v in zip(a(x)._fields, a(x), b(x)):
            assert torch.equal(u, v), name


def test_config_keys_reach_the_spec():
    cfg = make_config(None, TINY + NON_DEFAULT)
    with torch.device("meta"):
        model = model_from_config(cfg)
    assert model.spec == MoReSpec(num_classes=K + 1, embed_dim=32, depth=3, num_heads=4,
                                  patch_size=8, decoder_dim=24, decoder_dilation=2, aux_layer=-2,
                                  gcr_topk_ratio=0.75, gcr_gate_score="dot")
    assert model.graph_layer.gate_score == "dot" and model.graph_layer.topk_ratio == 0.75
    assert model.encoder.aux_layer == -2 and model.decoder.conv6.dilation == (2, 2)


def test_checkpoint_saves_the_spec_and_the_tools_rebuild_it(tmp_path):
    """Every key of the spec, the GCR options included (which leave no trace in the weights),
    comes back from the checkpoint: the rebuilt model computes the same outputs."""
    _, model, path = _trained(NON_DEFAULT, tmp_path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    assert obj["spec"] == asdict(model.spec) and obj["meta"] == {"best_miou": 0.5}
    loaded, info = model_from_checkpoint(path, torch.device("cpu"))
    assert loaded.spec == model.spec and info["gcr_gate_score"] == "dot" and info["step"] == 3
    _same_outputs(loaded, model)
    # the default gate score would give other class tokens: the saved one is what made them equal
    other, _ = model_from_checkpoint(path, torch.device("cpu"),
                                     overrides={"gcr_gate_score": "reference"})
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert not torch.allclose(other(x).class_tokens, model(x).class_tokens)


def test_checkpoint_before_the_spec_still_loads(tmp_path):
    """The earlier format: shape keys in "meta", a training config without the GCR keys, no
    "spec". The spec is derived from meta, config and weight shapes."""
    cfg, model, path = _trained(["model.patch_size=8", "model.decoder_dilation=2",
                                 "model.aux_layer=-2"], tmp_path)
    config = to_container(cfg)
    for key in ("gcr_topk_ratio", "gcr_gate_score"):
        del config["model"][key]
    old = {"model": model.state_dict(), "step": 3, "config": config,
           "meta": {"num_classes": K + 1, "embed_dim": 32, "depth": 3, "num_heads": 4,
                    "patch_size": 8, "decoder_dim": 512, "decoder_dilation": 2,
                    "backbone": "vit_base_patch16_224", "best_miou": 0.5}}
    torch.save(old, path)
    loaded, info = model_from_checkpoint(path, torch.device("cpu"), num_classes=K + 1)
    assert loaded.spec == model.spec and info["aux_layer"] == -2
    _same_outputs(loaded, model)


@pytest.mark.parametrize("saved_as", ["spec", "meta"])
def test_resume_refuses_another_spec(tmp_path, saved_as):
    """A resume checkpoint whose spec differs from the config's is one line naming the key; the
    earlier format is compared on the keys its meta holds."""
    cfg, model, path = _trained(["model.decoder_dilation=2"], tmp_path, optimizer=True)
    obj = load_file(path)
    if saved_as == "meta":
        obj["meta"].update(obj.pop("spec"))
    check_resume_checkpoint(obj, cfg, path)
    with pytest.raises(CheckpointError) as info:
        check_resume_checkpoint(obj, make_config(None, TINY), path)
    assert "was trained with decoder_dilation=2 but the config gives decoder_dilation=5" in str(
        info.value)
    if saved_as == "spec":
        with pytest.raises(CheckpointError, match="gcr_gate_score=reference but the config gives "
                                                  "gcr_gate_score=dot"):
            check_resume_checkpoint(obj, make_config(None, TINY + ["model.decoder_dilation=2",
                                                                   "model.gcr_gate_score=dot"]), path)


def test_unknown_spec_key_is_one_line(tmp_path):
    _, model, path = _trained([], tmp_path)
    obj = load_file(path)
    obj["spec"]["mlp_ratio"] = 2.0
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="checkpoint spec has unknown key 'mlp_ratio'"):
        model_from_checkpoint(path, torch.device("cpu"))
