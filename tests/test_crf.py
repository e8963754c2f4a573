"""DenseCRF post-processing (METHOD.md §8)."""
import sys

import numpy as np
import pytest

from utils import crf

NO_PYDENSECRF = "pydensecrf2 not installed (optional; wetr.densecrf is the torch backend)"


def toy_problem(seed=0):
    """Two flat colour regions split by a vertical edge, and a noisy two-class stack whose
    argmax is wrong on ~25% of the pixels."""
    rng = np.random.default_rng(seed)
    h, w = 24, 32
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[:, : w // 2] = (40, 60, 200)
    image[:, w // 2:] = (220, 200, 30)
    truth = np.zeros((h, w), dtype=np.int64)
    truth[:, w // 2:] = 1
    p1 = np.where(truth == 1, 0.7, 0.3) + rng.normal(0, 0.25, (h, w))
    p1 = np.clip(p1, 0.02, 0.98)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    return image, probs, truth


def test_crf_moves_noisy_labels_to_colour_edges():
    pytest.importorskip("pydensecrf", reason=NO_PYDENSECRF)
    image, probs, truth = toy_problem()
    before = (probs.argmax(0) == truth).mean()
    q = crf.crf_inference(image, probs)
    assert q.shape == probs.shape and q.dtype == np.float32
    assert np.allclose(q.sum(0), 1, atol=1e-4)
    after = (q.argmax(0) == truth).mean()
    assert before < 0.9 and after > 0.99 and after > before


def test_crf_label_maps_channels_to_class_ids_and_pool_agrees():
    pytest.importorskip("pydensecrf", reason=NO_PYDENSECRF)
    image, probs, truth = toy_problem(1)
    keys = np.array([0, 7])
    label = crf.crf_label(image, probs, keys)
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 7}
    assert np.array_equal(label, keys[crf.crf_inference(image, probs).argmax(0)])
    empty = crf.crf_label(image, probs[:0], keys[:0])
    assert empty.shape == truth.shape and not empty.any()   # no present class: background
    with crf.CRFPool(1) as pool:
        assert np.array_equal(label, pool.submit(image, probs, keys).result())


def test_missing_pydensecrf_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydensecrf", None)   # makes the import fail
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    image, probs, _ = toy_problem()
    with pytest.raises(RuntimeError) as info:
        crf.crf_inference(image, probs)
    assert str(info.value) == ("crf_backend=pydensecrf needs pydensecrf2: pip install pydensecrf2, "
                               "or use crf_backend=torch (no extra package)")
    with pytest.raises(RuntimeError):
        crf.CRFPool(1)
