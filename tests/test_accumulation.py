"""The authors' effective batch on any GPU count (issue 28): `global_batch` by gradient
accumulation.

- the number of micro-batches, and the one-line refusal when global_batch does not divide;
- 2 micro-batches of 2 against one batch of 4 on the same images (tiny model, CPU): the step's
  gradient is equal where the loss terms are per-image means (cls, cls_aux, class tokens, CLE,
  dense energy), and
  each term's relative gradient difference is measured (docs/DESIGN.md, "Gradient accumulation");
- real runs: 2 processes x 2 images and 2 processes x 1 image x 2 micro-batches against
  1 process x 4 images and 1 x 2 x 2 (gloo, same seed): the same steps, lr and loss schedule,
  weights close; DDP all-reduces once per optimizer step (counted by a comm hook).
Resume mid-accumulation: tests/test_resume.py.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets.synthetic import make_synthetic
from tools.bench.step import synthetic_batch
from utils.config import ConfigError
from wetr.config import make_config
from utils.dist import DistInfo
from utils.checkpoint import load_file
from wetr import step as wstep
from wetr.run import accumulation

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.pretrained=false", "model.embed_dim=32", "model.depth=3", "model.num_heads=2",
        "data.num_classes=5", "data.crop_size=64", "cam.scales=[1.0,0.5]", "par.num_iter=2",
        "par.dilations=[1,2]", "device=cpu"]
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
# per-image means (CLE and the dense energy sum over an image's classes / pixels, then divide by
# B): accumulation gives their gradient exactly
MEAN_TERMS = ("cls", "cls_aux", "tokens", "cle", "reg")
BATCH_TERMS = ("une", "ptc", "seg")  # normalised over the batch, or random (DESIGN's note)


@pytest.mark.parametrize("global_batch, batch, world, want", [
    (0, 4, 1, 1), (0, 2, 3, 1), (4, 4, 1, 1), (4, 2, 1, 2), (4, 2, 2, 1), (8, 1, 2, 4), (16, 4, 2, 2)])
def test_global_batch_sets_the_micro_batches(global_batch, batch, world, want):
    cfg = make_config(None, [f"global_batch={global_batch}", f"batch_size={batch}"])
    assert accumulation(cfg, world) == want


@pytest.mark.parametrize("global_batch, batch, world", [(6, 4, 1), (4, 4, 2), (6, 2, 2), (-4, 2, 1)])
def test_global_batch_that_does_not_divide_is_refused(global_batch, batch, world):
    cfg = make_config(None, [f"global_batch={global_batch}", f"batch_size={batch}"])
    with pytest.raises(ConfigError) as err:
        accumulation(cfg, world)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"global_batch={global_batch} is not a positive "
                                              f"multiple of batch_size {batch} x {world}")


# ----------------------------------------------------------------------------- one step
def tiny_training(*extra: str):
    """A 12 x 12 token grid on 96-pixel images (8-pixel patches): room for UNE's candidates."""
    cfg = make_config(None, TINY + ["model.patch_size=8", "data.crop_size=96", *extra])
    torch.manual_seed(0)
    return cfg, wstep.build_training(cfg, CPU)


def halves(images: torch.Tensor, cls_label: torch.Tensor) -> list[wstep.Batch]:
    return [wstep.to_device(images[i:i + 2], cls_label[i:i + 2], CPU.device) for i in (0, 2)]


def test_two_micro_batches_give_the_gradient_of_one_batch():
    """Only the per-image-mean terms on (the others start later): train_step over [2, 2] leaves
    the same gradient as over [4] (float summation order apart), and logs the same losses."""
    late = [f"loss.after.{k}=1000" for k in BATCH_TERMS] + ["loss.after.reg=-1"]
    images, cls_label = synthetic_batch(4, 96, 4, seed=0)
    grads, logged = [], []
    for batches in (halves(images, cls_label), [wstep.to_device(images, cls_label, CPU.device)]):
        cfg, t = tiny_training(*late)
        _, values, nonfinite = wstep.train_step(t, batches, 0, cfg)
        assert not any(nonfinite)
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
        logged.append(values)
    (acc, full) = grads
    assert acc.keys() == full.keys() and len(full) > 50
    for n, g in full.items():
        torch.testing.assert_close(acc[n], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()) + 1e-12,
                                   msg=n)
    torch.testing.assert_close(logged[0], logged[1], rtol=1e-6, atol=1e-7)


def test_a_non_finite_micro_batch_skips_the_whole_step(monkeypatch):
    """The finite check covers every micro-batch of the step: a NaN in the first (whose backward
    already ran) names the term and leaves weights and optimizer state untouched."""
    cfg, t = tiny_training()
    real, calls = wstep.compute_losses, []

    def first_poisoned(training, batch, step, cfg):
        total, terms = real(training, batch, step, cfg)
        calls.append(step)
        if len(calls) == 1:
            terms = {**terms, "ptc": terms["ptc"] * float("nan")}
            total = total + terms["ptc"]
        return total, terms

    monkeypatch.setattr(wstep, "compute_losses", first_poisoned)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    _, _, nonfinite = wstep.train_step(t, halves(*synthetic_batch(4, 96, 4, seed=0)), 0, cfg)
    assert calls == [0, 0]
    assert dict(zip(("total",) + wstep.LOSS_TERMS, nonfinite)) == {
        "total": True, "cls": False, "cls_aux": False, "tokens": False, "cle": False,
        "une": False, "ptc": True, "seg": False, "reg": False}
    assert all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())
    assert not t.optimizer.state


def term_gradient_differences() -> dict[str, float]:
    """For each loss term, with every term on: ||g_4 - (g_2a + g_2b) / 2|| / ||g_4||, the
    relative difference between its gradient on the batch of 4 and the mean of its gradients on
    the two halves (same weights and images; UNE's random draws seeded alike)."""
    cfg, t = tiny_training()
    step = max(cfg.loss.after.values()) + 1
    images, cls_label = synthetic_batch(4, 96, 4, seed=0)
    params = [p for p in t.model.parameters() if p.requires_grad]

    def grads(batch: wstep.Batch) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        _, terms = wstep.compute_losses(t, batch, step, cfg)
        out = {}
        for k in wstep.LOSS_TERMS:
            g = torch.autograd.grad(terms[k], params, retain_graph=True, allow_unused=True)
            out[k] = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                                for x, p in zip(g, params)])
        return out

    full = grads(wstep.to_device(images, cls_label, CPU.device))
    a, b = (grads(h) for h in halves(images, cls_label))
    assert all(full[k].norm() > 0 for k in full)
    return {k: float((full[k] - (a[k] + b[k]) / 2).norm() / full[k].norm()) for k in full}


def test_per_batch_terms_are_the_noted_ones():
    diff = term_gradient_differences()
    print("relative gradient difference, 2 x 2 against 4:",
          {k: f"{v:.2e}" for k, v in diff.items()})
    for k in MEAN_TERMS:
        assert diff[k] < 1e-5, (k, diff[k])
    for k in BATCH_TERMS:   # each normalised over the batch (or random): it really differs
        assert diff[k] > 1e-3, (k, diff[k])


# ----------------------------------------------------------------------------- real runs
COUNTING = """
import os, sys
from torch.nn.parallel import DistributedDataParallel
from scripts.train_voc import VOC
from tools.cli import train_entry
from wetr import engine

build, calls = engine.build_training, [0]

def counted(cfg, dist):  # count DDP's bucket all-reduces through a comm hook
    t = build(cfg, dist)
    if isinstance(t.train_model, DistributedDataParallel):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        def hook(state, bucket):
            calls[0] += 1
            return allreduce_hook(state, bucket)
        t.train_model.register_comm_hook(None, hook)
    return t

engine.build_training = counted
train_entry(VOC, sys.argv[1:])
with open(os.path.join({out!r}, f"allreduce_rank{{os.environ.get('RANK', 0)}}.txt"), "w") as f:
    f.write(str(calls[0]))
"""
RUN = TINY + ["val.size=64", "val.max_images=2", "loss.after.seg=2", "loss.after.reg=2",
              "cam.cam2mask=4", "log_every=1", "save_every=100", "eval_every=100", "max_iters=6",
              "optim.warmup_iters=2", "deterministic=true", "data.num_workers=0",
              "log.tensorboard=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def train(data: Path, work: Path, tag: str, procs: int, *extra: str) -> Path:
    script = work / "counting.py"
    script.write_text(COUNTING.format(out=str(work / tag)))
    launch = ([sys.executable, "-m", "utils.dist", "--nproc_per_node=2",
               f"--master_port={free_port()}"] if procs == 2 else [sys.executable])
    cmd = [*launch, str(script), f"tag={tag}", f"work_dir={work}", f"data.root={data}", *RUN, *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                            "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work / tag


def rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "lr" in r]


def weights(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().float() for v in state.values()])


def last_weights(run: Path) -> torch.Tensor:
    return weights(load_file(run / "checkpoints" / "last.pth")["model"])


def initial_weights(run: Path) -> torch.Tensor:
    """The weights the run started from (rank 0's, which DDP broadcasts), rebuilt from its seed."""
    cfg = make_config(None, [f"data.root={run}", *RUN])
    torch.manual_seed(cfg.seed)
    return weights(wstep.build_training(cfg, CPU).model.state_dict())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("accum")
    data = work / "data"
    from datasets.synthetic import SyntheticParams
    make_synthetic(str(data), SyntheticParams(num_fg_classes=4, num_train=16, num_val=2, size=64),
                   progress=False)
    return {
        "1x4": train(data, work, "1x4", 1, "batch_size=4"),
        "1x2x2": train(data, work, "1x2x2", 1, "batch_size=2", "global_batch=4"),
        "2x2": train(data, work, "2x2", 2, "batch_size=2", "global_batch=4"),
        "2x1x2": train(data, work, "2x1x2", 2, "batch_size=1", "global_batch=4"),
        "1x2": train(data, work, "1x2", 1, "batch_size=2"),   # the batch not kept: the control
    }


def test_accumulated_and_distributed_runs_follow_the_one_process_run(runs):
    """Same steps, lr and loss schedule; weights closer to 1 x 4's than those of a run that does
    not keep the global batch (1 x 2: DuPL #2's mistake) are, measured against how far training
    moved them (the per-batch terms and UNE's draws differ: docs/DESIGN.md)."""
    ref = rows(runs["1x4"])
    ref_w = last_weights(runs["1x4"])
    moved = float((ref_w - initial_weights(runs["1x4"])).norm())
    control = float((last_weights(runs["1x2"]) - ref_w).norm()) / moved
    for name in ("1x2x2", "2x2", "2x1x2"):
        got = rows(runs[name])
        assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 7)), name
        assert [r["lr"] for r in got] == [r["lr"] for r in ref], name
        for term in ("seg", "reg"):  # the loss schedule, in optimizer steps
            assert [r[f"loss/{term}"] != 0 for r in got] == [r[f"loss/{term}"] != 0 for r in ref]
        rel = float((last_weights(runs[name]) - ref_w).norm()) / moved
        loss = max(abs(a["loss/total"] - b["loss/total"]) / b["loss/total"] for a, b in zip(got, ref))
        print(f"{name}: |w - w_1x4| / |w_1x4 - w_init| = {rel:.3f} (1x2: {control:.3f}); "
              f"largest relative loss difference {loss:.1e}")
        assert rel < 0.75 * control, (name, rel, control)
    log = (runs["2x1x2"] / "train.log").read_text()
    assert "effective batch 4 = 1 image(s) x 2 process(es) x 2 micro-batch(es)" in log


def test_ddp_all_reduces_once_per_optimizer_step(runs):
    """2 micro-batches a step (no_sync on the first) all-reduce as often as 1."""
    counts = {n: [int((runs[n] / f"allreduce_rank{r}.txt").read_text()) for r in (0, 1)]
              for n in ("2x2", "2x1x2")}
    assert counts["2x2"][0] > 0
    assert counts["2x2"] == counts["2x1x2"]


# ----------------------------------------------------------------------------- resume
def _resume_point(path: Path, global_batch: int, batch_size: int, world: int):
    from wetr.run import ResumePoint
    return ResumePoint(path, {"config": {"global_batch": global_batch, "batch_size": batch_size},
                              "rng": [None] * world})


@pytest.mark.parametrize("saved, now, refused", [
    ((4, 2, 1), (0, 2, 1), True),     # global_batch=4 forgotten on resume
    ((4, 2, 1), (8, 2, 1), True),
    ((0, 2, 2), (8, 2, 2), True),     # 4 images a step before, 8 now
    ((4, 2, 1), (4, 4, 1), False),    # same images a step, other micro-batches
    ((0, 4, 1), (4, 2, 1), False),    # 4 = 4 x 1 before
    ((0, 2, 2), (0, 2, 1), False),    # another process count: restore warns
])
def test_resume_with_another_global_batch_is_refused(tmp_path, saved, now, refused):
    from wetr.run import RunError, check_resume_batch
    resume = _resume_point(tmp_path / "last.pth", *saved)
    cfg = make_config(None, [f"global_batch={now[0]}", f"batch_size={now[1]}"])
    if not refused:
        check_resume_batch(resume, cfg, now[2])
        return
    with pytest.raises(RunError) as err:
        check_resume_batch(resume, cfg, now[2])
    msg = str(err.value)
    images = saved[0] or saved[1] * saved[2]
    assert "\n" not in msg and f"trained with {images} images per optimizer step" in msg
    assert msg.endswith(f"pass global_batch={images} to continue it")


def test_resume_with_another_global_batch_is_one_line_at_the_entry(tmp_path, capsys):
    """Through the training entry: the checks refuse it before anything is written."""
    from tools.cli import train_entry
    from wetr.factory import model_from_config
    from wetr.optim import build_optimizer
    from wetr.run import save_checkpoint
    from utils.checkpoint import rng_state
    args = TINY + ["batch_size=2", "data.check_layout=false", f"work_dir={tmp_path}", "tag=run"]
    cfg = make_config(None, args + ["global_batch=4"])
    model = model_from_config(cfg)
    training = wstep.Training(model, model, build_optimizer(model.param_groups(), cfg), None, None)
    ck = tmp_path / "saved.pth"
    save_checkpoint(ck, training, 1, cfg, {"best_miou": -1.0},
                    {"rng": [rng_state(CPU.device)], "sums": [torch.zeros(9)], "count": 0})
    with pytest.raises(SystemExit) as exc:
        train_entry({}, args + [f"resume={ck}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1
    assert lines[0] == (f"error: resume checkpoint {ck} was trained with 4 images per optimizer "
                        f"step (global_batch=4) but this run takes 2 (global_batch=0: batch_size 2 "
                        f"x 1 process(es)); pass global_batch=4 to continue it")
    assert not (tmp_path / "run").exists()
