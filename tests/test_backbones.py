"""`model.backbone=<timm name>`: every supported family, with random weights made by timm itself
(no download). timm is the outside reference: with one class token and no extra tokens the
encoder returns timm's own `forward_features` patch tokens."""
import pytest
import timm
import torch
from timm.layers import LayerScale, QuickGELU

import wetr.encoder as encoder_module
from utils.config import ConfigError
from utils.logger import get_logger
from wetr import build_model
from wetr.cam import multi_scale_cam
from wetr.config import make_config
from wetr.backbones import FAMILIES, FAMILY_TAGS, backbone_facts
from wetr.encoder import ClassTokenViT
from wetr.factory import model_from_checkpoint, model_from_config, spec_dict
from wetr.step import Batch, Training, build_par, compute_losses

FAMILY = pytest.mark.parametrize("tag", list(FAMILY_TAGS.values()), ids=list(FAMILY_TAGS))
K = 3
# small width and depth where the check allows: the family's block options are what is tested
SMALL = ["model.pretrained=false", "model.embed_dim=64", "model.depth=3", "model.num_heads=2",
         "model.decoder_dim=32", f"data.num_classes={K + 1}"]


def _perturb_1d(module: torch.nn.Module, seed: int = 0) -> None:
    """Norms, biases and LayerScale (1-D parameters, which timm initialises to constants) made
    random too, so that every part of the network shows in its output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=gen))


@FAMILY
def test_patch_tokens_equal_timm_forward_features(tag, monkeypatch):
    """The family's real configuration (width, depth, heads, patch, block options); the pretrained
    grid is 3x3 patches, the size of the input, so both use the stored position embeddings.
    ViT-L/16 keeps 4 of its 24 identical blocks (the whole network takes 20 s of CPU here)."""
    facts = backbone_facts(tag)
    side = 3 * facts.patch_size
    depth = 4 if facts.depth > 12 else facts.depth
    torch.manual_seed(0)
    vit = timm.create_model(tag, pretrained=False, img_size=side, depth=depth).eval()
    _perturb_1d(vit)
    monkeypatch.setattr(encoder_module, "_pretrained_state_dict", lambda enc, source: vit.state_dict())
    with torch.device("meta"):  # no random init of a second full-size network: the weights are timm's
        enc = ClassTokenViT(1, backbone=tag, img_size=side, depth=depth, num_extra_tokens=0)
    enc.to_empty(device="cpu").load_pretrained(True)
    enc.eval()
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = vit.forward_features(x)[:, vit.num_prefix_tokens:]
        got = enc(x).patch_map.flatten(2).transpose(1, 2)
    assert got.shape == want.shape == (1, 9, facts.embed_dim)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_family_options_reach_the_encoder():
    """What each family brings, on the meta device (shapes only): the full-size default is the
    reference's ViT-B/16 (docs/METHOD.md §10 keys), the others add their own parts."""
    with torch.device("meta"):
        models = {name: build_model(21, backbone=tag) for name, tag in FAMILY_TAGS.items()}
    enc = {name: m.encoder for name, m in models.items()}
    for name in ("ViT-S/16", "ViT-B/16 (default, JAX)", "ViT-B/16 (augreg)", "ViT-L/16", "DeiT-B/16"):
        keys = set(enc[name].state_dict())
        assert not {k for k in keys if "ls1" in k or "norm_pre" in k or "reg_token" in k}, name
        assert enc[name].pos_embed.shape[1] == 24 + 196
    assert enc["ViT-S/16"].embed_dim == 384 and enc["ViT-L/16"].depth == 24
    assert models["ViT-L/16"].decoder.conv6.in_channels == 1024  # heads sized from the width
    assert models["ViT-S/16"].graph_layer.head_proj.in_features == 384
    assert isinstance(enc["DeiT-III-B/16"].blocks[0].ls1, LayerScale)
    assert enc["DeiT-III-B/16"].blocks[0].ls1.init_values == 1e-6
    clip = enc["CLIP-B/16"]
    assert isinstance(clip.norm_pre, torch.nn.LayerNorm) and clip.norm.eps == clip.norm_pre.eps == 1e-5
    assert isinstance(clip.blocks[0].mlp.act, QuickGELU) and clip.patch_embed.proj.bias is None
    for name in ("DINOv2-B/14", "DINOv2-B/14-reg4"):
        assert models[name].patch_size == enc[name].patch_size == 14
        assert enc[name].pos_embed.shape[1] == 24 + 37 * 37  # pretrained on 518 px
        assert isinstance(enc[name].blocks[0].ls1, LayerScale)
    assert enc["DINOv2-B/14"].reg_token is None
    assert enc["DINOv2-B/14-reg4"].reg_token.shape == (1, 4, 768)


@FAMILY
def test_training_step_and_multi_scale_cams(tag):
    """With K class tokens every loss term (segmentation and energy included) is finite and
    reaches the encoder; the CAMs have the patch grid's shape."""
    patch = backbone_facts(tag).patch_size
    side = 4 * patch
    cfg = make_config(None, SMALL + [f"model.backbone={tag}", f"data.crop_size={side}",
                                     "loss.after.seg=-1", "loss.after.reg=-1"])
    torch.manual_seed(0)
    model = model_from_config(cfg)
    training = Training(model, model, None, None, build_par(cfg))
    images = torch.randn(2, 3, side, side)
    cls_label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    total, terms = compute_losses(training, Batch(images, cls_label), 0, cfg)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    total.backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    cam, aux_cam = multi_scale_cam(model, images, cfg.cam.scales)
    assert cam.shape == aux_cam.shape == (2, K, side, side)
    cam, aux_cam = model.cams(images)
    assert cam.shape == aux_cam.shape == (2, K, 4, 4)


def test_register_tokens_stay_apart():
    """Registers attend with the others but are neither class nor patch tokens: the outputs are
    the slices before and after them."""
    torch.manual_seed(0)
    enc = ClassTokenViT(K, backbone="vit_base_patch14_reg4_dinov2", embed_dim=32, depth=3,
                        num_heads=2).eval()
    _perturb_1d(enc)
    outs = []
    enc.blocks[-1].register_forward_hook(lambda m, i, o: outs.append(o))
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 56, 42))
    final = enc.norm(outs[0])
    T = 4 + K
    assert final.shape[1] == T + 4 + 4 * 3
    assert torch.equal(out.class_tokens, final[:, 4:T])
    assert torch.equal(out.patch_map, final[:, T + 4:].transpose(1, 2).reshape(1, 32, 4, 3))
    assert out.attn_map.shape == (1, K, 4, 3)


@pytest.mark.parametrize("tag", [FAMILY_TAGS["DeiT-III-B/16"], FAMILY_TAGS["CLIP-B/16"], FAMILY_TAGS["DINOv2-B/14-reg4"]])
def test_pretrained_file_of_a_family(tag, tmp_path):
    """A local weight file of the family (here timm's random weights at a small width): CLS
    copies, registers as they are, the class position (zeros without one, no_embed_class),
    the first 4 token positions drawn, the patch grid and every block weight as saved."""
    facts = backbone_facts(tag)
    torch.manual_seed(0)
    src = timm.create_model(tag, pretrained=False, embed_dim=32, depth=2, num_heads=2)
    _perturb_1d(src)
    with torch.no_grad():
        src.cls_token.normal_()
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    enc = ClassTokenViT(K, backbone=tag, pretrained=path, embed_dim=32, depth=2, num_heads=2,
                        aux_layer=-2)
    ref, own = src.state_dict(), enc.state_dict()
    T = K + 4
    assert torch.equal(enc.cls_token, ref["cls_token"].expand(1, T, 32))
    cls_pos = torch.zeros(1, 1, 32) if facts.no_embed_class else ref["pos_embed"][:, :1]
    assert torch.equal(enc.pos_embed[:, 4:T], cls_pos.expand(1, K, 32))
    assert torch.equal(enc.pos_embed[:, T:], ref["pos_embed"][:, 0 if facts.no_embed_class else 1:])
    assert enc.pos_embed[:, :4].std() > 0.3  # truncated normal, std 1
    for key, value in ref.items():
        if key not in ("cls_token", "pos_embed") and not key.startswith("head."):
            assert torch.equal(own[key], value), key


@FAMILY
def test_checkpoint_round_trip(tag, tmp_path):
    """A checkpoint names its backbone in its spec; the tools rebuild the same model from it."""
    cfg = make_config(None, SMALL + [f"model.backbone={tag}"])
    torch.manual_seed(0)
    model = model_from_config(cfg).eval()
    _perturb_1d(model)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "spec": spec_dict(model)}, path)
    loaded, info = model_from_checkpoint(path, torch.device("cpu"))
    assert info["backbone"] == tag and loaded.spec == model.spec
    side = 3 * model.patch_size
    x = torch.randn(1, 3, side, 2 * side)
    with torch.no_grad():
        for name, a, b in zip(model(x)._fields, model(x), loaded(x)):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["resnet50", "vit_base_patch16_siglip_224", "vit_base_patch16_224.nope"])
def test_bad_backbone_is_one_line(name):
    with pytest.raises(ValueError) as e:
        build_model(21, backbone=name)
    assert "\n" not in str(e.value) and name in str(e.value)
    if "." not in name:
        assert all(family in str(e.value) for family in FAMILIES)
        with pytest.raises(ConfigError, match="model.backbone"):
            make_config(None, [f"model.backbone={name}"])


def test_grad_checkpointing_gives_the_same_gradients():
    """model.grad_checkpointing recomputes each block in the backward pass (the blocks run twice
    when training) and gives the same gradients; eval passes are not checkpointed."""
    grads, calls = [], []
    for on in (False, True):
        cfg = make_config(None, SMALL + [f"model.grad_checkpointing={str(on).lower()}"])
        torch.manual_seed(0)
        model = model_from_config(cfg).train()
        _perturb_1d(model)
        hook = model.encoder.blocks[0].register_forward_pre_hook(lambda m, i: calls.append(on))
        out = model(torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1)))
        (out.cls_logits.sum() + out.seg_logits.square().mean() + out.class_tokens.square().sum()
         + out.aux_logits.sum()).backward()
        hook.remove()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert calls.count(False) == 1 and calls.count(True) == 2
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_crop_is_rounded_to_the_patch(caplog, monkeypatch):
    monkeypatch.setattr(get_logger(), "propagate", True)  # an earlier run's setup turns it off
    cfg = make_config(None, ["model.backbone=vit_base_patch14_dinov2", "data.crop_size=450",
                             "val.size=448"])
    assert cfg.data.crop_size == 448 and cfg.val.size == 448
    assert [r.getMessage() for r in caplog.records] == [
        "data.crop_size=450 is not a multiple of the patch size 14: using 448"]
    assert make_config(None, ["model.patch_size=8", "data.crop_size=100"]).data.crop_size == 96
