"""One training step (METHOD.md §4-6), used by the engine, the benchmark and the tests.

    lr schedule -> per micro-batch: forward (+ its own CAMs) -> multi-scale CAMs (no grad) ->
    refined pseudo labels (PAR) and token-grid labels -> cls, cls_aux, class-token, CLE, UNE, PTC,
    seg and dense-energy losses on the iteration schedule of the config -> finite check (all
    ranks) -> backward -> AdamW

`build_training` makes what the step works on (`Training`), `train_step` runs it on `Batch`es,
`compute_losses` is the loss part. Their stages are labelled ranges of torch.profiler
(`record_function`, STAGES): free when no profiler runs, they let tools/benchmark.py time each
stage.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function

from utils import dist as dist_utils
from utils.dist import DistInfo

from . import losses as L
from .cam import (cam_to_label, denormalise, denormalise_255, multi_scale_cam, refine_label,
                  resize_bilinear)
from .compile import compile_regions
from .factory import model_from_config
from .model import MoRe
from .optim import build_optimizer, set_lr
from .par import PAR

LOSS_TERMS = ("cls", "cls_aux", "tokens", "cle", "une", "ptc", "seg", "reg")
# The profiler label of each loss term (cls and cls_aux share one).
LOSS_LABELS = {"cls": "loss cls + cls_aux", "cls_aux": "loss cls + cls_aux", "tokens": "loss tokens",
               "cle": "loss CLE", "une": "loss UNE", "ptc": "loss PTC", "seg": "loss seg",
               "reg": "loss reg (dense energy)"}
# Every labelled range of the step, in step order; "compute_losses" holds those from "forward"
# to the losses.
STAGES = ("optimizer", "compute_losses", "forward", "multi-scale CAM", "refined labels (PAR)",
          "token labels", *dict.fromkeys(LOSS_LABELS.values()), "finite check (1 sync)", "backward")


def token_labels(cam: torch.Tensor, aux_cam: torch.Tensor, cls_label: torch.Tensor,
                 size: tuple[int, int], cfg: DictConfig) -> dict[str, torch.Tensor]:
    """Token-grid labels (B,h,w) from CAMs (B,K,H,W): L_cle, L_aux (aux CAM) and L_fin (CAM)."""
    aux = resize_bilinear(aux_cam, size)
    fin = resize_bilinear(cam, size)
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


# ----------------------------------------------------------------------------- what a step uses
@dataclass(frozen=True)
class Training:
    """What the step works on, as `build_training` makes it.

    model: the bare MoRe (checkpoints, validation, the no-grad CAM passes); train_model: the
    module the training forward and backward run through (model itself, or DDP around it).
    """
    model: MoRe
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None
    par: PAR
    amp_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class Batch:
    """One (micro-)batch on the device: images (B,3,H,W) normalised, cls_label (B,K) 0/1 float;
    num_present: the largest number of classes in one image, read on the host from the loader's
    labels, so PAR refines only those channels without a device sync (None: all K)."""
    images: torch.Tensor
    cls_label: torch.Tensor
    num_present: int | None = None


def to_device(images: torch.Tensor, cls_label: torch.Tensor, device: torch.device,
              channels_last: bool = False) -> Batch:
    """A loader batch (CPU tensors) -> Batch on `device`."""
    num_present = int(cls_label.sum(1).max())  # CPU tensor from the loader: no device sync
    images = images.to(device, non_blocking=True)
    cls_label = cls_label.to(device, non_blocking=True).float()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return Batch(images, cls_label, num_present)


def build_par(cfg: DictConfig) -> PAR:
    """The pseudo-label refinement of the config (`par.num_iter`, `par.dilations`, `par.sparse`;
    METHOD.md §4)."""
    return PAR(num_iter=cfg.par.num_iter, dilations=tuple(cfg.par.dilations), sparse=cfg.par.sparse)


def build_training(cfg: DictConfig, dist: DistInfo) -> Training:
    """Model, optimizer, GradScaler, PAR and autocast dtype of the config on `dist.device`; the
    model compiled in place with cfg.compile (`wetr.compile.compile_regions`, so the no-grad CAM
    passes, which call the bare model, run compiled too) and wrapped in DDP over several
    processes."""
    model = model_from_config(cfg).to(dist.device)
    # Reference weights that never receive gradients (ViT head, GCR's _fc1) are frozen so DDP
    # needs no unused-parameter search; AdamW skipped them anyway (grad None).
    model.encoder.head.requires_grad_(False)
    model.graph_layer._fc1.requires_grad_(False)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model.param_groups(), cfg)
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp == "fp16")
    par = build_par(cfg).to(dist.device)
    if cfg.compile:
        compile_regions(model)
    train_model = model
    if dist.distributed:
        # oneDNN returns 1x1-conv weight grads in a channels-last layout; DDP copies them into
        # its buckets correctly but warns once per run. Harmless, so keep the log readable.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        train_model = DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return Training(model, train_model, optimizer, scaler, par, amp_dtype)


# ----------------------------------------------------------------------------- the losses
def compute_losses(training: Training, batch: Batch, step: int, cfg: DictConfig
                   ) -> tuple[torch.Tensor, dict]:
    """Total loss and its (unweighted) terms for one batch: the forward through
    training.train_model, the no-grad CAM passes through training.model."""
    on = active_terms(step, cfg)
    images, cls_label = batch.images, batch.cls_label
    # The training forward runs first and hands over its own (detached) CAMs as the unflipped
    # half of the scale-1.0 CAM pass: the same weights and images, so the same maps, B images
    # fewer through the network (the no-grad CAM passes now run while the forward's activations
    # are held). Not with stochastic depth, whose training passes differ from each other.
    reuse = cfg.cam.reuse_forward and cfg.model.drop_path_rate == 0
    with record_function("forward"), _autocast(training, images):
        out = training.train_model(images, with_gcr=cfg.model.with_gcr, with_cams=reuse)
    cam, aux_cam, refined = _pseudo_labels(training, batch, out.cams, on["seg"] or on["reg"], cfg)
    patch_map = out.patch_map.float()
    tokens = out.class_tokens.float()
    with record_function("token labels"), torch.no_grad():
        labels = token_labels(cam, aux_cam, cls_label, patch_map.shape[-2:], cfg)
    late = step > cfg.cam.cam2mask
    mask_cle = labels["fin"] if late else labels["cle"]
    mask_une = labels["fin"] if late else labels["aux"]

    zero = patch_map.new_zeros(())
    terms = dict.fromkeys(LOSS_TERMS, zero)
    with record_function(LOSS_LABELS["cls"]):
        terms["cls"] = F.multilabel_soft_margin_loss(out.cls_logits.float(), cls_label)
        terms["cls_aux"] = F.multilabel_soft_margin_loss(out.aux_logits.float(), cls_label)
    with record_function(LOSS_LABELS["tokens"]):
        terms["tokens"] = L.class_token_loss(tokens, cls_label)
    if on["cle"]:
        with record_function(LOSS_LABELS["cle"]):
            terms["cle"] = L.cle_loss(tokens, patch_map, mask_cle, cls_label, cfg.loss.cle_temp)
    if on["une"]:
        with record_function(LOSS_LABELS["une"]):
            terms["une"] = L.une_loss(tokens, patch_map, mask_une, cls_label, cfg.une)
    if on["ptc"]:
        with record_function(LOSS_LABELS["ptc"]):
            terms["ptc"] = L.ptc_loss(patch_map, labels["aux"])
    seg_logits = out.seg_logits.float()
    if refined is not None:
        terms.update(_seg_terms(seg_logits, refined, images, on, cfg))
    w = cfg.loss.weights
    total = sum(w[k] * terms[k] for k in LOSS_TERMS if on[k])
    # The reference always adds 0 * seg_loss, so the decoder gets zero gradients (and AdamW's
    # weight decay) before segmentation starts; keep that, and keep DDP's graph complete.
    total = total + 0.0 * seg_logits.sum()
    return total, terms


def _autocast(training: Training, images: torch.Tensor):
    return torch.autocast(images.device.type, dtype=training.amp_dtype,
                          enabled=training.amp_dtype is not None)


def _seg_terms(seg_logits: torch.Tensor, refined: torch.Tensor, images: torch.Tensor, on: dict,
               cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The seg and reg terms that are on, from seg_logits (B,K+1,h,w) upsampled to the refined
    label (B,H,W)."""
    terms = {}
    segs = resize_bilinear(seg_logits, refined.shape[-2:])
    if on["seg"]:
        with record_function(LOSS_LABELS["seg"]):
            terms["seg"] = L.seg_loss(segs, refined)
    if on["reg"]:
        r = cfg.reg
        with record_function(LOSS_LABELS["reg"]):
            terms["reg"] = L.dense_energy_loss(
                denormalise_255(images), segs, refined, weight=r.weight, sigma_rgb=r.sigma_rgb,
                sigma_xy=r.sigma_xy, scale=r.scale, filter=r.filter, exact_scale=r.exact_scale)
    return terms


@torch.no_grad()
def _pseudo_labels(training: Training, batch: Batch, first, refine: bool, cfg: DictConfig
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> cam, aux_cam (B,K,H,W) float, multi-scale + flip (METHOD.md §4), and, when `refine`, the
    PAR-refined pseudo label (B,H,W) (else None). first: the forward's own (cam, aux_cam)."""
    images = batch.images
    with record_function("multi-scale CAM"), _autocast(training, images):
        # first is None without reuse; DDP with find_unused_parameters or static_graph would
        # also rebuild the forward's output without it: then the scale-1.0 pass simply runs again.
        cam, aux_cam = multi_scale_cam(training.model, images, cfg.cam.scales, first=first)
    cam, aux_cam = cam.float(), aux_cam.float()
    valid_cam = cam * batch.cls_label[:, :, None, None]
    refined = None
    if refine:
        with record_function("refined labels (PAR)"):
            refined = refine_label(training.par, denormalise(images), valid_cam, batch.cls_label,
                                   high=cfg.cam.high, low=cfg.cam.low,
                                   num_present=batch.num_present)
    return cam, aux_cam, refined


# ----------------------------------------------------------------------------- the whole step
def train_step(training: Training, batches: Sequence[Batch], step: int, cfg: DictConfig
               ) -> tuple[float, torch.Tensor, list[bool]]:
    """One optimizer step over the micro-batches of one global batch (one, unless the run
    accumulates gradients: `global_batch`).

    Each micro-batch's loss is divided by their number, so the summed gradient is their mean;
    DDP all-reduces once, in the last backward (the others run under `no_sync`). Returns
    (backbone lr, values, nonfinite): values (1 + len(LOSS_TERMS),) is the detached total then
    each term, averaged over the micro-batches; nonfinite says, for each, whether it was NaN/inf
    in any micro-batch on any rank (one host sync). When any is, the update is skipped on every
    rank alike.
    """
    n = len(batches)
    with record_function("optimizer"):
        lr = set_lr(training.optimizer, step, cfg)
        training.optimizer.zero_grad(set_to_none=True)
    values, bad = None, None
    for i, batch in enumerate(batches):
        last = i == n - 1
        with nullcontext() if last else _no_sync(training.train_model):
            with record_function("compute_losses"):
                total, terms = compute_losses(training, batch, step, cfg)
            v = torch.stack([total.detach()] + [terms[k].detach().float() for k in LOSS_TERMS])
            values, bad = (v, ~torch.isfinite(v)) if i == 0 else (values + v, bad | ~torch.isfinite(v))
            if last:
                with record_function("finite check (1 sync)"):
                    # Every rank learns which terms were non-finite anywhere: all skip or stop together.
                    nonfinite = dist_utils.all_reduce_max(bad.float()).tolist()
                if any(nonfinite):
                    break
            with record_function("backward"):
                training.scaler.scale(total / n).backward()
    if not any(nonfinite):
        with record_function("optimizer"):
            training.scaler.step(training.optimizer)
            training.scaler.update()
    return lr, values / n, [bool(b) for b in nonfinite]


def _no_sync(module: torch.nn.Module):
    """DDP's no_sync (gradients accumulate locally, no all-reduce); nothing for a bare module."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) else nullcontext()
