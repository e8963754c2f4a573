"""Never lose a run: exact resume after SIGKILL (1 process and 2 gloo processes under torchrun),
elastic restart, atomic checkpoints, non-finite loss handling.

Every run is a real training process on a tiny synthetic set (CPU, deterministic=true), with
segmentation and the dense energy loss active from step 2 so that every loss term, the PAR
refinement and UNE's random draws are exercised before and after the resume point.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datasets.synthetic import SyntheticParams, make_synthetic
from utils.checkpoint import load_file, remove_stale_tmp, save_atomic
from wetr.run import truncate_metrics

ROOT = Path(__file__).resolve().parent.parent
MAX_ITERS = 6
TINY = ["data.num_classes=5", "data.crop_size=128", "model.pretrained=false", "model.embed_dim=32",
        "model.depth=3", "model.num_heads=2", "batch_size=2", "val.size=64", "val.max_images=2",
        "cam.scales=[1.0,0.5]", "par.num_iter=2", "par.dilations=[1,2]", "deterministic=true",
        "loss.after.seg=1", "loss.after.reg=1", "log_every=3", "save_every=2", "eval_every=4",
        f"max_iters={MAX_ITERS}"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume") / "data"
    make_synthetic(str(root), SyntheticParams(num_fg_classes=4, num_train=16, num_val=4, size=96),
                   progress=False)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict:
    return {**os.environ, **extra}


ENTRY = """
import os, signal, sys
import torch
from scripts.train_voc import VOC
from tools.cli import train_entry
from wetr import engine, step as wstep

next_batch, compute_losses = engine._next_batch, wstep.compute_losses

def kill_once(ctx, state, batches):  # one worker dies hard (no cleanup, like a pre-empted node), once
    calls.append(state.step)
    if (state.step == {kill_at} and calls.count(state.step) == {kill_micro} and
            ctx.dist.rank == ctx.dist.world_size - 1 and not os.path.exists({marker!r})):
        open({marker!r}, "w").close()
        print(f"rank {{ctx.dist.rank}} kills itself before step {{state.step}}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return next_batch(ctx, state, batches)

def poison(training, batch, step, cfg):
    total, terms = compute_losses(training, batch, step, cfg)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if step == {nan_at} and rank == {nan_rank}:
        terms = dict(terms)
        terms[{nan_term!r}] = terms[{nan_term!r}] * float("nan")
        total = total + terms[{nan_term!r}]
    return total, terms

calls = []
engine._next_batch, wstep.compute_losses = kill_once, poison
train_entry(VOC, sys.argv[1:])
"""


def entry(folder: Path, kill_at: int = -1, nan: str = "", kill_micro: int = 1) -> Path:
    """A training script (scripts.train_voc's config) that wraps the engine's batch fetch and
    the step's losses to inject faults: kill_at: before that step (before its micro-batch
    `kill_micro`, from 1) the last rank SIGKILLs itself, once; nan="TERM:STEP[:RANK]": loss term
    TERM is NaN at STEP on RANK (0 if left out)."""
    term, at, *rank = nan.split(":") if nan else ("cls", "-1")
    path = folder / "train_with_faults.py"
    path.write_text(ENTRY.format(kill_at=kill_at, kill_micro=kill_micro,
                                 marker=str(folder / ".fault_injected"),
                                 nan_term=term, nan_at=int(at), nan_rank=int(rank[0]) if rank else 0))
    return path


def args(data: Path, work: Path, workers: int) -> list[str]:
    return [f"work_dir={work}", f"data.root={data}", f"data.num_workers={workers}", *TINY]


def start_1(data: Path, work: Path, tag: str, *extra: str, script: Path | None = None
            ) -> subprocess.Popen:
    """One process, no torchrun: `python -m scripts.train_voc`, or `script` (one thread: runs
    may overlap)."""
    run = [str(script)] if script else ["-m", "scripts.train_voc"]
    cmd = [sys.executable, *run, f"tag={tag}", "device=cpu", *args(data, work, 0), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> tuple[str, str, int]:
    out, err = p.communicate(timeout=300)
    return out, err, p.returncode


def train_1(data: Path, work: Path, tag: str, *extra: str, script: Path | None = None
            ) -> tuple[str, str, int]:
    return finish(start_1(data, work, tag, *extra, script=script))


def train_2(data: Path, work: Path, tag: str, *extra: str, torchrun_args: str = "",
            script: Path | None = None):
    """Two gloo processes through run_train.sh (preflight + torchrun), as a user starts them;
    or `script` under torchrun (`python -m utils.dist`, as run_train.sh starts it)."""
    if script is None:
        cmd = ["bash", "run_train.sh", "scripts/train_voc.py", "cpu", "2", str(free_port()), tag,
               *args(data, work, 1), *extra]
        # one thread a process, as every other run here (and as run_tests.sh gives its test workers)
        environ = env(TORCHRUN_ARGS=torchrun_args, OMP_NUM_THREADS="1")
    else:
        cmd = [sys.executable, "-m", "utils.dist", "--nproc_per_node=2",
               f"--master_port={free_port()}", *torchrun_args.split(), str(script), f"tag={tag}",
               "device=cpu", *args(data, work, 1), *extra]
        environ = env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
    return r.stdout, r.stderr, r.returncode


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights, optimizer state and logged losses (JSON lines minus wall time and
    throughput)."""
    ca, cb = (load_file(d / "checkpoints" / "last.pth") for d in (a, b))
    assert ca["step"] == cb["step"] == MAX_ITERS
    assert ca["model"].keys() == cb["model"].keys()
    diff = [k for k in ca["model"] if not torch.equal(ca["model"][k], cb["model"][k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert ca["meta"]["best_miou"] == cb["meta"]["best_miou"]

    def records(d: Path) -> list[dict]:
        rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "time" and not k.startswith("speed/")}
                for r in rows]
    assert records(a) == records(b)


def ok(out: str, err: str, rc: int) -> None:
    assert rc == 0, f"run failed ({rc}):\n{out[-3000:]}\n{err[-3000:]}"


# ----------------------------------------------------------------------------- 1 process
def test_sigkill_at_any_step_then_resume_is_bit_identical_1proc(data, tmp_path):
    ref = start_1(data, tmp_path, "ref")
    # SIGKILL from outside once the first checkpoint exists: the step it lands on is up to the
    # scheduler (maybe during a save); whatever it is, resume=auto must end identical.
    p = start_1(data, tmp_path, "run")
    first = tmp_path / "run" / "checkpoints" / "iter_2.pth"
    deadline = time.time() + 240
    while not first.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = load_file(tmp_path / "run" / "checkpoints" / "last.pth")["step"]
    assert 2 <= killed_at < MAX_ITERS

    out, err, rc = train_1(data, tmp_path, "run", "resume=auto")
    ok(out, err, rc)
    ok(*finish(ref))
    assert f"at step {killed_at}" in out
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # no temp file left behind
    assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_kill_mid_accumulation_then_resume_is_bit_identical_1proc(data, tmp_path):
    # global_batch 4 of 2-image micro-batches: two a step. The run dies before the second
    # micro-batch of step 3 (its first already went through forward and backward); it resumes
    # from step 2's checkpoint, at micro-batch 4 of the loader, and ends as a run never killed.
    accum = ("global_batch=4",)
    ref = start_1(data, tmp_path, "ref", *accum)
    out, err, rc = train_1(data, tmp_path, "run", *accum, script=entry(tmp_path, kill_at=3,
                                                                       kill_micro=2))
    assert rc == -signal.SIGKILL and "kills itself before step 3" in err
    assert load_file(tmp_path / "run" / "checkpoints" / "last.pth")["step"] == 2
    out, err, rc = train_1(data, tmp_path, "run", *accum, "resume=auto")
    ok(out, err, rc)
    ok(*finish(ref))
    assert "x 2 micro-batch(es)" in out and "at step 2" in out
    assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_resume_runs_the_checks_once_and_reads_the_checkpoint_once(data, tmp_path, monkeypatch):
    """In-process: a resumed run calls wetr.run.preflight once and loads last.pth once (the
    checks' read is the one restore uses)."""
    from scripts.train_voc import VOC
    from wetr import engine, run as wrun
    from wetr.config import make_config

    argv = ["tag=run", "device=cpu", *args(data, tmp_path, 0), "deterministic=false", "max_iters=2",
            "eval_every=100"]
    engine.main(make_config(VOC, argv))
    checks, loads = [], []
    preflight, load_file_ = wrun.preflight, wrun.load_file
    monkeypatch.setattr(wrun, "preflight", lambda *a: checks.append(1) or preflight(*a))
    monkeypatch.setattr(wrun, "load_file", lambda path: loads.append(Path(path).name) or load_file_(path))
    engine.main(make_config(VOC, argv[:-2] + ["max_iters=3", "eval_every=100", "resume=auto"]))
    assert checks == [1] and loads == ["last.pth"]
    assert load_file(tmp_path / "run" / "checkpoints" / "last.pth")["step"] == 3


# ----------------------------------------------------------------------------- 2 processes
@pytest.fixture(scope="module")
def ref2(data, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ref2")
    ok(*train_2(data, work, "ref"))
    return work / "ref"


def test_sigkill_then_resume_is_bit_identical_2proc(data, ref2, tmp_path):
    # The last rank SIGKILLs itself before step 3 (checkpoint at step 2): torchrun stops the
    # other rank and reports one line.
    out, err, rc = train_2(data, tmp_path, "run", script=entry(tmp_path, kill_at=3))
    assert rc != 0
    assert "rank 1 was killed by SIGKILL" in err
    assert load_file(tmp_path / "run" / "checkpoints" / "last.pth")["step"] == 2

    out, err, rc = train_2(data, tmp_path, "run", "resume=auto")
    ok(out, err, rc)
    assert "resumed from" in out and "at step 2" in out
    assert_same_run(ref2, tmp_path / "run")


def test_kill_mid_accumulation_then_resume_is_bit_identical_2proc(data, tmp_path):
    # 2 processes x 2 images x 2 micro-batches (global_batch 8; DDP no_sync on the first): rank 1
    # dies before the second micro-batch of step 3; the resumed run ends as one never killed.
    accum = ("global_batch=8",)
    ok(*train_2(data, tmp_path, "ref", *accum))
    out, err, rc = train_2(data, tmp_path, "run", *accum, script=entry(tmp_path, kill_at=3,
                                                                       kill_micro=2))
    assert rc != 0 and "rank 1 kills itself before step 3" in err
    assert load_file(tmp_path / "run" / "checkpoints" / "last.pth")["step"] == 2
    out, err, rc = train_2(data, tmp_path, "run", *accum, "resume=auto")
    ok(out, err, rc)
    assert "x 2 micro-batch(es)" in out and "at step 2" in out
    assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_elastic_restart_finishes_bit_identical_2proc(data, ref2, tmp_path):
    out, err, rc = train_2(data, tmp_path, "run", "resume=auto", torchrun_args="--max-restarts=1",
                           script=entry(tmp_path, kill_at=3))
    ok(out, err, rc)
    assert "rank 1 kills itself" in err            # the fault happened once ...
    assert out.count("resumed from") == 1          # ... and the restarted group resumed
    assert_same_run(ref2, tmp_path / "run")


def test_nan_skip_is_consistent_on_every_rank_2proc(data, tmp_path):
    # Only rank 1 sees a NaN (in CLE) at step 2: both ranks must skip that update (otherwise
    # DDP would hang or the replicas would drift), and training goes on.
    out, err, rc = train_2(data, tmp_path, "run", "nan_policy=skip", "save_every=1",
                           "max_iters=4", script=entry(tmp_path, nan="cle:2:1"))
    ok(out, err, rc)
    assert "step 2: non-finite loss (cle); step skipped on all 2 process(es)" in out
    ck = {n: load_file(tmp_path / "run" / "checkpoints" / f"iter_{n}.pth")["model"] for n in (2, 3, 4)}
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(ck[2], ck[3])        # step index 2 was skipped ...
    assert not same(ck[3], ck[4])    # ... step index 3 was not


# ----------------------------------------------------------------------------- non-finite stop
def test_nan_stop_names_term_step_and_last_checkpoint(data, tmp_path):
    out, err, rc = train_1(data, tmp_path, "run", "max_iters=4", script=entry(tmp_path, nan="une:3"))
    last = tmp_path / "run" / "checkpoints" / "last.pth"
    assert rc == 2
    lines = err.strip().splitlines()
    assert lines == [f"error: non-finite loss (une) at step 3; last good checkpoint: {last} (step 2); "
                     f"lower optim.lr or check the data, then resume=auto (or nan_policy=skip)"]
    assert load_file(last)["step"] == 2                     # untouched, readable
    assert lines[0] in (tmp_path / "run" / "train.log").read_text()


# ----------------------------------------------------------------------------- atomic saves
KILLER = """
import sys, torch
from utils.checkpoint import save_atomic
i = 0
while True:
    i += 1
    save_atomic({"i": i, "w": torch.full((3_000_000,), float(i))}, sys.argv[1])
"""


def test_sigkill_during_save_leaves_a_readable_last(tmp_path):
    path = tmp_path / "last.pth"
    left_tmp = 0
    # Kill at varied moments until one lands inside a save (where the process spends most of
    # its time; a kill between two saves is possible, so a fixed number of tries would be flaky;
    # up to 20 tries, stopping after two hits). The clock starts at this process's first save,
    # not at its start: on a loaded machine `import torch` alone can outlast every delay.
    for delay in (0.7, 1.1, 1.6, 0.35, 0.9, 1.3, 0.5, 1.9, 0.6, 1.0,
                  0.45, 1.45, 0.8, 1.75, 0.55, 1.2, 0.4, 1.5, 0.95, 0.65):
        before = path.stat().st_mtime_ns if path.exists() else None
        p = subprocess.Popen([sys.executable, "-c", KILLER, str(path)], cwd=ROOT, env=env())
        deadline = time.time() + 60
        while time.time() < deadline and (
                not path.exists() or path.stat().st_mtime_ns == before):
            time.sleep(0.01)
        time.sleep(delay)
        p.kill()
        p.wait()
        obj = load_file(path)  # old or new, never half-written
        assert torch.equal(obj["w"], torch.full((3_000_000,), float(obj["i"])))
        left_tmp += len(remove_stale_tmp(tmp_path))  # a kill mid-save leaves only a temp file
        if left_tmp >= 2:
            break
    assert left_tmp >= 1, "no kill landed inside a save"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_failed_save_keeps_old_file_and_usual_mode(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_atomic({"step": 1}, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_atomic({"step": 2}, path)
    assert load_file(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]
    # a training checkpoint loads with weights_only=True (plain containers only)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 2, "loss/total": 1.0}, {"step": 4, "val/seg_miou": 0.1},
            {"step": 5, "loss/total": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # cut by a kill
    truncate_metrics(path, 4)
    assert [json.loads(ln) for ln in path.read_text().splitlines()] == rows[:2]
