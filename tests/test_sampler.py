from datasets.sampler import ResumableSampler, SeededDataset


def take(it, n):
    return [next(it) for _ in range(n)]


def test_sampler_shards_disjoint_and_resumes_exactly():
    n, bs, world = 23, 2, 2
    full = [take(iter(ResumableSampler(n, bs, r, world, seed=5)), 40) for r in range(world)]
    spe = n // (bs * world)
    # each epoch: ranks disjoint, no index repeated
    for e in range(3):
        seen = [c % n for r in range(world) for c in full[r][e * spe * bs:(e + 1) * spe * bs]]
        assert len(seen) == len(set(seen)) == spe * bs * world
        assert all(c // n == e for r in range(world) for c in full[r][e * spe * bs:(e + 1) * spe * bs])
    # starting at step t continues exactly where an uninterrupted stream is at batch t
    for t in (0, 3, spe, spe + 2, 3 * spe - 1):
        for r in range(world):
            resumed = take(iter(ResumableSampler(n, bs, r, world, seed=5, start_step=t)), 6)
            assert resumed == full[r][t * bs:t * bs + 6]


class Draw:
    def __len__(self):
        return 10

    def __getitem__(self, i):
        import random

        import numpy as np
        import torch
        return i, random.random(), float(np.random.rand()), float(torch.rand(1))


def test_seeded_dataset_depends_only_on_seed_epoch_index():
    ds = SeededDataset(Draw(), seed=1)
    a = ds[3 * 10 + 4]
    ds[7]
    assert ds[3 * 10 + 4] == a and a[0] == 4
    assert ds[2 * 10 + 4] != a
    assert SeededDataset(Draw(), seed=2)[34] != a
