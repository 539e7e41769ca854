"""The process grid: ``world = data × sequence`` ranks, and process-group start-up from the
environment ``torchrun`` sets.

Global rank ``r`` is data rank ``r // sp`` and sequence rank ``r % sp``: the ranks of a
sequence group are consecutive, so with ``sp`` dividing the GPUs per node a sequence group
(which talks at every layer) stays inside one node, and only the data-parallel gradient
all-reduce crosses nodes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["BACKENDS", "ProcessGrid", "init_distributed", "launched", "resolve_backend"]

BACKENDS = ("auto", "gloo", "nccl")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` is NCCL for CUDA devices and gloo otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return backend


def launched() -> bool:
    """True in a process started by ``torchrun`` (or anything that sets its variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(backend: str, timeout_s: float = 1800.0) -> None:
    """``init_process_group`` from torchrun's variables (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), unless a default group exists already."""
    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise RuntimeError(f"a {dist.get_backend()} process group exists already; cannot start {backend}")
        return
    if not launched():
        raise RuntimeError("not started by torchrun: RANK and WORLD_SIZE are not set "
                           "(launch with `torchrun --nproc-per-node N -m flash_genie.cli ...`)")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


@dataclass(frozen=True)
class ProcessGrid:
    """Data × sequence layout of the default process group.

    Attributes:
        rank, world: global rank and size.
        sp, dp: sequence-parallel and data-parallel sizes (``world = dp · sp``).
        seq_rank, data_rank: this process's coordinates.
        seq_group: the ``sp`` ranks that share a batch and split its residues (``None`` when
            ``sp == 1``).

    No data-parallel group is needed: the gradients are averaged over all ranks at once (see
    :mod:`flash_genie.parallel`), which is both the mean over data replicas and the sum of the
    sequence ranks' shares.
    """

    rank: int
    world: int
    sp: int
    seq_group: dist.ProcessGroup | None

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def seq_rank(self) -> int:
        return self.rank % self.sp

    @property
    def data_rank(self) -> int:
        return self.rank // self.sp

    @classmethod
    def create(cls, sp: int) -> ProcessGrid:
        """Split the default group into sequence groups of ``sp`` consecutive ranks.
        Collective: every rank must call it, in the same order."""
        rank, world = dist.get_rank(), dist.get_world_size()
        if sp < 1 or world % sp:
            raise ValueError(f"sequenceParallelSize {sp} must divide the number of processes ({world})")
        seq_group = None
        if sp > 1:
            # new_group is collective over the default group: every rank creates every group.
            for first in range(0, world, sp):
                group = dist.new_group(list(range(first, first + sp)))
                if first <= rank < first + sp:
                    seq_group = group
        return cls(rank, world, sp, seq_group)

    def describe(self) -> str:
        return f"{self.world} processes = data {self.dp} × sequence {self.sp}"
