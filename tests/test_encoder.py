"""ClassTokenViT (METHOD.md §1) on tiny configs, against explicit re-computations."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from wetr.encoder import ClassTokenViT, resample_patch_pos_embed

K, D, DEPTH, HEADS = 3, 32, 4, 4


def tiny(**kw) -> ClassTokenViT:
    torch.manual_seed(0)
    enc = ClassTokenViT(K, embed_dim=D, depth=DEPTH, num_heads=HEADS, **kw).eval()
    with torch.no_grad():  # break the near-identity of a fresh init so the checks can fail
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return enc


def cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def bicubic_loop(grid: torch.Tensor, out_h: int, out_w: int, sh: float, sw: float) -> torch.Tensor:
    """grid (C, n, m); source coordinate (dst + 0.5) / scale - 0.5, borders clamped."""
    C, n, m = grid.shape
    out = torch.zeros(C, out_h, out_w, dtype=torch.float64)
    for y in range(out_h):
        sy = (y + 0.5) / sh - 0.5
        for x in range(out_w):
            sx = (x + 0.5) / sw - 0.5
            for iy in range(math.floor(sy) - 1, math.floor(sy) + 3):
                for ix in range(math.floor(sx) - 1, math.floor(sx) + 3):
                    wgt = cubic(sy - iy) * cubic(sx - ix)
                    out[:, y, x] += wgt * grid[:, min(max(iy, 0), n - 1), min(max(ix, 0), m - 1)].double()
    return out


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_forward_shapes(size):
    enc = tiny()
    x = torch.randn(2, 3, *size)
    h, w = size[0] // 16, size[1] // 16
    out = enc(x)
    assert out.class_tokens.shape == (2, K, D)
    assert out.patch_map.shape == (2, D, h, w)
    assert out.aux_map.shape == (2, D, h, w)
    assert out.attn_map.shape == (2, K, h, w)
    assert not out.attn_map.requires_grad
    assert out.patch_map.requires_grad and out.class_tokens.requires_grad


def test_pos_embed_resampling_uses_scale_factor():
    torch.manual_seed(1)
    pos = torch.randn(1, 196, 2)
    h, w = 4, 6
    got = resample_patch_pos_embed(pos, h, w)
    grid = pos.reshape(1, 14, 14, 2).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=((h + 0.1) / 14, (w + 0.1) / 14), mode="bicubic", align_corners=False)
    assert torch.equal(got, want.permute(0, 2, 3, 1).reshape(1, h * w, 2))
    # the scale factor, not the output size, sets the sampling coordinates
    loop = bicubic_loop(grid[0], h, w, (h + 0.1) / 14, (w + 0.1) / 14)
    torch.testing.assert_close(got[0].T.reshape(2, h, w).double(), loop, atol=1e-5, rtol=0)
    by_size = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    assert not torch.allclose(by_size.permute(0, 2, 3, 1).reshape(1, h * w, 2), got, atol=1e-3)


def test_pos_embed_stored_grid_only_for_square_inputs():
    enc = tiny()
    assert enc.pos_embed_for(14, 14, square_input=True) is enc.pos_embed
    # a 14x14 grid from a non-square input is still resampled (reference quirk)
    resampled = enc.pos_embed_for(14, 14, square_input=False)
    assert torch.equal(resampled[:, :K + 4], enc.pos_embed[:, :K + 4])
    assert not torch.allclose(resampled, enc.pos_embed)


def test_outputs_against_explicit_recomputation():
    enc = tiny()
    x = torch.randn(2, 3, 48, 80)
    h, w, T = 3, 5, K + 4
    block_out, last_in = [], []
    hooks = [b.register_forward_hook(lambda m, i, o: block_out.append(o)) for b in enc.blocks]
    hooks.append(enc.blocks[-1].register_forward_pre_hook(lambda m, i: last_in.append(i[0])))
    with torch.no_grad():
        out = enc(x)
    for hk in hooks:
        hk.remove()
    final = enc.norm(block_out[-1])
    assert torch.equal(out.class_tokens, final[:, 4:T])
    assert torch.equal(out.patch_map, final[:, T:].transpose(1, 2).reshape(2, D, h, w))
    assert torch.equal(out.aux_map, block_out[DEPTH - 3][:, T:].transpose(1, 2).reshape(2, D, h, w))

    # raw q.k per head (no scaling, no softmax), summed over heads, class rows x patch columns
    blk = enc.blocks[-1]
    qkv = blk.attn.qkv(blk.norm1(last_in[0])).reshape(2, T + h * w, 3, HEADS, D // HEADS)
    want = torch.zeros(2, K, h * w)
    for b in range(2):
        for c in range(K):
            for n in range(h * w):
                for hd in range(HEADS):
                    want[b, c, n] += qkv[b, 4 + c, 0, hd] @ qkv[b, T + n, 1, hd]
    torch.testing.assert_close(out.attn_map, want.reshape(2, K, h, w), atol=1e-5, rtol=1e-5)


def test_aux_layer_minus_one_is_the_normed_output():
    enc = tiny(aux_layer=-1)
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 32, 32))
    assert torch.equal(out.aux_map, out.patch_map)


def test_state_dict_keys():
    enc = tiny()
    keys = set(enc.state_dict())
    block = {f"blocks.{i}.{m}.{p}" for i in range(DEPTH) for p in ("weight", "bias")
             for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")}
    want = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias", "head.weight", "head.bias"} | block
    assert keys == want
    assert enc.cls_token.shape == (1, K + 4, D) and enc.pos_embed.shape == (1, K + 4 + 196, D)
    assert enc.head.weight.shape == (K + 4, D)


def test_random_init_tokens():
    torch.manual_seed(0)
    enc = ClassTokenViT(K, embed_dim=D, depth=1, num_heads=HEADS, aux_layer=0)
    # timm's trunc_normal_(std=0.02) cuts at +-2 absolute, i.e. effectively a plain normal
    for p in (enc.cls_token, enc.pos_embed):
        assert 0.017 < p.std() < 0.023 and p.abs().max() < 0.2


def test_init_from_pretrained_file(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=D, depth=2, num_heads=HEADS)
    with torch.no_grad():
        src.cls_token.normal_()
    path = tmp_path / "tiny_vit.pth"
    torch.save(src.state_dict(), path)
    enc = ClassTokenViT(K, pretrained=path, embed_dim=D, depth=2, num_heads=HEADS, aux_layer=-2)
    ref = src.state_dict()
    T = K + 4
    assert torch.equal(enc.cls_token, ref["cls_token"].expand(1, T, D))
    assert torch.equal(enc.pos_embed[:, 4:T], ref["pos_embed"][:, :1].expand(1, K, D))
    assert torch.equal(enc.pos_embed[:, T:], ref["pos_embed"][:, 1:])
    extra = enc.pos_embed[:, :4]
    assert extra.abs().max() <= 2 and extra.std() > 0.3  # truncated normal, std 1, cut at +-2
    for key, value in ref.items():
        if key not in ("cls_token", "pos_embed") and not key.startswith("head."):
            assert torch.equal(enc.state_dict()[key], value), key
    assert enc.head.weight.shape == (T, D)


def test_offline_hub_gives_one_line_error(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(RuntimeError, match=r"model\.pretrained=/path/to/jx_vit_base_p16_224-80ecf9dd\.pth") as e:
        ClassTokenViT(K, pretrained=True, embed_dim=D, depth=1, num_heads=HEADS, aux_layer=0)
    assert "\n" not in str(e.value)


def test_aux_layer_outside_the_blocks_is_a_one_line_error():
    with pytest.raises(ValueError, match="aux_layer=-3 does not index one of the 2 blocks"):
        ClassTokenViT(K, embed_dim=D, depth=2, num_heads=HEADS)
