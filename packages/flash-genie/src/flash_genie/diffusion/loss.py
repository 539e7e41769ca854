"""Genie's training loss, and an optional auxiliary pairwise-distance loss."""

from __future__ import annotations

from typing import Any

import torch

from flash_genie.config import Config
from flash_genie.diffusion.noising import q_sample, sample_timesteps
from flash_genie.diffusion.schedule import Schedule
from flash_genie.model.chunking import chunked


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


def pairwise_distance_loss(
    x_pred: torch.Tensor,
    x_true: torch.Tensor,
    mask: torch.Tensor,
    cutoff: float = 6.0,
    chunk_size: int | None = None,
    eps: float = 1e-10,
) -> torch.Tensor:
    """FrameDiff's auxiliary distance-matrix loss on Cα, per chain (``[B]``).

    ``Σ_ij m_ij [d_ij < cutoff] (d̂_ij - d_ij)² / (Σ_ij m_ij [d_ij < cutoff] - L)`` over the
    real residues ``m``, with ``d`` the true and ``d̂`` the predicted Cα distances
    ``sqrt(eps + |x_i - x_j|²)`` and ``L`` the chain length (the diagonal is not a pair).
    ``chunk_size`` computes it in blocks of rows ``i`` (recomputed in backward), so it never
    holds more than ``chunk · N`` distances: O(chunk·N) memory instead of O(N²), the same
    number up to the order of the sum. Computed in at least float32.
    """
    if x_pred.shape != x_true.shape or x_true.shape[:-1] != mask.shape or x_true.shape[-1] != 3:
        raise ValueError(f"expected x_pred and x_true [B, N, 3] and mask [B, N], got {tuple(x_pred.shape)}, "
                         f"{tuple(x_true.shape)} and {tuple(mask.shape)}")
    work = torch.promote_types(x_pred.dtype, torch.float32)
    x_pred, x_true, m = x_pred.to(work), x_true.to(work), mask.to(work)

    def block(p_i, t_i, m_i, p, t, m_all):  # rows i of the sums: [B, 2] (numerator, pair count)
        d_hat = torch.sqrt(eps + torch.sum((p_i.unsqueeze(2) - p.unsqueeze(1)) ** 2, dim=-1))
        d = torch.sqrt(eps + torch.sum((t_i.unsqueeze(2) - t.unsqueeze(1)) ** 2, dim=-1))
        pairs = m_i.unsqueeze(2) * m_all.unsqueeze(1) * (d < cutoff).to(work)
        return torch.stack([torch.sum((d_hat - d) ** 2 * pairs, dim=(1, 2)), pairs.sum((1, 2))], dim=-1)

    rows, shared = (x_pred, x_true, m), (x_pred, x_true, m)
    if chunk_size is None:
        sums = block(*rows, *shared)
    else:
        sums = chunked(block, rows, shared, chunk_size=chunk_size, reduce="sum")
    return sums[:, 0] / torch.clamp(sums[:, 1] - m.sum(-1), min=1.0)


def training_loss(
    model,
    x0: torch.Tensor,
    mask: torch.Tensor,
    schedule: Schedule,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    aux_distance_weight: float = 0.0,
    aux_distance_cutoff: float = 6.0,
    aux_distance_time_fraction: float = 0.25,
    loss_chunk_size: int | None = None,
) -> torch.Tensor:
    """One Genie training objective: draw ``s`` and ``ε`` (unless given), noise ``x0``,
    predict the noise with ``model.predict_noise`` and return :func:`genie_loss`.

    ``x0`` ``[B, N, 3]``, ``mask`` ``[B, N]``, ``timesteps`` ``[B]``, ``noise`` ``[B, N, 3]``.

    With ``aux_distance_weight > 0`` (not in Genie; FrameDiff's auxiliary loss), adds
    ``weight · mean_b([s_b < fraction·T] · pairwise_distance_loss(x̂0, x0))`` where
    ``x̂0 = (x_t - sqrt(1-ᾱ_s) ε̂) / sqrt(ᾱ_s)`` is the clean structure the predicted noise
    implies; ``loss_chunk_size`` computes that term in blocks of rows.
    """
    if timesteps is None:
        timesteps = sample_timesteps(x0.shape[0], schedule.n_timestep, generator, x0.device)
    xt, noise = q_sample(x0, timesteps, mask, schedule, noise=noise, generator=generator)
    eps_pred = model.predict_noise(xt, timesteps, mask)
    loss = genie_loss(eps_pred, noise, mask)
    if aux_distance_weight:
        work = loss.dtype
        a = schedule.sqrt_alphas_cumprod.to(device=x0.device, dtype=work)[timesteps].view(-1, 1, 1)
        b = schedule.sqrt_one_minus_alphas_cumprod.to(device=x0.device, dtype=work)[timesteps].view(-1, 1, 1)
        x0_pred = (xt.to(work) - b * eps_pred.to(work)) / a
        aux = pairwise_distance_loss(x0_pred, x0, mask, aux_distance_cutoff, loss_chunk_size)
        early = (timesteps < aux_distance_time_fraction * schedule.n_timestep).to(work)
        loss = loss + aux_distance_weight * torch.mean(aux * early)
    return loss


def loss_options(config: Config) -> dict[str, Any]:
    """:func:`training_loss`'s keyword arguments from a config (``longseq`` and ``memory``)."""
    return {
        "aux_distance_weight": config["auxDistanceLossWeight"],
        "aux_distance_cutoff": config["auxDistanceCutoff"],
        "aux_distance_time_fraction": config["auxDistanceTimeFraction"],
        "loss_chunk_size": config["lossChunkSize"] or None,
    }
