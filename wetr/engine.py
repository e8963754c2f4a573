"""The one training engine shared by VOC and COCO (SPEC 4-7).

Entry points are thin: `scripts/train_voc.py` and `scripts/train_coco.py` hold a config dict and
call `main(CONFIG)`. Launch through torchrun (see run_train.sh):

    torchrun --nproc_per_node=2 --master_port=29500 -m scripts.train_voc data.root=... max_iters=200

One step: multi-scale CAMs (no grad) -> refined pseudo labels (PAR) and token-grid labels ->
forward -> cls, cls_aux, class-token, CLE, UNE, PTC, seg and dense-energy losses with the
iteration schedule of the config -> AdamW with poly warm-up.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from datasets import build_dataset, seed_worker
from datasets.layout import LayoutError, check_layout
from datasets.sampler import CheckedDataset, ResumableSampler, SampleError, SeededDataset
from utils import dist as dist_utils
from utils.checkpoint import (CheckpointError, check_state_shapes, load_file, model_state,
                              remove_stale_tmp, rng_state, save_atomic, set_rng_state)
from utils.config import ConfigError, TrainConfig, parse_cli, to_container
from utils.dist import DeviceError, DistInfo
from utils.logger import JsonlWriter, format_eta, get_logger, git_revision, setup_logger

from . import losses as L
from .cam import cam_to_label, denormalise, denormalise_255, multi_scale_cam, refine_label
from .model import MoRe, build_model, load_weights
from .optim import build_optimizer, set_lr
from .par import PAR
from .validate import build_val_loader, validate

LOSS_TERMS = ("cls", "cls_aux", "tokens", "cle", "une", "ptc", "seg", "reg")


class RunError(RuntimeError):
    """A run that must not start (existing log folder, bad resume target); one-line message.
    `all_ranks`: every rank raised it, so only rank 0 prints it."""

    def __init__(self, message: str, all_ranks: bool = False):
        super().__init__(message)
        self.all_ranks = all_ranks


class NonFiniteLossError(RunError):
    """A loss term became NaN/inf (nan_policy=stop)."""


# ----------------------------------------------------------------------------- model & data
def model_from_config(cfg: DictConfig, pretrained=None) -> MoRe:
    m = cfg.model
    return build_model(num_classes=cfg.data.num_classes, backbone=m.backbone,
                       pretrained=m.pretrained if pretrained is None else pretrained,
                       embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                       patch_size=m.patch_size, decoder_dim=m.decoder_dim,
                       decoder_dilation=m.decoder_dilation, aux_layer=m.aux_layer,
                       drop_path_rate=m.drop_path_rate)


def model_meta(model: MoRe, cfg: DictConfig) -> dict:
    enc = model.encoder
    return {"num_classes": int(cfg.data.num_classes), "embed_dim": int(model.embed_dim),
            "depth": len(enc.blocks), "num_heads": int(enc.blocks[0].attn.num_heads),
            "patch_size": int(enc.patch_size), "decoder_dim": int(model.decoder.conv6.out_channels),
            "decoder_dilation": int(model.decoder.conv6.dilation[0]),
            "backbone": str(cfg.model.backbone)}


def build_train_loader(cfg: DictConfig, dist: DistInfo, start_step: int) -> DataLoader:
    dataset = build_dataset(cfg.data, cfg.data.train_split, "train")
    sampler = ResumableSampler(len(dataset), cfg.batch_size, dist.rank, dist.world_size,
                               seed=cfg.seed, start_step=start_step)
    d = cfg.data
    workers = d.num_workers
    # The loader's own generator (worker base seeds) keeps it off the global torch stream, which
    # a resumed run restores just before creating the loader's iterator.
    return DataLoader(
        SeededDataset(dataset, cfg.seed), batch_size=cfg.batch_size, sampler=sampler,
        num_workers=workers, pin_memory=d.pin_memory and dist.device.type == "cuda",
        drop_last=True, worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(cfg.seed + dist.rank),
        persistent_workers=d.persistent_workers and workers > 0,
        prefetch_factor=d.prefetch_factor if workers > 0 else None)


# ----------------------------------------------------------------------------- one step
def token_labels(cam: torch.Tensor, aux_cam: torch.Tensor, cls_label: torch.Tensor,
                 size: tuple[int, int], cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Token-grid labels (B,h,w) from CAMs (B,K,H,W): L_cle, L_aux (aux CAM) and L_fin (CAM)."""
    aux = F.interpolate(aux_cam, size=size, mode="bilinear", align_corners=False)
    fin = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    c = cfg.cam
    return {
        "cle": cam_to_label(aux, cls_label, high=c.cle_thresholds[0], low=c.cle_thresholds[1]),
        "aux": cam_to_label(aux, cls_label, high=c.aux_thresholds[0], low=c.aux_thresholds[1]),
        "fin": cam_to_label(fin, cls_label, high=c.fin_thresholds[0], low=c.fin_thresholds[1]),
    }


def active_terms(step: int, cfg: DictConfig) -> dict[str, bool]:
    """Which loss terms enter the total at `step` (from 0): a term with `after` a is on once step > a."""
    after = cfg.loss.after
    on = {k: True for k in ("cls", "cls_aux", "tokens")}
    for k in ("cle", "une", "ptc", "seg", "reg"):
        on[k] = step > after[k]
    return on


def compute_losses(model: torch.nn.Module, cam_model: MoRe, par: PAR, images: torch.Tensor,
                   cls_label: torch.Tensor, step: int, cfg: DictConfig,
                   amp_dtype: torch.dtype | None = None,
                   num_present: int | None = None) -> tuple[torch.Tensor, dict]:
    """Total loss and its (unweighted) terms for one batch.

    model: the trained module (maybe DDP-wrapped); cam_model: the bare module for the no-grad
    CAM passes. images: (B,3,H,W) normalised; cls_label: (B,K) 0/1. num_present: the largest
    number of classes in one image of the batch (known on the host from the loader), so PAR
    refines only those channels without a device sync.
    """
    on = active_terms(step, cfg)
    autocast = partial(torch.autocast, images.device.type, dtype=amp_dtype,
                       enabled=amp_dtype is not None)
    # The training forward runs first and hands over its own (detached) CAMs as the unflipped
    # half of the scale-1.0 CAM pass: the same weights and images, so the same maps, B images
    # fewer through the network (the no-grad CAM passes now run while the forward's activations
    # are held). Not with stochastic depth, whose training passes differ from each other.
    reuse = cfg.cam.reuse_forward and cfg.model.drop_path_rate == 0
    first = None
    with autocast():
        out = model(images, with_gcr=cfg.model.with_gcr, return_cams=reuse)
    if reuse:
        out, first = out
    with torch.no_grad(), autocast():
        cam, aux_cam = multi_scale_cam(cam_model, images, cfg.cam.scales, first=first)
    cam, aux_cam = cam.float(), aux_cam.float()
    with torch.no_grad():
        valid_cam = cam * cls_label[:, :, None, None]
        refined = None
        if on["seg"] or on["reg"]:
            refined = refine_label(par, denormalise(images), valid_cam, cls_label,
                                   high=cfg.cam.high, low=cfg.cam.low,
                                   num_present=num_present)

    patch_map = out.patch_map.float()
    tokens = out.class_tokens.float()
    with torch.no_grad():
        labels = token_labels(cam, aux_cam, cls_label, patch_map.shape[-2:], cfg)
    late = step > cfg.cam.cam2mask
    mask_cle = labels["fin"] if late else labels["cle"]
    mask_une = labels["fin"] if late else labels["aux"]

    zero = patch_map.new_zeros(())
    terms = {
        "cls": F.multilabel_soft_margin_loss(out.cls_logits.float(), cls_label),
        "cls_aux": F.multilabel_soft_margin_loss(out.aux_logits.float(), cls_label),
        "tokens": L.class_token_loss(tokens, cls_label),
        "cle": L.cle_loss(tokens, patch_map, mask_cle, cls_label, cfg.loss.cle_temp)
        if on["cle"] else zero,
        "une": L.une_loss(tokens, patch_map, mask_une, cls_label, num_tokens=cfg.une.num_tokens,
                          window=cfg.une.window, border=cfg.une.border, thresh=cfg.une.thresh,
                          true_position=cfg.une.true_position) if on["une"] else zero,
        "ptc": L.ptc_loss(patch_map, labels["aux"]) if on["ptc"] else zero,
        "seg": zero,
        "reg": zero,
    }
    seg_logits = out.seg_logits.float()
    if refined is not None:
        segs = F.interpolate(seg_logits, size=refined.shape[-2:], mode="bilinear",
                             align_corners=False)
        if on["seg"]:
            terms["seg"] = L.seg_loss(segs, refined)
        if on["reg"]:
            r = cfg.reg
            terms["reg"] = L.dense_energy_loss(denormalise_255(images), segs, refined, weight=r.weight,
                                               sigma_rgb=r.sigma_rgb, sigma_xy=r.sigma_xy,
                                               scale=r.scale, filter=r.filter,
                                               exact_scale=r.exact_scale)
    w = cfg.loss.weights
    total = sum(w[k] * terms[k] for k in LOSS_TERMS if on[k])
    # The reference always adds 0 * seg_loss, so the decoder gets zero gradients (and AdamW's
    # weight decay) before segmentation starts; keep that, and keep DDP's graph complete.
    total = total + 0.0 * seg_logits.sum()
    return total, terms


# ----------------------------------------------------------------------------- run folder
def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.work_dir) / cfg.tag


def find_resume(cfg: DictConfig) -> Path | None:
    """Checkpoint to resume from, or None for a fresh start (resume=auto with no last.pth yet)."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        last = run_dir(cfg) / "checkpoints" / "last.pth"
        return last if last.is_file() else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise RunError(f"resume checkpoint not found: {path}")
    return path


def check_run_dir(cfg: DictConfig) -> None:
    """Refuse to start over an existing run unless resume= or overwrite=true."""
    d = run_dir(cfg)
    used = d.is_dir() and any((d / n).exists() for n in ("train.log", "checkpoints", "metrics.jsonl"))
    if used and not cfg.resume and not cfg.overwrite:
        raise RunError(f"log folder {d} already holds a run; pass resume=auto to continue it, "
                       f"overwrite=true to replace it, or another tag")


def check_checkpoint_matches(ckpt: dict, cfg: DictConfig, path: Path) -> None:
    """The resume checkpoint must be a training checkpoint of the configured K and encoder."""
    if "optimizer" not in ckpt or "step" not in ckpt:
        raise CheckpointError(f"{path} holds weights only; resume needs a training checkpoint "
                              f"(<work_dir>/<tag>/checkpoints/last.pth)")
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = model_from_config(cfg, pretrained=False)
    meta, want = ckpt.get("meta", {}), model_meta(model, cfg)
    for key in ("num_classes", "backbone", "embed_dim", "depth", "num_heads", "patch_size",
                "decoder_dim", "decoder_dilation"):
        if key in meta and meta[key] != want[key]:
            raise CheckpointError(f"checkpoint {path} was trained with {key}={meta[key]} but the "
                                  f"config gives {key}={want[key]}; resume with the run's own config "
                                  f"(see its config.yaml) or start a new tag")
    check_state_shapes(model_state(ckpt), model.state_dict(), path)


def preflight(cfg: DictConfig) -> None:
    """Every check that needs no process group: run folder, model shape, dataset layout, resume
    checkpoint."""
    check_run_dir(cfg)
    with torch.device("meta"):  # builds no weights: only the configuration is checked
        model_from_config(cfg, pretrained=False)
    if cfg.data.check_layout:
        try:
            check_layout(cfg.data, [cfg.data.train_split, cfg.data.val_split])
        except OSError as exc:  # e.g. an image header PIL cannot read (not always naming it)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LayoutError(f"{first} (while checking the dataset in {cfg.data.root})") from None
    path = find_resume(cfg)
    if path is not None:
        check_checkpoint_matches(load_file(path), cfg, path)


# ----------------------------------------------------------------------------- training
def build_training(cfg: DictConfig, device: torch.device):
    """Model, optimizer, GradScaler, PAR and autocast dtype, as the training loop uses them
    (also used by tools/benchmark.py, so the benchmark times exactly this set-up)."""
    model = model_from_config(cfg).to(device)
    # Reference weights that never receive gradients (ViT head, GCR's _fc1) are frozen so DDP
    # needs no unused-parameter search; AdamW skipped them anyway (grad None).
    model.encoder.head.requires_grad_(False)
    model.graph_layer._fc1.requires_grad_(False)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.param_groups(), cfg)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    return model, optimizer, scaler, build_par(cfg).to(device), amp_dtype


def build_par(cfg: DictConfig) -> PAR:
    """The pseudo-label refinement of the config (`par.num_iter`, `par.dilations`; SPEC 4)."""
    return PAR(num_iter=cfg.par.num_iter, dilations=tuple(cfg.par.dilations))


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; `deterministic` also asks for deterministic kernels (cuDNN
    autotuning off, deterministic algorithms where PyTorch has them; see docs/TROUBLESHOOTING.md)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def save_checkpoint(path: Path, model: MoRe, optimizer, scaler, step: int, cfg: DictConfig,
                    extra: dict, ranks: dict | None) -> None:
    """Weights-only (optimizer None: iter_N.pth, best.pth) or training checkpoint (last.pth).

    ranks: {"rng": per-rank RNG states, "sums": per-rank loss sums, "count": steps in the sums}.
    """
    obj = {"model": model.state_dict(), "step": step, "config": to_container(cfg),
           "meta": {**model_meta(model, cfg), **extra}}
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
        obj["scaler"] = scaler.state_dict() if scaler is not None else {}
        obj["rng"] = ranks["rng"]
        obj["log"] = {"count": ranks["count"], "sums": ranks["sums"]}
    save_atomic(obj, path)


def gather_rank_state(dist: DistInfo, loss_sum: torch.Tensor, loss_count: int) -> dict:
    """RNG states and loss sums of every rank, gathered on all ranks (saved by rank 0)."""
    state = (rng_state(dist.device), loss_sum.cpu())
    out = [state]
    if dist.distributed:
        out = [None] * dist.world_size
        torch.distributed.all_gather_object(out, state)
    return {"rng": [o[0] for o in out], "sums": [o[1] for o in out], "count": loss_count}


def log_scores(logger, result: dict, step: int) -> None:
    line = " ".join(f"{k}={result[k]['miou'] * 100:.2f}" for k in ("cam", "lam", "fused", "seg"))
    logger.info(f"val step {step}: mIoU {line} | cls F1 {result['f1'] * 100:.2f} "
                f"({result['images']} images)")


def should_eval(step: int, cfg: DictConfig) -> bool:
    if step % cfg.eval_every == 0:
        return True
    return cfg.eval_late_from >= 0 and step >= cfg.eval_late_from and step % cfg.eval_every_late == 0


def injected_nan(step: int, rank: int) -> str | None:
    """Test hook: MORE_INJECT_NAN=TERM:STEP[:RANK] (rank 0 if left out) makes loss term TERM
    non-finite at STEP on RANK. Returns the term to poison now, or None."""
    spec = os.environ.get("MORE_INJECT_NAN", "")
    if not spec:
        return None
    term, at, *who = spec.split(":")
    if term not in LOSS_TERMS:
        raise RunError(f"MORE_INJECT_NAN: unknown loss term {term!r}; one of {', '.join(LOSS_TERMS)}")
    return term if int(at) == step and int(who[0] if who else 0) == rank else None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step` (by the run being resumed), so metrics.jsonl holds each
    step once."""
    if not path.is_file():
        return

    def kept(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:  # a line cut short by the kill
            return False
    keep = [ln if ln.endswith("\n") else ln + "\n"
            for ln in path.read_text().splitlines(keepends=True) if ln.strip() and kept(ln)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def log_error(log_file: Path, message: str, rank: int | None) -> None:
    """Record why the run stopped in train.log (the console gets the line once, from `main`).
    Any rank may call it: one short O_APPEND write does not interleave with rank 0's lines."""
    who = "" if rank is None else f"[rank {rank}] "
    with open(log_file, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {who}error: {message}\n")


def train(cfg: DictConfig) -> dict:
    """Run training; returns the last validation result (rank 0 and others alike)."""
    dist = dist_utils.init_distributed(cfg.device)
    # Rank 0 runs the checks; everyone fails together, and only rank 0 prints the line.
    err = None
    if dist.is_main:
        try:
            preflight(cfg)
        except USER_ERRORS as exc:
            err = str(exc)
    err = dist_utils.broadcast_object(err)
    if err is not None:
        raise RunError(err, all_ranks=True)

    out_dir = run_dir(cfg)
    ckpt_dir = out_dir / "checkpoints"
    resume_path = find_resume(cfg)
    if dist.is_main:
        if cfg.overwrite and not cfg.resume and out_dir.exists():
            shutil.rmtree(out_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(ckpt_dir)
    dist_utils.barrier()
    logger = setup_logger(out_dir / "train.log", dist.is_main)
    try:
        return _train(cfg, dist, logger, resume_path)
    except USER_ERRORS as exc:
        if dist.is_main or not getattr(exc, "all_ranks", False):
            log_error(out_dir / "train.log", str(exc), None if dist.is_main else dist.rank)
        raise


def _train(cfg: DictConfig, dist: DistInfo, logger, resume_path: Path | None) -> dict:
    out_dir = run_dir(cfg)
    ckpt_dir = out_dir / "checkpoints"
    metrics = JsonlWriter(out_dir / "metrics.jsonl" if dist.is_main else None)
    if dist.is_main:
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        logger.info(f"MoRe-py {git_revision()} | torch {torch.__version__} | device "
                    f"{dist.device} x {dist.world_size} | "
                    f"{torch.cuda.get_device_name(dist.device) if dist.device.type == 'cuda' else 'cpu'}")
        logger.info("config:\n" + OmegaConf.to_yaml(cfg))

    seed_everything(cfg.seed + dist.rank, cfg.deterministic)
    model, optimizer, scaler, par, amp_dtype = build_training(cfg, dist.device)

    start_step, best = 0, -1.0
    loss_sum = torch.zeros(len(LOSS_TERMS) + 1, device=dist.device)
    loss_count = 0
    if resume_path is not None:
        ckpt = load_file(resume_path)
        load_weights(model, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_step = int(ckpt["step"])
        best = float(ckpt.get("meta", {}).get("best_miou", -1.0))
        rngs, log = ckpt.get("rng") or [], ckpt.get("log") or {}
        if len(rngs) == dist.world_size:
            # Last thing before the loop that may draw random numbers: the data loader below
            # has its own generator, so the restored streams continue exactly.
            set_rng_state(rngs[dist.rank], dist.device)
            if len(log.get("sums", [])) == dist.world_size:
                loss_sum.copy_(log["sums"][dist.rank])
                loss_count = int(log["count"])
        elif dist.is_main:
            logger.warning(f"resuming on {dist.world_size} processes from a run on {len(rngs)}: "
                           f"data order and random streams differ from an uninterrupted run")
        logger.info(f"resumed from {resume_path} at step {start_step}")
    if dist.is_main:
        truncate_metrics(out_dir / "metrics.jsonl", start_step)

    train_model: torch.nn.Module = model
    if dist.distributed:
        # oneDNN returns 1x1-conv weight grads in a channels-last layout; DDP copies them into
        # its buckets correctly but warns once per run. Harmless, so keep the log readable.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        train_model = DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    train_loader = build_train_loader(cfg, dist, start_step)
    val_set = CheckedDataset(build_dataset(cfg.data, cfg.data.val_split, "val"))
    val_loader = build_val_loader(val_set, dist, cfg.data.num_workers, cfg.val.max_images)
    if dist.is_main:
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        logger.info(f"model {n_params:.1f}M params | train {len(train_loader.dataset)} images, "
                    f"{train_loader.sampler.steps_per_epoch} steps/epoch | val {len(val_set)} images")

    progress = None
    if dist.is_main and sys.stderr.isatty():
        from tqdm import tqdm
        progress = tqdm(total=cfg.max_iters, initial=start_step, desc=cfg.tag, dynamic_ncols=True)

    def last_good() -> str:
        last = ckpt_dir / "last.pth"
        return f"{last} (step {int(load_file(last)['step'])})" if last.is_file() else "none"

    fault_marker = out_dir / ".fault_injected"
    last_result: dict = {}
    t0, step0 = time.time(), start_step
    model.train()
    data_iter = iter(train_loader)
    step = start_step
    while step < cfg.max_iters:
        try:
            _, images, cls_label = next(data_iter)
        except SampleError as exc:
            raise SampleError(f"{exc}; stopped at step {step}, last checkpoint: {last_good()}; "
                              f"replace the file or remove it from the split list, then "
                              f"resume=auto") from None
        if step == cfg.fault_step and dist.rank == dist.world_size - 1 and not fault_marker.exists():
            # Elastic-restart test: one worker dies hard (no cleanup, like a pre-empted node);
            # the marker makes it happen once, so the restarted run gets past this step.
            fault_marker.touch()
            logger.warning(f"fault_step={step}: rank {dist.rank} kills itself")
            os.kill(os.getpid(), signal.SIGKILL)
        num_present = int(cls_label.sum(1).max())  # CPU tensor from the loader: no device sync
        images = images.to(dist.device, non_blocking=True)
        cls_label = cls_label.to(dist.device, non_blocking=True).float()
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        lr = set_lr(optimizer, step, cfg)
        total, terms = compute_losses(train_model, model, par, images, cls_label, step, cfg,
                                      amp_dtype, num_present)
        poison = injected_nan(step, dist.rank)
        if poison is not None:
            terms[poison] = terms[poison] * float("nan")
            total = total + terms[poison]
        values = torch.stack([total.detach()] + [terms[k].detach().float() for k in LOSS_TERMS])
        # One host sync per step (the price of never training on NaN): every rank learns which
        # terms were non-finite anywhere, so all ranks skip or stop together.
        bad = dist_utils.all_reduce_max((~torch.isfinite(values)).float()).tolist()
        skip = any(bad)
        if skip:
            names = [k for k, b in zip(("total",) + LOSS_TERMS, bad) if b]
            names = ", ".join(n for n in names if n != "total" or len(names) == 1)
            if cfg.nan_policy == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss ({names}) at step {step}; last good checkpoint: "
                    f"{last_good()}; lower optim.lr or check the data, then resume=auto (or "
                    f"nan_policy=skip)", all_ranks=True)
            if dist.is_main:
                logger.warning(f"step {step}: non-finite loss ({names}); step skipped on all "
                               f"{dist.world_size} process(es) (nan_policy=skip)")
        else:
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += values
            loss_count += 1
        step += 1
        if progress is not None:
            progress.update(1)

        if step % cfg.log_every == 0 or step == cfg.max_iters:
            avg = dist_utils.all_reduce_sum(loss_sum.clone()) / (max(loss_count, 1) * dist.world_size)
            avg = dict(zip(("total",) + LOSS_TERMS, avg.tolist()))
            loss_sum.zero_()
            loss_count = 0
            elapsed = time.time() - t0
            eta = elapsed / max(step - step0, 1) * (cfg.max_iters - step)
            if dist.is_main:
                msg = " ".join(f"{k} {v:.4f}" for k, v in avg.items())
                logger.info(f"step {step}/{cfg.max_iters} lr {lr:.3e} | {msg} | "
                            f"elapsed {format_eta(elapsed)} eta {format_eta(eta)}")
                metrics.write(step=step, lr=lr, **{f"loss/{k}": v for k, v in avg.items()})
                if progress is not None:
                    progress.set_postfix(loss=f"{avg['total']:.3f}")

        evaluate = should_eval(step, cfg) or step == cfg.max_iters
        save = step % cfg.save_every == 0 or step == cfg.max_iters or evaluate
        extra = {"best_miou": best}
        if evaluate:
            last_result = validate(model, val_loader, cfg, dist, progress=progress is not None)
            if dist.is_main:
                log_scores(logger, last_result, step)
                metrics.write(step=step, **{f"val/{k}_miou": last_result[k]["miou"]
                                            for k in ("cam", "lam", "fused", "seg")},
                              **{"val/f1": last_result["f1"]})
            miou = last_result["seg"]["miou"]
            if miou > best:
                best = miou
                extra["best_miou"] = best
                if dist.is_main:
                    save_checkpoint(ckpt_dir / "best.pth", model, None, None, step, cfg,
                                    {**extra, "val": last_result}, None)
        if save:
            ranks = gather_rank_state(dist, loss_sum, loss_count)
            if dist.is_main:
                save_checkpoint(ckpt_dir / "last.pth", model, optimizer, scaler, step, cfg, extra,
                                ranks)
                if step % cfg.save_every == 0:
                    save_checkpoint(ckpt_dir / f"iter_{step}.pth", model, None, None, step, cfg,
                                    extra, None)
            dist_utils.barrier()
    if progress is not None:
        progress.close()
    if dist.is_main:
        logger.info(f"done: {cfg.max_iters} steps in {format_eta(time.time() - t0)}; "
                    f"checkpoints in {ckpt_dir}")
    dist_utils.barrier()
    return last_result


USER_ERRORS = (ConfigError, RunError, LayoutError, CheckpointError, DeviceError,
               NonFiniteLossError, SampleError, FileNotFoundError)
EXIT_USER_ERROR = 2  # the process printed one line saying what is wrong (see utils.dist.launch)
EXIT_PEER_FAILED = 3  # a collective failed because another rank died first


def main(overrides: dict, argv: list[str] | None = None) -> None:
    """Entry point of the training scripts: defaults <- overrides <- `key=value` arguments.

    With MORE_PREFLIGHT=1 only the checks run (used by run_train.sh before torchrun starts, so a
    bad input is one line instead of one traceback per process). A bad input exits with code 2
    after one `error: ...` line on stderr (printed once, by rank 0, when every rank hit it).
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_cli(argv, TrainConfig, overrides)
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0 and not cfg.resume:
            cfg.resume = "auto"  # a worker restarted by torchrun continues its run
        if os.environ.get("MORE_PREFLIGHT") == "1":
            preflight(cfg)
            return
        train(cfg)
    except (*USER_ERRORS, ValueError) as exc:
        lines = str(exc).strip().splitlines()
        if not isinstance(exc, USER_ERRORS) and len(lines) != 1:
            raise  # not a one-line input error: a bug, keep the traceback
        if int(os.environ.get("RANK", 0)) == 0 or not getattr(exc, "all_ranks", False):
            print(f"error: {lines[0] if lines else type(exc).__name__}", file=sys.stderr)
        dist_utils.cleanup()
        sys.exit(EXIT_USER_ERROR)
    except RuntimeError as exc:
        if not dist_utils.peer_failed(exc):
            raise
        # Another rank stopped (its own message says why; torchrun stops this one anyway):
        # exit quietly instead of adding a traceback per surviving rank.
        sys.exit(EXIT_PEER_FAILED)
    dist_utils.cleanup()
