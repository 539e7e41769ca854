"""Length-bucketed batching, padding collation and random cropping of Cα traces.

Typical use (``ds`` a :class:`~flash_genie.data.Dataset`)::

    sampler = LengthBucketSampler(np.minimum(ds.lengths, max_len), batch_size=8, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler,
                        collate_fn=functools.partial(collate, max_length=max_len, generator=g))
    for epoch in range(n):
        sampler.set_epoch(epoch)
        for batch in loader: ...   # batch["coords"] [B, N, 3], batch["mask"] [B, N]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


class LengthBucketSampler(Sampler):
    """Batches of dataset indices with similar lengths, reproducible from (seed, epoch).

    Each epoch: shuffle all indices, cut them into pools of ``pool_batches × batch_size``,
    sort each pool by length, cut it into batches, and shuffle the order of all batches.
    Pools keep some randomness in which chains meet (a global sort would always batch the
    same neighbours); within a pool, neighbours in length share a batch, so padding is
    small. The shuffles use ``numpy.random.default_rng([seed, epoch])``.

    With ``num_replicas > 1`` (DDP, one sampler per rank) every rank gets the same number of
    batches: rank ``r`` takes batches ``r, r + num_replicas, ...`` of the epoch's list, cut
    to a multiple of ``num_replicas``.

    Call ``set_epoch`` before each epoch, as with ``DistributedSampler``; without it the
    same epoch is iterated again. Resuming: ``state_dict()`` records (seed, epoch, batches already yielded);
    ``load_state_dict`` restores them, and the next ``iter`` continues with exactly the batch
    that came next. Behind a DataLoader that prefetches, the sampler runs ahead of training:
    save ``state_dict(consumed=n)`` with the number of batches the training loop has used.

    Args:
        lengths: ``[C]`` length of each chain (after any cropping, e.g.
            ``np.minimum(ds.lengths, max_length)``).
        batch_size: chains per batch.
        seed: base seed; ``drop_last``: drop each epoch's final short batch.
        pool_batches: batches per sorting pool (1 = random batching; larger = less padding).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = False,
        pool_batches: int = 50,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        super().__init__()
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1:
            raise ValueError(f"lengths must be one-dimensional, got shape {self.lengths.shape}")
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size}, {pool_batches}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank {rank}, num_replicas {num_replicas}")
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.pool_batches, self.num_replicas, self.rank = pool_batches, num_replicas, rank
        self.epoch, self.position = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch, self.position = epoch, 0

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All of this rank's batches of ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        pool = self.pool_batches * self.batch_size
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        batches = [batches[i].tolist() for i in rng.permutation(len(batches))]
        usable = len(batches) - len(batches) % self.num_replicas
        return batches[self.rank : usable : self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.position = 0  # a finished epoch can be iterated again (set_epoch reshuffles)

    def __len__(self) -> int:
        n, pool = len(self.lengths), self.pool_batches * self.batch_size
        rest = n % pool  # the last pool's size; every pool ends with its own short batch
        last = rest // self.batch_size if self.drop_last else -(-rest // self.batch_size)
        return ((n // pool) * self.pool_batches + last) // self.num_replicas

    def state_dict(self, consumed: int | None = None) -> dict:
        """``{"seed", "epoch", "position"}``; ``consumed`` overrides the batches-yielded count."""
        return {"seed": self.seed, "epoch": self.epoch,
                "position": self.position if consumed is None else consumed}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: same epoch, continuing after ``position`` batches."""
        if state["seed"] != self.seed:
            raise ValueError(f"state is for seed {state['seed']}, this sampler has seed {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Fraction of padded positions when each batch is padded to its longest chain."""
    lengths = np.asarray(lengths)
    padded = sum(len(b) * lengths[list(b)].max() for b in batches)
    real = sum(lengths[list(b)].sum() for b in batches)
    return float(1.0 - real / padded) if padded else 0.0


def random_crop(coords, max_length: int, generator: torch.Generator | None = None):
    """A random contiguous window of at most ``max_length`` residues.

    Args:
        coords: ``[L, 3]`` (numpy or torch). ``generator``: torch generator for the start.

    Returns:
        ``(window [min(L, max_length), 3], start)``; chains that fit are returned whole.
    """
    length = len(coords)
    if length <= max_length:
        return coords, 0
    start = int(torch.randint(length - max_length + 1, (1,), generator=generator))
    return coords[start : start + max_length], start


def collate(batch, pad_to: int | None = None, max_length: int | None = None,
            generator: torch.Generator | None = None) -> dict:
    """Pad a list of dataset items into a batch.

    Args:
        batch: items ``(coords [L, 3], name, sequence)`` as returned by ``Dataset[i]``.
        pad_to: pad to this many residues (default: the longest chain after cropping).
        max_length: crop longer chains to a random window of this length (the sequence is
            cropped with them) using ``generator``, so the crop is reproducible.

    Returns:
        dict with ``coords`` float32 ``[B, N, 3]`` (zeros at padding), ``mask`` float32
        ``[B, N]`` (a prefix of ones per chain), ``lengths`` int64 ``[B]``, ``names`` and
        ``sequences`` (lists of str), ``crop_starts`` int64 ``[B]``.

    Raises:
        ValueError: an empty batch, or ``pad_to`` shorter than a chain.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    items = []
    for coords, name, seq in batch:
        start = 0
        if max_length is not None:
            coords, start = random_crop(coords, max_length, generator)
            seq = seq[start : start + len(coords)]
        items.append((torch.as_tensor(np.asarray(coords, dtype=np.float32)), name, seq, start))
    lengths = torch.tensor([len(item[0]) for item in items], dtype=torch.int64)
    longest = int(lengths.max())
    n = longest if pad_to is None else pad_to
    if n < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest chain ({longest} residues)")
    coords = torch.zeros(len(items), n, 3)
    for b, item in enumerate(items):
        coords[b, : len(item[0])] = item[0]
    mask = (torch.arange(n)[None, :] < lengths[:, None]).float()
    return {
        "coords": coords,
        "mask": mask,
        "lengths": lengths,
        "names": [item[1] for item in items],
        "sequences": [item[2] for item in items],
        "crop_starts": torch.tensor([item[3] for item in items], dtype=torch.int64),
    }
