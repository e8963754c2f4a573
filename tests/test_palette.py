"""Palette PNG round trip, VOC colours and overlays."""
import numpy as np
from matplotlib import colormaps
from PIL import Image

from utils.palette import VOC_PALETTE, colorize, jet_overlay, read_label_png, save_label_png


def loop_voc_colour(i):
    r = g = b = 0
    c = i
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return r, g, b


def test_voc_palette_matches_bit_loop():
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    for i in range(256):
        assert tuple(VOC_PALETTE[i]) == loop_voc_colour(i)
    assert tuple(VOC_PALETTE[15]) == (192, 128, 128)   # person


def test_label_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    label = rng.integers(0, 21, (23, 31)).astype(np.uint8)
    label[rng.random(label.shape) < 0.1] = 255
    path = tmp_path / "sub" / "x.png"
    save_label_png(path, label.astype(np.int64))
    assert np.array_equal(read_label_png(path), label)
    with Image.open(path) as im:
        assert im.mode == "P"
        pal = np.array(im.getpalette()[:768]).reshape(256, 3)
    assert np.array_equal(pal, VOC_PALETTE)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]   # no temp files left


def test_colorize_and_overlay_match_loops():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 256, (5, 6))
    rgb = colorize(label)
    for y in range(5):
        for x in range(6):
            assert tuple(rgb[y, x]) == loop_voc_colour(int(label[y, x]))
    image = rng.integers(0, 256, (5, 6, 3)).astype(np.uint8)
    heat = rng.random((5, 6))
    out = jet_overlay(image, heat, 0.6)
    jet = colormaps["jet"]
    for y in range(5):
        for x in range(6):
            col = np.array(jet(heat[y, x])[:3]) * 255
            want = (0.6 * col + 0.4 * image[y, x]).astype(np.uint8)
            assert np.array_equal(out[y, x], want)
