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
    padded_length: int | None = None,
) -> torch.Tensor:
    """One reverse step from ``x`` ``[B, N, 3]`` at timestep ``s`` (shared by the batch).

    ``mean = (x - w·ε̂) / sqrt(α_s)`` with ``w = (1 - α_s)/sqrt(1 - ᾱ_s)`` (Genie writes
    ``1 - α_s``, not ``β_s``: equal up to rounding), masked; for ``s > 0`` the result is
    ``(mean + noise_scale·sqrt(β_s)·z)·mask`` with ``z`` drawn from ``generator`` unless
    given; for ``s = 0`` it is the mean and nothing is drawn. ``padded_length`` goes to
    ``model.predict_noise`` (a batch run without its padding, see :func:`sample`).
    """
    m = mask.to(x.dtype).unsqueeze(-1)
    steps = torch.full((x.shape[0],), s, dtype=torch.long, device=x.device)
    kwargs = {} if padded_length is None else {"padded_length": padded_length}
    eps_hat = model.predict_noise(x, steps, mask, **kwargs)
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
    trim_padding: bool = True,
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
        trim_padding: run a flash-genie denoiser (dense pairs) only over the first
            ``max(lengths)`` positions when every chain is shorter than ``N``: padded
            residues enter its layers only through the masks, so the real residues get
            the padded run's numbers up to rounding (Genie's residue-index encoding
            keeps the padded length as its scale), at ``(max(lengths) / N)²`` of the pair
            work. The draws are still made at ``[B, N, 3]``, in the same order, and the
            result is returned padded: only the arithmetic changes. ``False`` computes
            the padded slots too, as the original does.

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
    n_res = mask.shape[1]
    keep = _trimmed_length(model, mask) if trim_padding else n_res
    padded = None if keep == n_res else n_res
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        full = x_init.to(dtype) * mask.to(dtype).unsqueeze(-1)
        x, run_mask = full[:, :keep], mask[:, :keep]
        trajectory = [full] if return_trajectory else None
        for k, s in enumerate(range(n_steps - 1, -1, -1)):
            z_k = None
            if s > 0 and z is not None:
                z_k = z[k, :, :keep].to(dtype)
            elif s > 0 and padded is not None:  # the full draw, as the padded run makes it
                z_k = torch.randn(shape, generator=generator, dtype=dtype, device=device)[:, :keep]
            x = p_step(model, schedule, x, s, run_mask, noise_scale, z=z_k, generator=generator,
                       padded_length=padded)
            if trajectory is not None:
                trajectory.append(_pad(x, n_res))
        x = _pad(x, n_res)
        traj = torch.stack(trajectory) if trajectory is not None else None
        rots = frenet_frames(x, mask)
    # Ordinary tensors (inference tensors cannot enter autograd later).
    return Samples(x.clone(), rots.clone(), None if traj is None else traj.clone())


def _trimmed_length(model, mask: torch.Tensor) -> int:
    """Positions the sampler computes: the longest chain for a dense flash-genie denoiser
    (whose padded residues only enter through the masks), all ``N`` otherwise."""
    from flash_genie.model.approx import Approximations
    from flash_genie.model.denoiser import Denoiser

    n_res = mask.shape[1]
    if not isinstance(model, Denoiser) or model.approx != Approximations() or not n_res:
        return n_res
    return max(1, int(prefix_lengths(mask).max()))


def _pad(x: torch.Tensor, n_res: int) -> torch.Tensor:
    """``x`` ``[B, n, 3]`` zero-padded to ``[B, n_res, 3]``."""
    if x.shape[1] == n_res:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], n_res - x.shape[1], x.shape[2]))], dim=1)
