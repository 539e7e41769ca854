"""Length-bucket sampler (padding, determinism, resume, DDP), collate and random crop."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from flash_genie.data import (
    LengthBucketSampler,
    builtin_dataset,
    collate,
    padding_fraction,
    random_crop,
)


@pytest.fixture(scope="module")
def ds():
    return builtin_dataset()


def test_bucketing_reduces_padding(ds):
    lengths = ds.lengths
    fractions = {}
    for pool in (1, 50):
        per_epoch = [padding_fraction(LengthBucketSampler(lengths, 8, seed=0, pool_batches=pool).epoch_batches(e), lengths)
                     for e in range(3)]
        fractions[pool] = float(np.mean(per_epoch))
    print(f"padding with random batches {fractions[1]:.3f}, with length buckets {fractions[50]:.3f}")
    assert fractions[1] > 0.25  # lengths 50–256: random batches of 8 pad about a third
    assert fractions[50] < 0.03 and fractions[50] < fractions[1] / 10


def test_every_index_once_and_deterministic(ds):
    sampler = LengthBucketSampler(ds.lengths, 7, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    assert len(batches) == len(sampler)
    assert batches == LengthBucketSampler(ds.lengths, 7, seed=3).epoch_batches(0)
    assert sampler.state_dict() == {"seed": 3, "epoch": 0, "position": 0}
    assert list(sampler) == batches  # iterating again repeats the epoch ...
    sampler.set_epoch(1)
    second = list(sampler)  # ... and set_epoch reshuffles
    assert second != batches and second == LengthBucketSampler(ds.lengths, 7, seed=3).epoch_batches(1)
    assert LengthBucketSampler(ds.lengths, 7, seed=4).epoch_batches(0) != batches


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n, batch, pool", [(1000, 8, 50), (999, 7, 13), (5, 8, 2), (1, 1, 1)])
def test_len_matches(n, batch, pool, drop_last):
    sampler = LengthBucketSampler(np.arange(n) % 97 + 20, batch, pool_batches=pool, drop_last=drop_last)
    batches = sampler.epoch_batches()
    assert len(batches) == len(sampler)
    assert not drop_last or all(len(b) == batch for b in batches)


def test_resume_mid_epoch(ds):
    full = LengthBucketSampler(ds.lengths, 8, seed=11)
    full.set_epoch(2)
    expected = list(full)
    first = LengthBucketSampler(ds.lengths, 8, seed=11)
    first.set_epoch(2)
    it = iter(first)
    seen = [next(it) for _ in range(17)]
    state = first.state_dict()
    assert state == {"seed": 11, "epoch": 2, "position": 17}
    resumed = LengthBucketSampler(ds.lengths, 8, seed=11)
    resumed.load_state_dict(state)
    assert seen + list(resumed) == expected
    assert first.state_dict(consumed=5)["position"] == 5
    with pytest.raises(ValueError, match="seed"):
        LengthBucketSampler(ds.lengths, 8, seed=12).load_state_dict(state)


def test_replicas_partition_the_epoch(ds):
    per_rank = [LengthBucketSampler(ds.lengths, 8, seed=0, num_replicas=3, rank=r) for r in range(3)]
    batches = [s.epoch_batches(0) for s in per_rank]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(per_rank[0])
    flat = [i for rank in batches for b in rank for i in b]
    assert len(flat) == len(set(flat))  # no chain on two ranks
    with pytest.raises(ValueError, match="rank"):
        LengthBucketSampler(ds.lengths, 8, num_replicas=2, rank=2)


def test_collate_pads_and_masks(ds):
    items = [ds[i] for i in (0, 1, 2)]
    batch = collate(items)
    n = max(len(c) for c, _, _ in items)
    assert batch["coords"].shape == (3, n, 3) and batch["coords"].dtype == torch.float32
    assert batch["mask"].shape == (3, n) and batch["mask"].dtype == torch.float32
    for b, (coords, name, seq) in enumerate(items):
        length = len(coords)
        assert batch["lengths"][b] == length and batch["names"][b] == name and batch["sequences"][b] == seq
        assert batch["mask"][b, :length].eq(1).all() and batch["mask"][b, length:].eq(0).all()
        torch.testing.assert_close(batch["coords"][b, :length], torch.from_numpy(coords))
        assert batch["coords"][b, length:].eq(0).all()
    assert collate(items, pad_to=300)["coords"].shape == (3, 300, 3)
    with pytest.raises(ValueError, match="pad_to"):
        collate(items, pad_to=10)
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_random_crop_is_reproducible(ds):
    items = [ds[i] for i in range(4)]
    a = collate(items, max_length=64, generator=torch.Generator().manual_seed(5))
    b = collate(items, max_length=64, generator=torch.Generator().manual_seed(5))
    assert a["coords"].shape == (4, 64, 3)
    torch.testing.assert_close(a["coords"], b["coords"])
    assert a["crop_starts"].tolist() == b["crop_starts"].tolist()
    for k, (coords, _, seq) in enumerate(items):
        start = int(a["crop_starts"][k])
        torch.testing.assert_close(a["coords"][k], torch.from_numpy(coords[start : start + 64]))
        assert a["sequences"][k] == seq[start : start + 64]
    short = np.zeros((10, 3))
    assert random_crop(short, 64)[1] == 0 and random_crop(short, 64)[0] is short
    starts = {random_crop(np.zeros((100, 3)), 10, torch.Generator().manual_seed(s))[1] for s in range(50)}
    assert len(starts) > 20 and max(starts) <= 90


def test_dataloader_integration(ds):
    sampler = LengthBucketSampler(np.minimum(ds.lengths, 128), 4, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler,
                        collate_fn=functools.partial(collate, max_length=128, generator=torch.Generator().manual_seed(0)))
    batch = next(iter(loader))
    assert batch["coords"].shape[0] == 4 and batch["coords"].shape[1] <= 128
    lengths = batch["lengths"].float()
    assert (lengths.max() - lengths.min()) / lengths.max() < 0.2  # similar lengths share a batch
