"""Genie's ancestral (DDPM) sampler with a noise scale."""

from __future__ import annotations

from typing import NamedTuple

import torch

from flash_genie.diffusion.schedule import Schedule
from flash_genie.model.frames import frenet_frames, prefix_lengths


class Samples(NamedTuple):
    """Sampler output: final Cα coordinates ``x`` ``[B, N, 3]`` (zero at padding), their
    Frenet frames ``rots`` ``[B, N, 3, 3]`` and, if requested, ``trajectory``
    ``[T+1, B, N, 3]`` (``trajectory[0]`` is ``x_T``)."""

    x: torch.Tensor
    rots: torch.Tensor
    trajectory: torch.Tensor | None


def p_step(
    model,
    schedule: Schedule,
    x: torch.Tensor,
    s: int,
    mask: torch.Tensor,
    noise_scale: float,
    z: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One reverse step from ``x`` ``[B, N, 3]`` at timestep ``s`` (shared by the batch).

    ``mean = (x - w·ε̂) / sqrt(α_s)`` with ``w = (1 - α_s)/sqrt(1 - ᾱ_s)`` (Genie writes
    ``1 - α_s``, not ``β_s``: equal up to rounding), masked; for ``s > 0`` the result is
    ``(mean + noise_scale·sqrt(β_s)·z)·mask`` with ``z`` drawn from ``generator`` unless
    given; for ``s = 0`` it is the mean and nothing is drawn.
    """
    m = mask.to(x.dtype).unsqueeze(-1)
    steps = torch.full((x.shape[0],), s, dtype=torch.long, device=x.device)
    eps_hat = model.predict_noise(x, steps, mask)
    alpha, sqrt_alpha, sqrt_one_minus_ac, sqrt_beta = (
        getattr(schedule, k)[s].to(x)
        for k in ("alphas", "sqrt_alphas", "sqrt_one_minus_alphas_cumprod", "sqrt_betas")
    )
    w = (1.0 - alpha) / sqrt_one_minus_ac
    mean = (1.0 / sqrt_alpha) * (x - w * eps_hat) * m
    if s == 0:
        return mean
    if z is None:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (mean + noise_scale * sqrt_beta * z) * m


def sample(
    model,
    mask: torch.Tensor,
    schedule: Schedule,
    noise_scale: float = 0.6,
    *,
    generator: torch.Generator | None = None,
    x_init: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    return_trajectory: bool = False,
    autocast: torch.dtype | None = None,
) -> Samples:
    """Run all ``T`` reverse steps, ``s = T-1, …, 0`` (Genie's ``p_sample_loop``).

    Args:
        model: a denoiser with ``predict_noise`` (e.g. from :func:`flash_genie.load_genie`),
            in eval mode.
        mask: ``[B, N]`` prefix mask; its row sums are the chain lengths.
        schedule: a :class:`Schedule` with ``T`` steps (``make_schedule(...)``; float32
            reproduces the published behaviour).
        noise_scale: multiplies the posterior standard deviation (0.6 in Genie's script).
        generator: source of every draw: first ``x_T ~ N(0, 1 Å²)`` ``[B, N, 3]``, then one
            ``[B, N, 3]`` draw per step for ``s = T-1 … 1`` (the order of the original, so
            a generator seeded like the original's global RNG replays its run).
        x_init: ``[B, N, 3]`` draw to use for ``x_T`` instead (masked here).
        z: ``[T-1, B, N, 3]`` draws to use instead; ``z[k]`` is used at ``s = T-1-k``.
        return_trajectory: also return every intermediate ``x``.
        autocast: run the denoiser under autocast to this dtype (``torch.bfloat16``:
            half the activation memory and faster matmuls on GPUs; the sampler's own
            arithmetic, the frames and the returned coordinates stay in the model's dtype).

    Runs in ``torch.inference_mode`` (no autograd state at all); the model's memory
    options (chunked IPA, pair transition and triangle attention) bound its activations.
    """
    dtype = getattr(model, "dtype", torch.float32)
    device = mask.device
    prefix_lengths(mask)
    n_steps = schedule.n_timestep
    if getattr(model, "n_timestep", n_steps) != n_steps:
        raise ValueError(f"the schedule has {n_steps} steps but the model was built for {model.n_timestep}")
    shape = (*mask.shape, 3)
    if z is not None and tuple(z.shape) != (n_steps - 1, *shape):
        raise ValueError(f"z must have shape {(n_steps - 1, *shape)}, got {tuple(z.shape)}")
    if x_init is None:
        x_init = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    elif tuple(x_init.shape) != shape:
        raise ValueError(f"x_init must have shape {shape}, got {tuple(x_init.shape)}")
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        x = x_init.to(dtype) * mask.to(dtype).unsqueeze(-1)
        trajectory = [x] if return_trajectory else None
        for k, s in enumerate(range(n_steps - 1, -1, -1)):
            z_k = None if z is None or s == 0 else z[k].to(dtype)
            x = p_step(model, schedule, x, s, mask, noise_scale, z=z_k, generator=generator)
            if trajectory is not None:
                trajectory.append(x)
        traj = torch.stack(trajectory) if trajectory is not None else None
        rots = frenet_frames(x, mask)
    # Ordinary tensors (inference tensors cannot enter autograd later).
    return Samples(x.clone(), rots.clone(), None if traj is None else traj.clone())
