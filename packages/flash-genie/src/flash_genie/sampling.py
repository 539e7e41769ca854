"""Generate backbones with a trained denoiser and write them as PDB and Genie text files.

As Genie's sampling script does, a chain of length ``L`` is sampled inside a mask padded
to the model's ``maximumNumResidues`` (the residue-index encoding depends on the padded
length), so ``L`` may not exceed it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flash_genie.checkpoint import load_checkpoint, load_genie
from flash_genie.config import Config
from flash_genie.data import write_ca_pdb, write_genie_coords
from flash_genie.diffusion import make_schedule, sample
from flash_genie.model import Denoiser


@dataclass(frozen=True)
class Backbone:
    """One sampled chain: ``coords`` ``[L, 3]`` in Å."""

    length: int
    index: int
    coords: np.ndarray

    @property
    def name(self) -> str:
        return f"{self.length}_{self.index}"


def load_model(checkpoint: str | os.PathLike, config: Config | str | os.PathLike | None = None, *,
               ema: bool = False, device: str | torch.device = "cpu") -> tuple[Denoiser, Config]:
    """A denoiser and its config from a flash-genie checkpoint (config inside) or an original
    Genie Lightning ``.ckpt`` (``config`` required). ``ema`` takes the EMA weights of a
    flash-genie training checkpoint."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {os.fspath(checkpoint)!r} does not exist")
    weights: object = checkpoint
    if config is None:
        ckpt = load_checkpoint(checkpoint)
        config = Config.from_text(ckpt["config"], source=os.fspath(checkpoint))
        if ema:
            if not ckpt.get("ema"):
                raise ValueError(f"{os.fspath(checkpoint)!r} holds no EMA weights (emaDecay was 0)")
            prefix = "module."
            weights = {k[len(prefix):]: v for k, v in ckpt["ema"].items() if k.startswith(prefix)}
    config = Config.coerce(config)
    return load_genie(config, weights, device=device), config


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def generate(model: Denoiser, config: Config, lengths: list[int], num: int, *, noise_scale: float = 0.6,
             seed: int = 0, batch_size: int = 8, device: str | torch.device = "cpu",
             progress: bool = True, precision: str = "fp32") -> list[Backbone]:
    """``num`` backbones of each length in ``lengths`` (seeded; batched by length).

    ``precision`` ``bf16``/``fp16`` runs the denoiser under autocast (see
    :func:`~flash_genie.diffusion.sample`); the model's memory options (e.g. chunk sizes,
    :meth:`~flash_genie.model.Denoiser.set_memory_options`) apply as in training.

    Raises ``ValueError`` for a length below 1 or above the model's ``maximumNumResidues``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    limit = config["maximumNumResidues"]
    for length in lengths:
        if length < 1 or (limit is not None and length > limit):
            raise ValueError(f"length {length} is outside what this model samples: 1 to {limit} residues "
                             "(maximumNumResidues of its configuration)")
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    model = model.to(device).eval()
    schedule = make_schedule(config["numTimesteps"], config["schedule"], device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    jobs = [(length, start, min(batch_size, num - start)) for length in lengths for start in range(0, num, batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num * len(lengths), unit="backbone", dynamic_ncols=True)
    out = []
    for length, start, count in jobs:
        padded = limit if limit is not None else length
        mask = torch.zeros(count, padded, device=device)
        mask[:, :length] = 1
        x = sample(model, mask, schedule, noise_scale, generator=generator, autocast=PRECISIONS[precision]).x
        for b in range(count):
            out.append(Backbone(length, start + b, x[b, :length].float().cpu().numpy()))
        if bar is not None:
            bar.update(count)
    if bar is not None:
        bar.close()
    return out


def write_backbones(backbones: list[Backbone], out_dir: str | os.PathLike, title: str | None = None) -> Path:
    """``<out>/pdbs/<L>_<i>.pdb`` (Cα trace) and Genie's text files ``<out>/coords/<L>_<i>.npy``.

    A sample whose coordinates leave the PDB format's fixed columns (beyond -999.999 Å or
    9999.999 Å: an undertrained model's samples can diverge) is written as ``.cif`` in the
    same folder instead, with a warning, so that nothing is lost and evaluation still reads it.
    """
    out = Path(out_dir)
    (out / "pdbs").mkdir(parents=True, exist_ok=True)
    (out / "coords").mkdir(parents=True, exist_ok=True)
    for bb in backbones:
        coords = np.asarray(bb.coords)
        if ((coords < -999.999) | (coords > 9999.999)).any():
            warnings.warn(f"sample {bb.name} reaches {np.abs(coords).max():.0f} Å, beyond the PDB format: "
                          f"written as {bb.name}.cif", stacklevel=2)
            write_ca_pdb(out / "pdbs" / f"{bb.name}.cif", bb.coords, title=title)
        else:
            write_ca_pdb(out / "pdbs" / f"{bb.name}.pdb", bb.coords, title=title)
        write_genie_coords(out / "coords" / f"{bb.name}.npy", bb.coords)
    return out
