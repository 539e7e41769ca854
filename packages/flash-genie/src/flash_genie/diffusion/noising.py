"""Genie's forward (noising) process on Cα coordinates."""

from __future__ import annotations

import torch

from flash_genie.diffusion.schedule import Schedule


def sample_timesteps(
    batch: int, n_timestep: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Training timesteps ``[batch]`` int64, uniform on ``{0, …, n_timestep-1}``."""
    return torch.randint(0, n_timestep, (batch,), generator=generator, device=device)


def q_sample(
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    mask: torch.Tensor,
    schedule: Schedule,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t = sqrt(ᾱ_s)·x0 + sqrt(1-ᾱ_s)·ε`` with ``ε`` masked to real residues.

    Args:
        x0: ``[B, N, 3]`` clean coordinates (Å). Genie centres them over all ``N``
            slots, padding included, so padded slots are not zero (see the README).
        timesteps: ``[B]`` int64 indices ``s``.
        mask: ``[B, N]``.
        schedule: the schedule; its arrays are cast to ``x0.dtype``.
        noise: ``[B, N, 3]`` standard normal draws, or ``None`` to draw with
            ``generator``. It is multiplied by the mask either way.

    Returns:
        ``(x_t, ε)``, both ``[B, N, 3]``.
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    noise = noise * mask.unsqueeze(-1).to(x0.dtype)
    a = schedule.sqrt_alphas_cumprod.to(x0)[timesteps].view(-1, 1, 1)
    b = schedule.sqrt_one_minus_alphas_cumprod.to(x0)[timesteps].view(-1, 1, 1)
    return a * x0 + b * noise, noise
