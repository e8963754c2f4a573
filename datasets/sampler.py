"""Resumable, rank-sharded sampling with per-sample seeded augmentation.

The sampler yields `epoch * len(dataset) + index`; `SeededDataset` decodes it and seeds python,
numpy and torch from (seed, epoch, index) before the wrapped dataset draws its augmentation.
A sample's crop, flip and jitter therefore depend only on (seed, epoch, index) — not on the number
of workers, on the process that loads it, or on where a resumed run starts — which is what makes a
killed and resumed run bit-identical to an uninterrupted one. The global generators are restored
afterwards, so loading in the main process (num_workers=0) leaves the training stream (UNE's
random tokens, dropout) untouched.
"""
from __future__ import annotations

import random
import re
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from utils.errors import UserError


class SampleError(UserError, ValueError):
    """A sample that cannot be loaded (missing or corrupt file, a transform failing on it); the
    message is one line naming the file. The dataset raises it (`VOCDataset.__getitem__`).

    DataLoader workers re-raise an exception as `type(exc)("Caught ... Original Traceback ...")`;
    the constructor keeps only the original one-line message, so the error reads the same
    whichever process loaded the sample.
    """

    def __init__(self, message: str):
        lines = [ln for ln in str(message).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else ""
        if len(lines) > 1 and lines[0].startswith("Caught "):  # "pkg.SampleError: <message>"
            last = re.sub(r"^[\w.]+: ", "", last)
        super().__init__(last.strip())


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch (CPU) with `seed` inside the block; restore them after."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SeededDataset(Dataset):
    """Wraps a dataset indexed by `epoch * len(dataset) + index` codes (see ResumableSampler)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, code: int):
        epoch, index = divmod(int(code), len(self.dataset))
        s = (self.seed * 1_000_003 + epoch * 7_919 + index) % (2**31 - 1)
        with seeded_rng(s):
            return self.dataset[index]


class ResumableSampler(Sampler[int]):
    """Shuffled, sharded by rank, drop-last batches; infinite over epochs; starts at any step.

    Epoch e uses the permutation of torch.Generator(seed + e), split rank::world_size after
    truncation to a multiple of world_size * batch_size. Step t reads batch t of the stream.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_step: int = 0):
        self.n = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_step = start_step
        self.steps_per_epoch = num_samples // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training split has {num_samples} images, fewer than one global "
                             f"batch ({batch_size} x {world_size} processes)")

    def epoch_indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g)
        usable = self.steps_per_epoch * self.batch_size * self.world_size
        return perm[:usable][self.rank::self.world_size].tolist()

    def __iter__(self):
        epoch, offset = divmod(self.start_step, self.steps_per_epoch)
        first = offset * self.batch_size
        while True:
            idx = self.epoch_indices(epoch)
            for i in idx[first:]:
                yield epoch * self.n + i
            first = 0
            epoch += 1

    def __len__(self) -> int:  # one epoch; the iterator itself never ends
        return self.steps_per_epoch * self.batch_size
