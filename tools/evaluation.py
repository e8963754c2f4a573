"""The evaluation loop shared by every tool (infer_cam / infer_lam / cam2seg / infer_seg_voc /
infer_seg_coco / export_pseudo_masks) and, without metrics, by tools/predict.py:

    items -> route (maps) -> CRF step -> metrics + writers

Data flows one way: the route returns an `Output`, the CRF step adds its label map, the sinks
(confusion matrices, files, progress bar) read it; no stage calls into the one before it.
Confusion matrices are all-reduced at the end, so N processes report exactly the numbers of
one. With resume=true the images a killed run completed (`EvalWriter.done`) are not run again:
their confusion comes back from their label PNGs.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from utils import dist as udist
from utils.config import to_container
from utils.metrics import confusion_matrix, format_table, scores
from utils.palette import read_label_png

from .config import ToolSpec
from .outputs import EvalWriter, write_json_atomic
from .routes import ROUTES, Item, Output
from .session import Context, open_context, with_log
from .submission import pack_voc_test

Sink = Callable[[Output], None]
WriterFactory = Callable[[Context, tuple[str, ...]], EvalWriter]   # (context, variants) -> writer


def run_images(ctx: Context, items: Iterable[Item], sinks: Sequence[Sink]) -> None:
    """The per-image loop: each item through the tool's route (`ROUTES`) and the context's CRF
    step into every sink."""
    route = ROUTES[ctx.spec.route or ctx.spec.variant]
    with torch.no_grad():
        for item in items:
            for out in ctx.crf.put(route(ctx.source.params, item)):
                for sink in sinks:
                    sink(out)
    for out in ctx.crf.drain():
        for sink in sinks:
            sink(out)


class Metrics:
    """Confusion matrices (C, C) int64 of the variants, this rank's images."""

    def __init__(self, variants: Sequence[str], num_classes: int):
        self.num_classes = num_classes
        self.conf = {v: torch.zeros(num_classes, num_classes, dtype=torch.int64) for v in variants}

    def count(self, labels: dict[str, np.ndarray], gt: np.ndarray) -> None:
        gt_t = torch.from_numpy(np.asarray(gt))
        for v in self.conf:
            self.conf[v] += confusion_matrix(torch.from_numpy(labels[v]), gt_t, self.num_classes)

    def add(self, out: Output) -> None:
        if out.gt is not None:
            self.count(out.labels, out.gt)

    def reduced(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {v: udist.all_reduce_sum(c.to(device)) for v, c in self.conf.items()}


def _resume(ctx: Context, writer: EvalWriter, metrics: Metrics) -> list[int]:
    """This rank's indices still to run; the completed ones are counted from their PNGs."""
    from datasets.voc import read_mask

    todo, done = [], 0
    ds = ctx.source.dataset
    for i in ctx.shard():
        name = ds.names[i]
        if not (ctx.cfg.resume and writer.done(name)):
            todo.append(i)
            continue
        done += 1
        mask = ds.mask_path(ds.root, name)
        if ctx.has_labels and os.path.isfile(mask):   # a tag dataset's image may have none
            labels = {v: read_label_png(writer.label_path(v, name)) for v in metrics.conf}
            metrics.count(labels, read_mask(mask))
    if ctx.cfg.resume:
        ctx.log.info(f"resume: {done} image(s) of this rank's {done + len(todo)} already done")
    return todo


def _progress(ctx: Context, total: int, done: int) -> tuple[Sink, Callable[[], None]]:
    """tqdm on rank 0 (finished images, ETA): (sink, close)."""
    if not ctx.dist.is_main:
        return (lambda out: None), (lambda: None)
    from tqdm import tqdm
    bar = tqdm(total=total, initial=done, desc=f"{ctx.spec.name} (rank 0)", dynamic_ncols=True)
    return (lambda out: bar.update(1)), bar.close


def _report(ctx: Context, metrics: Metrics, writer: EvalWriter) -> dict | None:
    """All-reduce, then on rank 0: the table, scores.json and (VOC test) the server archive."""
    table = metrics.reduced(ctx.dist.device) if ctx.has_labels else {}
    if not any(int(c.sum()) for c in table.values()):
        table = {}   # not one labelled pixel: a split without masks (a tag dataset's train)
    udist.barrier()
    if not ctx.dist.is_main:
        return None
    source = ctx.source
    result = {v: scores(c) for v, c in table.items()}
    if result:
        ctx.log.info(f"{ctx.spec.name} on {source.split}:\n"
                     + format_table(result, source.names))
    else:
        ctx.log.info(f"{source.split} has no ground-truth masks: predictions written, no scores")
    record = {"tool": ctx.spec.name, "checkpoint": str(ctx.cfg.ckpt), "step": ctx.info.get("step"),
              "dataset": source.data.name, "root": source.data.root, "split": source.split,
              "images": ctx.num_images(), "scales": list(source.params.scales),
              "class_names": source.names, "processes": ctx.dist.world_size,
              "seconds": round(time.time() - ctx.t0, 1), "scores": result,
              "config": to_container(ctx.cfg)}
    path = source.out_dir / "scores.json"
    write_json_atomic(path, record)
    ctx.log.info(f"scores written to {path}")
    if writer.server_layout:
        ctx.log.info(pack_voc_test(source.out_dir, len(source.dataset)))
    note = writer.finish(source.dataset.names, source.split)
    if note:
        ctx.log.info(note)
    return result


def eval_writer(ctx: Context, variants: tuple[str, ...]) -> EvalWriter:
    """The evaluation tools' files (`EvalWriter`; a VOC test split: the server layout)."""
    return EvalWriter(ctx.source.out_dir, variants, ctx.cfg.save_labels, ctx.cfg.save_arrays,
                      server_layout=not ctx.has_labels and ctx.source.data.name == "voc")


def evaluate(spec: ToolSpec, cfg: DictConfig, make_writer: WriterFactory = eval_writer
             ) -> dict | None:
    """A tool's whole run from its parsed config (`tools.config.parse_tool_config`): context,
    loop, report, with the files of `make_writer` (the pseudo-mask export takes its own).
    Returns {variant: scores} on rank 0 (empty without ground truth), None elsewhere and with
    preflight=true (checks only, every rank as in a run, nothing written)."""
    ctx = None
    try:
        ctx = open_context(spec, cfg)
        if cfg.preflight:
            return None
        ctx = with_log(ctx)
        variants = (spec.variant, f"{spec.variant}_crf") if cfg.crf else (spec.variant,)
        writer = make_writer(ctx, variants)
        if cfg.resume and ctx.dist.is_main:
            writer.remove_stale_tmp()
        udist.barrier()
        metrics = Metrics(variants, ctx.source.data.num_classes)
        todo = _resume(ctx, writer, metrics)
        tick, close = _progress(ctx, len(ctx.shard()), len(ctx.shard()) - len(todo))
        try:
            run_images(ctx, ctx.items(todo), (metrics.add, writer.write, tick))
        finally:
            close()   # ends the bar's line, also before an error line
        return _report(ctx, metrics, writer)
    finally:
        if ctx is not None:
            ctx.crf.close()
        udist.cleanup()
