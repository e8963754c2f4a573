"""bf16 autocast, channels-last and torch.compile against fp32 eager (issue 6).

Each variant runs the engine's `main()` for STEPS steps on a tiny synthetic VOC-layout dataset
(64 px, 4-block ViT of width 64, every loss term on from step 10) with the same seed, and its
per-step total loss (metrics.jsonl, log_every=1) is compared with the fp32 eager run.

Stated tolerances:
- channels_last, compile: every step within 1e-3 relative (only summation order changes;
  measured 3e-4).
- bf16: means over blocks of 10 steps within 4 % relative and the mean per-step |difference|
  within 7 % of the mean loss (measured 1.7 % and 3.5 %). Single steps may differ by ~15 %:
  with 8 mantissa bits, pseudo labels near the CAM thresholds flip and CLE follows.
A frozen run (lr 0) is the control: it must fail the bf16 tolerance, so the check detects a run
that does not train like fp32 (measured 33 % and 19 %).
"""
import json
import os

import numpy as np
import pytest
import torch

from datasets.synthetic import SyntheticParams, make_synthetic
from wetr.config import make_config
from wetr.engine import main as train

STEPS = 40
BLOCK = 10
BF16_BLOCK_RTOL = 0.04
BF16_MEAN_ABS_RTOL = 0.07
LAYOUT_RTOL = 1e-3


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """Runs (and caches) one short training per variant; returns its per-step total loss."""
    root = tmp_path_factory.mktemp("amp")
    data = root / "syn"
    make_synthetic(str(data), SyntheticParams(num_fg_classes=3, num_train=16, num_val=2, size=64,
                                              seed=0), progress=False)
    base = [f"data.root={data}", "data.num_classes=4", "model.embed_dim=64", "model.depth=4",
            "model.num_heads=4", "model.pretrained=false", "data.crop_size=64", "batch_size=2",
            f"max_iters={STEPS}", "log_every=1", f"eval_every={10 * STEPS}", f"save_every={10 * STEPS}",
            "val.max_images=1", "val.size=64", "data.num_workers=0", "device=cpu",
            f"work_dir={root / 'runs'}", "optim.warmup_iters=1", "optim.lr=5e-4",
            "loss.after.seg=10", "loss.after.reg=10"]
    cache: dict[str, np.ndarray] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a shared machine; the same for every variant

    def run(name: str, *extra: str) -> np.ndarray:
        if name not in cache:
            train(make_config(None, base + [f"tag={name}", *extra]))
            lines = (root / "runs" / name / "metrics.jsonl").read_text().splitlines()
            losses = [r["loss/total"] for r in map(json.loads, lines) if "loss/total" in r]
            assert len(losses) == STEPS and np.isfinite(losses).all()
            cache[name] = np.array(losses)
        return cache[name]

    yield run
    torch.set_num_threads(threads)


def bf16_errors(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(worst relative error of 10-step block means, mean |difference| / mean loss)."""
    blocks_got, blocks_ref = got.reshape(-1, BLOCK).mean(1), ref.reshape(-1, BLOCK).mean(1)
    block_err = float(np.max(np.abs(blocks_got - blocks_ref) / np.abs(blocks_ref)))
    return block_err, float(np.mean(np.abs(got - ref)) / np.mean(np.abs(ref)))


def test_fp32_run_trains_and_frozen_control_fails_tolerance(runner):
    ref, frozen = runner("fp32"), runner("frozen", "optim.lr=0")
    assert ref[-BLOCK:].mean() < 0.9 * ref[:BLOCK].mean()  # the run learns: a trajectory to compare
    block_err, mean_err = bf16_errors(frozen, ref)
    assert block_err > BF16_BLOCK_RTOL and mean_err > BF16_MEAN_ABS_RTOL


def test_bf16_autocast_trajectory(runner):
    ref, got = runner("fp32"), runner("bf16", "amp=bf16")
    assert not np.array_equal(got, ref)  # autocast did change the arithmetic
    block_err, mean_err = bf16_errors(got, ref)
    assert block_err <= BF16_BLOCK_RTOL, f"10-step block means differ by {block_err:.3f}"
    assert mean_err <= BF16_MEAN_ABS_RTOL, f"mean per-step difference {mean_err:.3f}"


def test_channels_last_trajectory(runner):
    ref, got = runner("fp32"), runner("channels_last", "channels_last=true")
    np.testing.assert_allclose(got, ref, rtol=LAYOUT_RTOL, atol=0)


@pytest.mark.skipif(os.environ.get("MORE_TEST_COMPILE") != "1",
                    reason="torch.compile (inductor, C++ codegen) of the tiny model takes ~60 s on this "
                           "2-core CPU; set MORE_TEST_COMPILE=1 to run it (measured: within 3e-4 of fp32)")
def test_compile_trajectory(runner):
    ref, got = runner("fp32"), runner("compile", "compile=true")
    np.testing.assert_allclose(got, ref, rtol=LAYOUT_RTOL, atol=0)
