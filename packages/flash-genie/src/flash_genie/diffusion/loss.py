"""Genie's training loss."""

from __future__ import annotations

import torch

from flash_genie.diffusion.noising import q_sample, sample_timesteps
from flash_genie.diffusion.schedule import Schedule


def genie_loss(eps_pred: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor, eps_norm: float = 1e-10) -> torch.Tensor:
    """Mean over real residues of ``sqrt(eps_norm + |ε̂ - ε|²)``: the (unsquared) norm of the
    noise error, averaged (Genie's ``rmsd``).

    ``eps_pred``, ``eps``: ``[B, N, 3]``; ``mask``: ``[B, N]``. Computed in at least
    float32 (safe under bf16 autocast); returns a scalar of that dtype.
    """
    if eps_pred.shape != eps.shape or eps.shape[:-1] != mask.shape or eps.shape[-1] != 3:
        raise ValueError(
            f"expected eps_pred and eps [B, N, 3] and mask [B, N], got {tuple(eps_pred.shape)}, "
            f"{tuple(eps.shape)} and {tuple(mask.shape)}"
        )
    work = torch.promote_types(eps_pred.dtype, torch.float32)
    diff = eps_pred.to(work) - eps.to(work)
    per_residue = torch.sqrt(eps_norm + torch.sum(diff**2, dim=-1))
    m = mask.to(work)
    return torch.sum(per_residue * m) / torch.sum(m)


def training_loss(
    model,
    x0: torch.Tensor,
    mask: torch.Tensor,
    schedule: Schedule,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One Genie training objective: draw ``s`` and ``ε`` (unless given), noise ``x0``,
    predict the noise with ``model.predict_noise`` and return :func:`genie_loss`.

    ``x0`` ``[B, N, 3]``, ``mask`` ``[B, N]``, ``timesteps`` ``[B]``, ``noise`` ``[B, N, 3]``.
    """
    if timesteps is None:
        timesteps = sample_timesteps(x0.shape[0], schedule.n_timestep, generator, x0.device)
    xt, noise = q_sample(x0, timesteps, mask, schedule, noise=noise, generator=generator)
    return genie_loss(model.predict_noise(xt, timesteps, mask), noise, mask)
