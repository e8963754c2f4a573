"""The benchmark's names and its markdown report (logs/benchmarks/<name>.md)."""
from __future__ import annotations

import platform

import torch
from omegaconf import DictConfig

from wetr.step import LOSS_LABELS


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def default_name(cfg: DictConfig, device: torch.device) -> str:
    m = cfg.model
    family = m.backbone.split(".")[0]   # the timm name without its weights tag
    if family.startswith("vit_") and family.endswith("_patch16_224"):
        family = family[len("vit_"):-len("_patch16_224")]   # the plain ViTs: tiny, small, base, large
    enc = f"d{m.embed_dim}x{m.depth}" if m.embed_dim else family
    if m.patch_size not in (None, 16):
        enc += f"p{m.patch_size}"
    if m.decoder_dim != 512:
        enc += f"dec{m.decoder_dim}"
    if m.decoder_dilation != 5:
        enc += f"dil{m.decoder_dilation}"
    parts = [device.type, enc, f"c{cfg.data.crop_size}", f"b{cfg.batch_size}", f"k{cfg.data.num_classes - 1}",
             "fp32" if cfg.amp == "none" else cfg.amp]
    if cfg.compile:
        parts.append("compile")
    if cfg.channels_last:
        parts.append("cl")
    return "_".join(str(p) for p in parts)


def _fmt_ms(sec: float | None) -> str:
    return "-" if sec is None else f"{sec * 1e3:.1f}"


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def markdown(res: dict) -> str:
    lines = [f"# Benchmark {res['name']}", "",
             f"{res['device']} | torch {res['torch']} | git {res['git']} | {res['time']} | "
             f"load avg before/after {res['load_before']} / {res['load_after']}", "",
             f"Config: {res['summary']}", ""]
    s = res.get("step")
    if s:
        st = s["stages_s"]
        lines += [f"## Training step (iteration {s['iteration']}, all loss terms on), median of "
                  f"{len(s['step_s_all'])} after {res['config']['bench']['warmup']} warm-up", "",
                  "| stage | ms | share |", "|---|---:|---:|"]
        order = ["multi-scale CAM", "network passes (CAM)", "refined labels (PAR)", "forward", "token labels",
                 *dict.fromkeys(LOSS_LABELS.values()), "other (compute_losses glue)",
                 "finite check (1 sync)", "backward", "optimizer"]
        for k in order:
            if k in st:
                indent = "&nbsp;&nbsp;of which " if k == "network passes (CAM)" else ""
                lines.append(f"| {indent}{k} | {_fmt_ms(st[k])} | {st[k] / s['step_s'] * 100:.1f} % |")
        lines.append(f"| **step** | **{_fmt_ms(s['step_s'])}** | 100 % |")
        lines += ["",
                  f"- steps (s): {', '.join(f'{v:.3f}' for v in s['step_s_all'])}"
                  + (f"; un-instrumented {s['step_s_unsynced']:.3f} s" if s["step_s_unsynced"] else ""),
                  f"- {s['images_per_s']:.2f} images/s; {s['params_M']:.1f} M parameters",
                  f"- outside encoder/decoder passes (CAM passes + forward + backward): "
                  f"**{s['outside_network_share'] * 100:.1f} %** of the step "
                  f"({s['outside_network_share_without_optimizer'] * 100:.1f} % without AdamW)",
                  f"- peak memory {_fmt_bytes(s['peak_memory_bytes'])} ({s['peak_memory_kind']}; "
                  f"{_fmt_bytes(s['memory_before_model_bytes'])} before the model was built)"]
        if s["flops_per_step"]:
            lines.append(f"- {s['flops_per_step'] / 1e12:.3f} TFLOP per step -> achieved "
                         f"{s['achieved_tflops']:.3f} TFLOP/s")
    inf = res.get("infer")
    if inf:
        lines += ["", f"## Inference ({inf['size']} px, {inf['images']} images)", "",
                  "| mode | scales | images/s |", "|---|---|---:|"]
        for k in ("seg_single_scale", "seg_multi_scale", "cam_single_scale", "cam_multi_scale"):
            v = inf[k]
            lines.append(f"| {k.replace('_', ' ')} | {v['scales']} | {v['images_per_s']:.2f} |")
    en = res.get("energy")
    if en:
        lines += ["", "## Dense energy filter AS (batch x K+1 channels; the loss filters at crop/2)", "",
                  "| grid | N | lattice ms | exact ms | naive N x N ms | naive / lattice | naive / exact "
                  "| extra peak MiB (lattice / exact / naive) | loss fwd+bwd ms (lattice / exact) |",
                  "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for rw in en:
            lat, ex, nv = rw["permutohedral"], rw["exact (fused attention)"], rw["naive N x N"]
            nv_ms = nv.get("ms", nv.get("ms_extrapolated"))
            star = "" if "ms" in nv else " (extrapolated, not run)"
            mib = " / ".join("-" if v.get("peak_extra_MiB") is None else f"{v['peak_extra_MiB']:.0f}"
                             for v in (lat, ex, nv))
            ratio = ("-", "-") if nv_ms is None else (f"{nv_ms / lat['ms']:.1f}x", f"{nv_ms / ex['ms']:.1f}x")
            naive_txt = "-" if nv_ms is None else f"{nv_ms:.1f}{star}"
            losses = f"{rw['loss fwd+bwd permutohedral ms']:.1f} / {rw['loss fwd+bwd exact ms']:.1f}"
            lines.append(f"| {rw['grid']} | {rw['N']} | {lat['ms']:.1f} | {ex['ms']:.1f} | {naive_txt} | "
                         f"{ratio[0]} | {ratio[1]} | {mib} | {losses} |")
        lines += ["", "Extra peak: growth of the peak memory during the call (CPU: process RSS; 0 = no "
                  "memory beyond what the process already held). Extrapolated naive times scale the "
                  "largest measured one by N^2.", ""]
        lines.append("lattice / exact sum(AS): " + ", ".join(
            f"{rw['grid']} {rw['lattice_over_exact_sum']:.3f}" for rw in en))
    return "\n".join(lines) + "\n"
