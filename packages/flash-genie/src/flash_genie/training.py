"""Training of the Genie denoiser, on CPU, one GPU or many processes (torchrun), with exact resume.

One optimizer step = ``accumulateGradBatches`` micro-batches, each a length-bucketed batch
of real chains cropped to ``maximumNumResidues`` (or to the current stage of a
``lengthCurriculum``), centred as Genie centres them, noised at uniformly drawn timesteps and
scored with Genie's loss (plus the optional auxiliary distance loss). Every random draw of the loop
(crop windows, timesteps, noise) comes from one ``torch.Generator`` and the batch order
from a seeded sampler; dropout uses the global RNG. A checkpoint stores all of them with
the model, optimizer, learning-rate schedule and EMA, written atomically, so a run killed
at any point and resumed with ``resume=True`` continues the same trajectory: the losses
after the resume equal those of an uninterrupted run.

Under torchrun the same loop runs data-parallel (DDP) and, with ``sequenceParallelSize``,
sequence-parallel: :class:`~flash_genie.parallel.distributed.Distributed` holds all of it
(per-rank seeds, ``no_sync`` on accumulation micro-steps, rank 0 writing, every rank's random
states in the checkpoint).

Outputs in ``out_dir``: ``checkpoints/last.pt`` (every ``checkpointEverySteps`` steps and
at the end) and ``checkpoints/final.pt``, ``metrics.jsonl`` (one line per optimizer step),
TensorBoard events when ``tensorboard`` is installed, ``loss.png`` at the end, and with a
``lengthCurriculum`` ``curriculum.jsonl`` (the step at which each crop length starts).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from flash_genie.checkpoint import load_checkpoint, save_checkpoint
from flash_genie.config import Config
from flash_genie.data import (
    Dataset,
    LengthBucketSampler,
    LengthCurriculum,
    builtin_dataset,
    collate,
)
from flash_genie.diffusion import loss_options, make_schedule, training_loss
from flash_genie.model import Denoiser
from flash_genie.parallel.distributed import Distributed

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class StepLog:
    """What one optimizer step reports."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float


def open_dataset(spec: str) -> Dataset:
    """``builtin`` (the set shipped with flash-genie) or the path of a built dataset."""
    return builtin_dataset() if spec == "builtin" else Dataset.open(spec)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on GPUs that support it and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if bf16 else "fp32"
    return precision


def genie_center(coords: torch.Tensor) -> torch.Tensor:
    """Genie's centring: subtract the mean over all ``N`` slots, padded zeros included,
    so padded slots hold ``-mean`` (``coords`` ``[B, N, 3]``)."""
    return coords - coords.mean(dim=1, keepdim=True)


class Trainer:
    """Train a :class:`~flash_genie.model.Denoiser` from a :class:`~flash_genie.config.Config`.

    Args:
        config: model, data and optimisation settings (``Config`` keys).
        out_dir: where checkpoints, metrics and plots go.
        device: ``cpu``, ``cuda``...; default: CUDA when available.
        progress: show a progress bar (tqdm) with loss, steps/s and ETA.
    """

    def __init__(self, config: Config, out_dir: str | os.PathLike, *, device: str | torch.device | None = None,
                 progress: bool = True):
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Distributed training (torchrun): process group, grid, DDP, per-rank seeds. Inert in one process.
        self.dist = Distributed(config, self.device)
        self.device = self.dist.device
        self.precision = resolve_precision(config["precision"], self.device)
        self.progress = progress
        self.max_length = config["maximumNumResidues"]
        if self.max_length is None:
            raise ValueError("maximumNumResidues must be set for training (chains are cropped to it)")
        # Progressive training (lengthCurriculum) and the loss's long-chain options.
        self.curriculum = LengthCurriculum(config.curriculum(), self.max_length)
        self.length_switches: list[tuple[int, int]] = []  # (step, crop length) at each stage start
        self.loss_options = loss_options(config)
        self.dataset = open_dataset(config["dataset"])
        lengths = np.minimum(self.dataset.lengths, self.max_length)
        keep = np.flatnonzero(lengths >= (config["minimumNumResidues"] or 1))
        if len(keep) == 0:
            raise ValueError(f"no chain of {config['dataset']} has at least {config['minimumNumResidues']} residues")
        self.indices = keep
        seed = config["seed"]
        self.sampler = LengthBucketSampler(lengths[keep], config["batchSize"], seed=seed, drop_last=False,
                                           num_replicas=self.dist.data_size, rank=self.dist.data_rank)
        torch.manual_seed(seed)
        self.model = Denoiser.from_config(config).to(self.device)
        self.net = self.dist.wrap(self.model)  # what the loss calls predict_noise on
        rank_seed = self.dist.data_seed(seed)
        if rank_seed != seed:
            torch.manual_seed(rank_seed)
        self.schedule = make_schedule(config["numTimesteps"], config["schedule"], device=self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config["learningRate"])
        self.accumulate = config["accumulateGradBatches"]
        self.steps_per_epoch = max(1, len(self.sampler) // self.accumulate)
        self.max_steps = config["maximumSteps"] or config["numEpoches"] * self.steps_per_epoch
        warmup = config["warmupSteps"] or config["warmupEpochs"] * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        decay = config["emaDecay"]
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay)) if decay else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.generator = torch.Generator().manual_seed(rank_seed)
        self.step = 0
        self._batches = None

    # -- data ------------------------------------------------------------------
    def _next_batch(self) -> dict:
        while True:
            if self._batches is None:
                self._batches = iter(self.sampler)
            try:
                positions = next(self._batches)
                break
            except StopIteration:
                self.sampler.set_epoch(self.sampler.epoch + 1)
                self._batches = None
        items = [self.dataset[int(self.indices[p])] for p in positions]
        length = self._crop_length()
        pad = length if self.config["padToMaximumNumResidues"] else None
        return collate(items, pad_to=pad, max_length=length, generator=self.generator)

    def _crop_length(self) -> int:
        """The curriculum's length for this step. The first step of each stage is recorded
        in ``length_switches`` and, once per run, in ``curriculum.jsonl``."""
        length = self.curriculum.length_at(self.step)
        if self.step == 0 or self.curriculum.length_at(self.step - 1) != length:
            if (self.step, length) not in self.length_switches:
                self.length_switches.append((self.step, length))
                if self.dist.is_main and self.curriculum.stages:
                    _record_switch(self.out_dir / "curriculum.jsonl", self.step, length)
        return length

    # -- one optimizer step ------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self) -> StepLog:
        """Run one optimizer step (with gradient accumulation) and return its log."""
        t0 = time.perf_counter()
        self.model.train()
        total = 0.0
        for i in range(self.accumulate):
            batch = self._next_batch()
            x0 = genie_center(batch["coords"]).to(self.device)
            mask = batch["mask"].to(self.device)
            n = x0.shape[0]
            timesteps = torch.randint(0, self.schedule.n_timestep, (n,), generator=self.generator)
            noise = torch.randn(x0.shape, generator=self.generator)
            with self.dist.micro_step(last=i == self.accumulate - 1):
                with self._autocast():
                    loss = training_loss(self.net, x0, mask, self.schedule, timesteps=timesteps.to(self.device),
                                         noise=noise.to(self.device), **self.loss_options)
                self.scaler.scale(loss / self.accumulate).backward()
            total += float(loss.detach())
        self.scaler.unscale_(self.optimizer)
        clip = self.config["gradientClipVal"]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        loss = self.dist.mean(total / self.accumulate)
        return StepLog(self.step, loss, lr, float(grad_norm), time.perf_counter() - t0)

    # -- state -------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save(self, name: str = "last.pt") -> Path:
        """Write the full training state atomically to ``checkpoints/<name>`` (rank 0 writes;
        every rank must call it)."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / name
        ranks = self.dist.random_states(self.generator)  # collective; {} in one process
        if not self.dist.is_main:
            self.dist.barrier()
            return path
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and not ranks else []
        save_checkpoint(
            path, self.model, self.config,
            step=self.step,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            ema=None if self.ema is None else self.ema.state_dict(),
            sampler=self.sampler.state_dict(),
            batches_started=self._batches is not None,
            generator=self.generator.get_state(),
            rng_cpu=torch.get_rng_state(),
            rng_cuda=cuda_rng,
            **ranks,
        )
        self.dist.barrier()
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Restore the state written by :meth:`save` (the config must match)."""
        ckpt = load_checkpoint(path)
        saved = Config.from_text(ckpt["config"], source=os.fspath(path))
        # The run's length may change on resume; anything else would change its trajectory.
        length = {"maximumSteps": 0, "numEpoches": 1}
        if saved.replace(**length) != self.config.replace(**length):
            raise ValueError(f"{os.fspath(path)!r} was written with a different configuration; "
                             "resume with the same config (only maximumSteps/numEpoches may change)")
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.sampler.load_state_dict(ckpt["sampler"])
        self._batches = iter(self.sampler) if ckpt["batches_started"] else None
        if not self.dist.restore_random_states(ckpt, self.generator, os.fspath(path)):
            self.generator.set_state(ckpt["generator"])
            torch.set_rng_state(ckpt["rng_cpu"])
            if ckpt["rng_cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        self.step = int(ckpt["step"])

    # -- the loop ----------------------------------------------------------------
    def fit(self, resume: bool = False, on_step: Callable[[StepLog], None] | None = None) -> list[StepLog]:
        """Train to ``max_steps``; with ``resume``, continue from ``checkpoints/last.pt``.

        ``on_step`` is called after every step (after any checkpoint of that step).
        Returns the logs of the steps run by this call.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        last = self.checkpoint_dir / "last.pt"
        metrics = self.out_dir / "metrics.jsonl"
        if resume:
            if not last.is_file():
                raise FileNotFoundError(f"cannot resume: no checkpoint at {last}")
            self.load(last)
            if self.dist.is_main:
                _truncate_metrics(metrics, self.step)
        elif last.exists():
            raise FileExistsError(f"{last} exists: pass resume=True (--resume) to continue that run, "
                                  "or choose another output directory")
        elif metrics.exists() and self.dist.is_main:
            metrics.unlink()
        main = self.dist.is_main  # only rank 0 writes metrics, events, the progress bar and plots
        writer = _tensorboard(self.out_dir) if main else None
        every = self.config["checkpointEverySteps"] or self.config["checkpointEveryEpoches"] * self.steps_per_epoch
        logs = []
        bar = _progress(self.progress and main, initial=self.step, total=self.max_steps)
        with open(metrics if main else os.devnull, "a") as out:
            while self.step < self.max_steps:
                log = self.train_step()
                logs.append(log)
                out.write(json.dumps({"step": log.step, "loss": log.loss, "lr": log.lr,
                                      "grad_norm": log.grad_norm, "seconds": log.seconds}) + "\n")
                out.flush()
                if writer is not None:
                    writer.add_scalar("loss", log.loss, log.step)
                    writer.add_scalar("lr", log.lr, log.step)
                if every and self.step % every == 0 and self.step < self.max_steps:
                    self.save()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{log.loss:.3f}")
                if on_step is not None:
                    on_step(log)
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        self.save()
        self.save("final.pt")
        if main:
            plot_losses(metrics, self.out_dir / "loss.png")
        return logs


def _record_switch(path: Path, step: int, length: int) -> None:
    """Append ``{"step", "length"}`` to ``path`` unless a resumed run recorded it already."""
    line = json.dumps({"step": step, "length": length})
    if path.exists() and line in path.read_text().splitlines():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out:
        out.write(line + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps after ``step`` (logged after the checkpoint, before a kill)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(out_dir / "tensorboard")


def _progress(enabled: bool, initial: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(initial=initial, total=total, unit="step", dynamic_ncols=True)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The lines of a ``metrics.jsonl`` file."""
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def plot_losses(metrics: str | os.PathLike, out: str | os.PathLike) -> None:
    """PNG of the training loss per step, with a running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, loss, lw=0.6, alpha=0.5, label="loss")
    if len(loss) >= 5:
        w = max(2, len(loss) // 20)
        ax.plot(steps[w - 1:], np.convolve(loss, np.ones(w) / w, mode="valid"), lw=1.5, label=f"mean of {w}")
    ax.set(xlabel="optimizer step", ylabel="Genie loss (Å)", title="training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
