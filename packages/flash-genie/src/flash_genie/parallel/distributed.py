"""The trainer's distributed side: process group, DDP, per-rank seeds and random states.

:class:`Distributed` is all that :class:`~flash_genie.training.Trainer` asks of
``torch.distributed``. In a process that ``torchrun`` did not start (or started alone) with
``sequenceParallelSize 1`` it is inert: every method is the single-process behaviour.

Under torchrun with ``world = data × sequence`` processes:

* the process group comes from torchrun's variables, with ``ddpBackend`` (``auto``: NCCL on
  GPUs, gloo on CPUs); a CUDA run uses the GPU ``LOCAL_RANK``;
* the model is wrapped as :class:`~flash_genie.parallel.model.NoisePredictor` (sequence
  parallel over its group) inside ``DistributedDataParallel`` over all ranks, whose gradient
  average is the mean over data replicas of the sum of the sequence ranks' shares;
  accumulation micro-steps run under ``no_sync`` (no communication);
* seeds: the model is initialised from ``seed`` on every rank; data rank 0 then goes on
  drawing exactly what one process would (crops, timesteps, noise, dropout), and data rank
  ``d > 0`` from a seed derived from ``(seed, d)``. The ranks of a sequence group share their
  data rank's streams, so they see and noise the same batch and draw the same dropout masks;
* checkpoints: every rank's random states are gathered into the checkpoint that rank 0
  writes (then all ranks wait at a barrier); on resume every rank reads it and takes its own
  states back, so the run continues as if never stopped. That needs the same layout (number
  of processes and ``sequenceParallelSize``); another layout is refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from flash_genie.config import Config
from flash_genie.model import Denoiser
from flash_genie.parallel.grid import ProcessGrid, init_distributed, launched, resolve_backend
from flash_genie.parallel.model import NoisePredictor

__all__ = ["Distributed"]


class _DataParallelNoise:
    """``predict_noise`` through DDP's forward (which is where DDP prepares its backward)."""

    def __init__(self, ddp: DistributedDataParallel):
        self.ddp = ddp

    def predict_noise(self, xt: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ddp(xt, timesteps, mask)


class Distributed:
    """Process group, grid and DDP for a training run configured by ``config`` on ``device``.

    Attributes:
        grid: the :class:`ProcessGrid`, ``None`` in a single process.
        device: where this rank trains (``cuda:LOCAL_RANK`` for a CUDA run under torchrun).
    """

    def __init__(self, config: Config, device: torch.device):
        sp = config["sequenceParallelSize"]
        world = int(os.environ["WORLD_SIZE"]) if launched() else 1
        self.grid: ProcessGrid | None = None
        self.device = device
        self.find_unused_parameters = config["findUnusedParameters"]
        self._ddp: DistributedDataParallel | None = None
        if world == 1:
            if sp != 1:
                raise ValueError(f"sequenceParallelSize {sp} needs a multiple of {sp} processes: launch "
                                 f"with `torchrun --nproc-per-node {sp} -m flash_genie.cli train ...`")
            return
        if device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        init_distributed(resolve_backend(config["ddpBackend"], self.device))
        self.grid = ProcessGrid.create(sp)

    @property
    def enabled(self) -> bool:
        return self.grid is not None

    @property
    def rank(self) -> int:
        return 0 if self.grid is None else self.grid.rank

    @property
    def world(self) -> int:
        return 1 if self.grid is None else self.grid.world

    @property
    def data_rank(self) -> int:
        return 0 if self.grid is None else self.grid.data_rank

    @property
    def data_size(self) -> int:
        return 1 if self.grid is None else self.grid.dp

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics and plots."""
        return self.rank == 0

    @property
    def layout(self) -> dict:
        """What a checkpoint must match to be resumed exactly."""
        return {"world": self.world, "sequence_parallel": 1 if self.grid is None else self.grid.sp}

    def data_seed(self, seed: int) -> int:
        """The seed of this rank's random streams: ``seed`` on data rank 0, one derived from
        ``(seed, data rank)`` elsewhere (shared by the ranks of a sequence group)."""
        if self.data_rank == 0:
            return seed
        return int(np.random.SeedSequence([seed & 0xFFFFFFFF, self.data_rank]).generate_state(1)[0])

    def wrap(self, model: Denoiser):
        """What the training loss calls ``predict_noise`` on: ``model`` itself in one process,
        DDP around its sequence-parallel form otherwise."""
        if self.grid is None:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = DistributedDataParallel(NoisePredictor(model, self.grid.seq_group), device_ids=device_ids,
                                            find_unused_parameters=self.find_unused_parameters)
        return _DataParallelNoise(self._ddp)

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: gradients are all-reduced only after
        the ``last`` micro-batch of an optimizer step (DDP's ``no_sync`` before it)."""
        with contextlib.nullcontext() if last or self._ddp is None else self._ddp.no_sync():
            yield

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks (the data replicas' mean: the ranks of a
        sequence group hold the same value)."""
        if self.grid is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def barrier(self) -> None:
        if self.grid is not None:
            dist.barrier()

    def random_states(self, generator: torch.Generator) -> dict:
        """Checkpoint fields with every rank's random states (collective: all ranks call it)."""
        if self.grid is None:
            return {}
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        state = {"generator": generator.get_state(), "rng_cpu": torch.get_rng_state(), "rng_cuda": cuda}
        states: list = [None] * self.world
        dist.all_gather_object(states, state)
        return {"layout": self.layout, "rank_states": states}

    def restore_random_states(self, ckpt: dict, generator: torch.Generator, source: str) -> bool:
        """Take this rank's states back from ``ckpt``; ``False`` in a single process (whose
        states are the checkpoint's own fields). Raises ``ValueError`` on another layout."""
        saved = ckpt.get("layout", {"world": 1, "sequence_parallel": 1})
        if saved != self.layout:
            raise ValueError(f"{source!r} was written by {saved['world']} processes with sequenceParallelSize "
                             f"{saved['sequence_parallel']}; resume with the same layout (this run: "
                             f"{self.world} processes, sequenceParallelSize {self.layout['sequence_parallel']})")
        if self.grid is None:
            return False
        state = ckpt["rank_states"][self.rank]
        generator.set_state(state["generator"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        return True

    def close(self) -> None:
        """Leave the process group (at the end of a run)."""
        if self.grid is not None and dist.is_initialized():
            dist.destroy_process_group()
            self.grid = None
