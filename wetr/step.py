"""One training step (SPEC 4-6), used by the engine, the benchmark and the tests.

    lr schedule -> forward (+ its own CAMs) -> multi-scale CAMs (no grad) -> refined pseudo labels
    (PAR) and token-grid labels -> cls, cls_aux, class-token, CLE, UNE, PTC, seg and dense-energy
    losses on the iteration schedule of the config -> finite check (all ranks) -> backward -> AdamW

`train_step` runs it; `compute_losses` is the loss part. Both take `span`, a function of a stage
name returning a context manager entered around that stage (STAGES; the default does nothing),
through which tools/benchmark.py times the stages.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from utils import dist as dist_utils

from . import losses as L
from .cam import cam_to_label, denormalise, denormalise_255, multi_scale_cam, refine_label
from .factory import model_from_config
from .model import MoRe
from .optim import build_optimizer, set_lr
from .par import PAR

LOSS_TERMS = ("cls", "cls_aux", "tokens", "cle", "une", "ptc", "seg", "reg")
# The span of each loss term (cls and cls_aux share one).
LOSS_SPANS = {"cls": "loss cls + cls_aux", "cls_aux": "loss cls + cls_aux", "tokens": "loss tokens",
              "cle": "loss CLE", "une": "loss UNE", "ptc": "loss PTC", "seg": "loss seg",
              "reg": "loss reg (dense energy)"}
# Every span, in step order; "compute_losses" holds those from "forward" to the losses.
STAGES = ("optimizer", "compute_losses", "forward", "multi-scale CAM", "refined labels (PAR)",
          "token labels", *dict.fromkeys(LOSS_SPANS.values()), "finite check (1 sync)", "backward")

Span = Callable[[str], AbstractContextManager]


def no_span(name: str) -> AbstractContextManager:
    return nullcontext()


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
                   amp_dtype: torch.dtype | None = None, num_present: int | None = None,
                   span: Span = no_span) -> tuple[torch.Tensor, dict]:
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
    with span("forward"), autocast():
        out = model(images, with_gcr=cfg.model.with_gcr, with_cams=reuse)
    cam, aux_cam, refined = _pseudo_labels(cam_model, par, images, cls_label, out.cams,
                                           on["seg"] or on["reg"], cfg, autocast, num_present, span)
    patch_map = out.patch_map.float()
    tokens = out.class_tokens.float()
    with span("token labels"), torch.no_grad():
        labels = token_labels(cam, aux_cam, cls_label, patch_map.shape[-2:], cfg)
    late = step > cfg.cam.cam2mask
    mask_cle = labels["fin"] if late else labels["cle"]
    mask_une = labels["fin"] if late else labels["aux"]

    zero = patch_map.new_zeros(())
    terms = dict.fromkeys(LOSS_TERMS, zero)
    with span(LOSS_SPANS["cls"]):
        terms["cls"] = F.multilabel_soft_margin_loss(out.cls_logits.float(), cls_label)
        terms["cls_aux"] = F.multilabel_soft_margin_loss(out.aux_logits.float(), cls_label)
    with span(LOSS_SPANS["tokens"]):
        terms["tokens"] = L.class_token_loss(tokens, cls_label)
    if on["cle"]:
        with span(LOSS_SPANS["cle"]):
            terms["cle"] = L.cle_loss(tokens, patch_map, mask_cle, cls_label, cfg.loss.cle_temp)
    if on["une"]:
        u = cfg.une
        with span(LOSS_SPANS["une"]):
            terms["une"] = L.une_loss(tokens, patch_map, mask_une, cls_label,
                                      num_tokens=u.num_tokens, window=u.window, border=u.border,
                                      thresh=u.thresh, true_position=u.true_position)
    if on["ptc"]:
        with span(LOSS_SPANS["ptc"]):
            terms["ptc"] = L.ptc_loss(patch_map, labels["aux"])
    seg_logits = out.seg_logits.float()
    if refined is not None:
        segs = F.interpolate(seg_logits, size=refined.shape[-2:], mode="bilinear",
                             align_corners=False)
        if on["seg"]:
            with span(LOSS_SPANS["seg"]):
                terms["seg"] = L.seg_loss(segs, refined)
        if on["reg"]:
            r = cfg.reg
            with span(LOSS_SPANS["reg"]):
                terms["reg"] = L.dense_energy_loss(
                    denormalise_255(images), segs, refined, weight=r.weight, sigma_rgb=r.sigma_rgb,
                    sigma_xy=r.sigma_xy, scale=r.scale, filter=r.filter, exact_scale=r.exact_scale)
    w = cfg.loss.weights
    total = sum(w[k] * terms[k] for k in LOSS_TERMS if on[k])
    # The reference always adds 0 * seg_loss, so the decoder gets zero gradients (and AdamW's
    # weight decay) before segmentation starts; keep that, and keep DDP's graph complete.
    total = total + 0.0 * seg_logits.sum()
    return total, terms


@torch.no_grad()
def _pseudo_labels(cam_model: MoRe, par: PAR, images: torch.Tensor, cls_label: torch.Tensor,
                   first, refine: bool, cfg: DictConfig, autocast, num_present: int | None,
                   span: Span) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> cam, aux_cam (B,K,H,W) float, multi-scale + flip (SPEC 4), and, when `refine`, the
    PAR-refined pseudo label (B,H,W) (else None). first: the forward's own (cam, aux_cam)."""
    with span("multi-scale CAM"), autocast():
        # first is None without reuse; DDP with find_unused_parameters or static_graph would
        # also rebuild the forward's output without it: then the scale-1.0 pass simply runs again.
        cam, aux_cam = multi_scale_cam(cam_model, images, cfg.cam.scales, first=first)
    cam, aux_cam = cam.float(), aux_cam.float()
    valid_cam = cam * cls_label[:, :, None, None]
    refined = None
    if refine:
        with span("refined labels (PAR)"):
            refined = refine_label(par, denormalise(images), valid_cam, cls_label,
                                   high=cfg.cam.high, low=cfg.cam.low, num_present=num_present)
    return cam, aux_cam, refined


# ----------------------------------------------------------------------------- the whole step
@dataclass
class Training:
    """What the step works on, as `build_training` makes it.

    model: the bare MoRe (checkpoints, validation); train_model: the module the forward runs
    through (model itself, or wrapped in DDP / torch.compile by the caller); cam_model: what the
    no-grad CAM passes call (model itself unless a caller wraps it, e.g. to time it).
    """
    model: MoRe
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    par: PAR
    amp_dtype: torch.dtype | None
    train_model: torch.nn.Module | None = None
    cam_model: Callable | None = None

    def __post_init__(self):
        self.train_model = self.model if self.train_model is None else self.train_model
        self.cam_model = self.model if self.cam_model is None else self.cam_model


def build_par(cfg: DictConfig) -> PAR:
    """The pseudo-label refinement of the config (`par.num_iter`, `par.dilations`, `par.sparse`;
    SPEC 4)."""
    return PAR(num_iter=cfg.par.num_iter, dilations=tuple(cfg.par.dilations), sparse=cfg.par.sparse)


def build_training(cfg: DictConfig, device: torch.device) -> Training:
    """Model, optimizer, GradScaler, PAR and autocast dtype of the config, on `device`."""
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
    return Training(model, optimizer, scaler, build_par(cfg).to(device), amp_dtype)


LossHook = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


def train_step(t: Training, images: torch.Tensor, cls_label: torch.Tensor, step: int,
               cfg: DictConfig, num_present: int | None = None, span: Span = no_span,
               on_losses: LossHook | None = None) -> tuple[float, torch.Tensor, list[bool]]:
    """One optimisation step on a batch already on the device (images (B,3,H,W), cls_label (B,K)).

    Returns (backbone lr, values, nonfinite): values (1 + len(LOSS_TERMS),) is the detached
    total then each term; nonfinite says, for each of them, whether it was NaN/inf on any rank
    (one host sync). When any is, the update is skipped on every rank alike. on_losses(total,
    terms) -> (total, terms): a test hook that may change the losses before the check.
    """
    with span("optimizer"):
        lr = set_lr(t.optimizer, step, cfg)
    with span("compute_losses"):
        total, terms = compute_losses(t.train_model, t.cam_model, t.par, images, cls_label, step,
                                      cfg, t.amp_dtype, num_present, span)
    if on_losses is not None:
        total, terms = on_losses(total, terms)
    with span("finite check (1 sync)"):
        values = torch.stack([total.detach()] + [terms[k].detach().float() for k in LOSS_TERMS])
        # Every rank learns which terms were non-finite anywhere, so all skip or stop together.
        nonfinite = dist_utils.all_reduce_max((~torch.isfinite(values)).float()).tolist()
    if not any(nonfinite):
        with span("backward"):
            t.optimizer.zero_grad(set_to_none=True)
            t.scaler.scale(total).backward()
        with span("optimizer"):
            t.scaler.step(t.optimizer)
            t.scaler.update()
    return lr, values, [bool(b) for b in nonfinite]
