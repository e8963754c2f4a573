"""MoRe network (METHOD.md §1-3, 10): reference state_dict layout, loading, and a plain re-implementation."""
import math

import pytest
import torch
import torch.nn.functional as F

from wetr import MoRe, MoReOutput, build_model, load_weights


def spec10_shapes(K: int, D: int = 768, depth: int = 12) -> dict:
    """The reference checkpoint layout of METHOD.md §10, written out."""
    T = 4 + K
    shapes = {
        "encoder.cls_token": (1, T, D), "encoder.pos_embed": (1, T + 196, D),
        "encoder.patch_embed.proj.weight": (D, 3, 16, 16), "encoder.patch_embed.proj.bias": (D,),
        "encoder.norm.weight": (D,), "encoder.norm.bias": (D,),
        "encoder.head.weight": (T, D), "encoder.head.bias": (T,),
        "classifier.weight": (K, D, 1, 1), "aux_classifier.weight": (K, D, 1, 1),
        "decoder.conv6.weight": (512, D, 3, 3), "decoder.conv7.weight": (512, 512, 3, 3),
        "decoder.conv8.weight": (K + 1, 512, 1, 1),
    }
    for i in range(depth):
        b = f"encoder.blocks.{i}."
        shapes.update({
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
            b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,),
        })
    for name in ("_fc1.0", "head_proj", "tail_proj", "linear1", "linear2"):
        shapes.update({f"graph_layer.{name}.weight": (D, D), f"graph_layer.{name}.bias": (D,)})
    shapes.update({"graph_layer.norm.weight": (D,), "graph_layer.norm.bias": (D,)})
    return shapes


@pytest.mark.parametrize("K", [20, 80])
def test_full_size_state_dict_matches_spec10(K):
    with torch.device("meta"):  # shapes only; no 86M-parameter init on the CPU
        model = build_model(K + 1)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == spec10_shapes(K)
    assert model.num_classes == K + 1 and model.patch_size == 16 and model.embed_dim == 768
    assert model.encoder.num_tokens == K + 4  # VOC T=24, COCO T=84
    assert model.encoder.norm.eps == 1e-6


# tiny config shared by the remaining tests
K, D, DEPTH, HEADS = 4, 32, 4, 4


def tiny(num_classes: int = K + 1, width: int = D) -> MoRe:
    torch.manual_seed(0)
    model = build_model(num_classes, embed_dim=width, depth=DEPTH, num_heads=HEADS).eval()
    with torch.no_grad():  # make every part matter, so a wrong wire shows up in the outputs
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_load_weights_round_trip(tmp_path):
    src, dst = tiny(), build_model(K + 1, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    wrapped = {"module." + k: v for k, v in src.state_dict().items()}
    load_weights(dst, wrapped)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict(), "step": 3}, path)
    other = build_model(K + 1, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    load_weights(other, path)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        for a, b in zip(src.eval()(x), other.eval()(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("num_classes,width,message", [
    (K + 3, D, f"checkpoint has K={K} classes but the model has K={K + 2}"),
    (K + 1, 2 * D, f"checkpoint has width D={D} but the model has D={2 * D}"),
])
def test_load_weights_mismatch_is_one_line(num_classes, width, message):
    model = build_model(num_classes, embed_dim=width, depth=DEPTH, num_heads=HEADS)
    with pytest.raises(ValueError) as e:
        load_weights(model, tiny().state_dict())
    assert str(e.value) == message


def test_patch_size_option():
    """model.patch_size: an 8-pixel patch grid doubles the map resolution; a checkpoint of one
    patch size does not load into the other (one line)."""
    model = build_model(K + 1, embed_dim=D, depth=DEPTH, num_heads=HEADS, patch_size=8).eval()
    assert model.encoder.patch_embed.proj.weight.shape[-2:] == (8, 8)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 40, 64))
        cam, aux_cam = model.cams(torch.randn(2, 3, 40, 64))
    assert out.patch_map.shape[-2:] == out.seg_logits.shape[-2:] == cam.shape[-2:] == (5, 8)
    assert out.attn_map.shape[-2:] == aux_cam.shape[-2:] == (5, 8)
    with pytest.raises(ValueError) as e:
        load_weights(model, tiny().state_dict())
    assert str(e.value) == "checkpoint has patch size 16 but the model has patch size 8"


def test_decoder_width_option():
    model = build_model(K + 1, embed_dim=D, depth=DEPTH, num_heads=HEADS, decoder_dim=24)
    assert model.decoder.conv6.weight.shape == (24, D, 3, 3)
    assert model.decoder.conv7.weight.shape == (24, 24, 3, 3)
    assert model.decoder.conv8.weight.shape == (K + 1, 24, 1, 1)
    assert tiny().decoder.conv7.weight.shape == (512, 512, 3, 3)  # the reference default


@pytest.mark.parametrize("dilation", [1, 2, 5])
def test_decoder_dilation_sets_which_tokens_a_prediction_sees(dilation):
    """LargeFOV's two dilated 3x3 convs see offsets {0, +-d, +-2d}: a token one step away changes
    the prediction only when d == 1, one d away always; the map keeps its size."""
    model = build_model(K + 1, embed_dim=D, depth=DEPTH, num_heads=HEADS, decoder_dim=24,
                        decoder_dilation=dilation).eval()
    assert model.decoder.conv6.dilation == model.decoder.conv7.dilation == (dilation, dilation)
    x = torch.randn(1, D, 24, 24)

    def changed(dy, dx):
        y = x.clone()
        y[0, :, 11 + dy, 11 + dx] += 1.0
        with torch.no_grad():
            return not torch.allclose(model.decoder(x)[0, :, 11, 11], model.decoder(y)[0, :, 11, 11])

    with torch.no_grad():
        assert model.decoder(x).shape == (1, K + 1, 24, 24)
    assert changed(0, dilation) and changed(dilation, -dilation) and changed(0, 2 * dilation)
    assert changed(0, 1) == (dilation == 1) and changed(1, 1) == (dilation == 1)
    assert tiny().decoder.conv6.dilation == (5, 5)  # the reference default


def test_load_weights_depth_mismatch():
    model = build_model(K + 1, embed_dim=D, depth=DEPTH - 1, num_heads=HEADS)
    with pytest.raises(ValueError, match=f"checkpoint has depth {DEPTH} but the model has depth {DEPTH - 1}"):
        load_weights(model, tiny().state_dict())


def test_param_groups_partition():
    model = tiny()
    groups = model.param_groups()
    assert len(groups) == 4
    ids = [id(p) for g in groups for p in g]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("encoder.") and "norm" not in names[id(p)] for p in groups[0])
    assert all(names[id(p)].startswith("encoder.") and "norm" in names[id(p)] for p in groups[1])
    assert {names[id(p)].split(".")[0] for p in groups[2]} == {"classifier", "aux_classifier", "graph_layer"}
    assert {names[id(p)].split(".")[0] for p in groups[3]} == {"decoder"}


# ---- a plain re-implementation of the reference forward, written from METHOD.md §1-3 ----

def ln(x, sd, key, eps):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps)


def linear(x, sd, key):
    return x @ sd[key + ".weight"].T + sd[key + ".bias"]


def plain_forward(sd: dict, x: torch.Tensor, K: int, heads: int, aux_layer: int = -3, with_gcr: bool = True):
    B, _, H, W = x.shape
    h, w, T = H // 16, W // 16, K + 4
    D = sd["encoder.cls_token"].shape[-1]
    depth = len({k.split(".")[2] for k in sd if k.startswith("encoder.blocks.")})
    tokens = F.conv2d(x, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=16)
    tokens = torch.cat([sd["encoder.cls_token"].expand(B, T, D), tokens.flatten(2).transpose(1, 2)], dim=1)
    pos = sd["encoder.pos_embed"]
    if not (h * w == 196 and H == W):
        grid = pos[:, T:].reshape(1, 14, 14, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / 14, (w + 0.1) / 14), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :T], grid.permute(0, 2, 3, 1).reshape(1, h * w, D)], dim=1)
    z = tokens + pos
    feats = []
    for i in range(depth):
        p = f"encoder.blocks.{i}."
        y = ln(z, sd, p + "norm1", 1e-6)
        qkv = linear(y, sd, p + "attn.qkv").reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        raw = q @ k.transpose(-2, -1)  # (B, heads, L, L)
        att = (raw * (D // heads) ** -0.5).softmax(-1)
        z = z + linear((att @ v).transpose(1, 2).reshape(B, -1, D), sd, p + "attn.proj")
        y = ln(z, sd, p + "norm2", 1e-6)
        z = z + linear(F.gelu(linear(y, sd, p + "mlp.fc1")), sd, p + "mlp.fc2")
        feats.append(z)
    z = ln(z, sd, "encoder.norm", 1e-6)
    feats[-1] = z
    to_map = lambda t: t.transpose(1, 2).reshape(B, D, h, w)  # noqa: E731
    patch_map, aux_map = to_map(z[:, T:]), to_map(feats[aux_layer][:, T:])
    attn_map = raw.sum(1)[:, 4:T, T:].reshape(B, K, h, w)

    cls_logits = F.conv2d(patch_map.amax((2, 3), keepdim=True), sd["classifier.weight"]).flatten(1)
    aux_logits = F.conv2d(aux_map.amax((2, 3), keepdim=True), sd["aux_classifier.weight"]).flatten(1)
    s = F.relu(F.conv2d(patch_map, sd["decoder.conv6.weight"], padding=5, dilation=5))
    s = F.relu(F.conv2d(s, sd["decoder.conv7.weight"], padding=5, dilation=5))
    seg = F.conv2d(s, sd["decoder.conv8.weight"])

    cls_tokens = z[:, 4:T]
    if with_gcr:
        e_h = linear(cls_tokens, sd, "graph_layer.head_proj")
        e_t = linear(torch.cat([cls_tokens, z[:, T:]], dim=1), sd, "graph_layer.tail_proj")
        a, idx = (e_h @ e_t.transpose(1, 2) / math.sqrt(D)).topk(int(0.5 * K), dim=-1)
        nb = torch.stack([e_t[b, idx[b]] for b in range(B)])  # (B, K, k, D)
        prob = a.softmax(-1)[..., None]
        gate = torch.tanh(e_h[:, :, None] + (1 - prob) * e_h[:, :, None] + prob * nb)
        score = torch.einsum("bkjd,bkje->bkj", nb, gate)  # the reference's einsum: two free D indices
        e_n = (score.softmax(-1)[..., None] * nb).sum(2)
        out = (F.leaky_relu(linear(0.1 * (e_h + e_n) + cls_tokens, sd, "graph_layer.linear1"))
               + F.leaky_relu(linear(0.1 * e_h * e_n + cls_tokens, sd, "graph_layer.linear2")))
        cls_tokens = ln(out, sd, "graph_layer.norm", 1e-5)
    return (cls_logits, seg, patch_map, aux_logits, cls_tokens, attn_map), (
        F.conv2d(patch_map, sd["classifier.weight"]), F.conv2d(aux_map, sd["aux_classifier.weight"]))


@pytest.mark.parametrize("size", [(64, 80), (224, 224)])
def test_forward_matches_plain_reimplementation(size):
    model = tiny()
    x = torch.randn(2, 3, *size)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(x)
        cams = model.cams(x)
        want, want_cams = plain_forward(sd, x, K, HEADS)
    assert isinstance(out, MoReOutput)
    for name, a, b in zip(MoReOutput._fields, out, want):
        assert a.shape == b.shape, name
        # the decoder sums 512 x 9 products per output: float32 rounding depends on the conv
        # algorithm oneDNN picks (thread count), so its tolerance scales with that depth
        tol = 1e-4 if name == "seg_logits" else 1e-5
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=name)
    for a, b in zip(cams, want_cams):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_without_gcr_and_gradients():
    model = tiny().train()
    x = torch.randn(1, 3, 48, 64)
    out = model(x, with_gcr=False)
    with torch.no_grad():
        want, _ = plain_forward(model.state_dict(), x, K, HEADS, with_gcr=False)
    torch.testing.assert_close(out.class_tokens, want[4], atol=1e-5, rtol=1e-5)
    assert not out.attn_map.requires_grad
    sum(t.sum() for t in out[:5]).backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
    # only the parameters the forward never uses are frozen (no DDP unused-parameter search needed)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.head.weight", "encoder.head.bias", "graph_layer._fc1.0.weight",
                      "graph_layer._fc1.0.bias"}
    cam, aux_cam = model.cams(x)
    assert not aux_cam.requires_grad and not cam.requires_grad and cam.shape == (1, K, 3, 4)


def test_with_cams_hands_over_the_cams_of_the_same_pass():
    model = tiny().train()
    x = torch.randn(2, 3, 48, 64)
    out = model(x, with_cams=True)
    plain = model(x)
    assert type(out) is type(plain) is MoReOutput and len(out) == len(plain) == 6
    assert plain.cams is None and out.cls_logits.requires_grad
    for name, a, b in zip(MoReOutput._fields, out, plain):
        torch.testing.assert_close(a, b, msg=name)
    cam, aux_cam = out.cams
    want_cam, want_aux = model.cams(x)
    assert not aux_cam.requires_grad and not cam.requires_grad
    torch.testing.assert_close(cam, want_cam, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux_cam, want_aux, atol=1e-5, rtol=1e-5)


def test_cam_only_is_the_reference_forward_contract():
    """`model(x, cam_only=True) -> (aux_cam, cam)` in the reference's order (METHOD.md §11), against the
    plain re-implementation (whose CAMs come in the project's order, (cam, aux_cam))."""
    model = tiny()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        got = model(x, cam_only=True)
        _, (want_cam, want_aux) = plain_forward(model.state_dict(), x, K, HEADS)
    assert isinstance(got, tuple) and len(got) == 2 and not got[0].requires_grad
    torch.testing.assert_close(got[0], want_aux, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want_cam, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want_aux, want_cam)
