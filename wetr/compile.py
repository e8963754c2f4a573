"""Regional torch.compile: the repeated transformer blocks (and the decoder), not the whole model.

Compiling each block in place (`nn.Module.compile`) rather than wrapping the model means:
- every call of the model runs compiled blocks: the training forward and the no-grad
  multi-scale CAM passes alike (wrapping the training module left the CAM passes eager);
- the 12 identical blocks share one compiled graph (their parameters are graph inputs), so the
  compile time is that of one block, not of the whole network;
- module names and state_dict keys stay unchanged (no `_orig_mod.` prefix), so checkpoints,
  DDP and `load_weights` see the plain model.
Graphs are specialised on grad mode and, by default, on the first shape; a pass with a new
batch or token count recompiles once with dynamic sizes, which then serve every CAM scale.
Everything outside the blocks (patch embedding, position-embedding resampling, heads, GCR,
losses) stays eager.

    model = compile_regions(build_model(...))   # before or after DDP wrapping
"""
import torch
from torch import nn

__all__ = ["compile_regions"]


def compile_regions(model: nn.Module, decoder: bool = True, dynamic: bool | None = None,
                    mode: str | None = None, backend: str = "inductor") -> nn.Module:
    """Compile `model.encoder.blocks[i]` (and `model.decoder`) in place; returns `model`.

    Args:
        model: a MoRe model (anything with `encoder.blocks` and, if `decoder`, `decoder`).
        decoder: also compile the segmentation decoder (three convolutions and two ReLUs).
        dynamic: torch.compile's `dynamic`: None (static first, then dynamic sizes after a
            shape change), True (dynamic from the start: fewer compiles), False (one graph per
            shape).
        mode: torch.compile's `mode` (e.g. "max-autotune-no-cudagraphs"); None: default.
        backend: torch.compile's `backend`; "aot_eager" traces and runs the same graphs without
            code generation (seconds instead of a minute on a small CPU: the tests use it).
    """
    # Each CAM scale is a new token count and grad mode differs between the training forward
    # and the CAM passes: leave room for those graphs before dynamo falls back to eager.
    limit = max(torch._dynamo.config.recompile_limit, 16)
    torch._dynamo.config.recompile_limit = limit
    for block in model.encoder.blocks:
        block.compile(dynamic=dynamic, mode=mode, backend=backend)
    if decoder:
        model.decoder.compile(dynamic=dynamic, mode=mode, backend=backend)
    return model
