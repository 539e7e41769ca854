"""Genie's variance schedules and the DDPM quantities derived from them.

Every array is computed with the original's operations in the requested
dtype. ``dtype=torch.float32`` (the default) reproduces the numbers the
original computes at its normal default dtype, bit for bit on CPU: those are
the numbers the published checkpoints were trained and sampled with, and they
differ from the exact values by up to 1.7 % in ``betas`` at small ``s``.
``dtype=torch.float64`` gives the exact schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

SCHEDULES = ("cosine", "linear")


def cosine_betas(n_timestep: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[T]`` betas of ``f(u) = cos²(π/2 · u/(T+1))``, ``u = 0..T``.

    Genie's variant: no Nichol–Dhariwal offset, divisor ``T + 1``;
    ``beta_i = min(1 - f(i+1)/f(i), 0.999)`` (the clip never binds at T = 1000).
    """
    steps = n_timestep + 1
    u = torch.linspace(0, n_timestep, steps, dtype=dtype)
    f = torch.cos((u / steps) * math.pi * 0.5) ** 2
    f = f / f[0]
    return torch.clip(1 - (f[1:] / f[:-1]), 0, 0.999)


def linear_betas(
    n_timestep: int, dtype: torch.dtype = torch.float32, start: float = 1e-4, end: float = 0.02
) -> torch.Tensor:
    """``[T]`` betas evenly spaced from ``start`` to ``end``."""
    return torch.linspace(start, end, n_timestep, dtype=dtype)


@dataclass(frozen=True)
class Schedule:
    """The 16 ``[T]`` schedule arrays of Genie, indexed by the timestep ``s = 0..T-1``."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    one_minus_alphas_cumprod: torch.Tensor
    one_minus_alphas_cumprod_prev: torch.Tensor
    sqrt_betas: torch.Tensor
    sqrt_alphas: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod_prev: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    posterior_variance: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> Schedule:
        """Derive every array from ``betas`` ``[T]``, in its dtype, with the original's operations."""
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=ac.dtype, device=ac.device), ac[:-1]])
        one_minus_ac = 1.0 - ac
        one_minus_ac_prev = 1.0 - ac_prev
        sqrt_ac = torch.sqrt(ac)
        sqrt_alphas = torch.sqrt(alphas)
        sqrt_ac_prev = torch.sqrt(ac_prev)
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            one_minus_alphas_cumprod=one_minus_ac,
            one_minus_alphas_cumprod_prev=one_minus_ac_prev,
            sqrt_betas=torch.sqrt(betas),
            sqrt_alphas=sqrt_alphas,
            sqrt_alphas_cumprod=sqrt_ac,
            sqrt_alphas_cumprod_prev=sqrt_ac_prev,
            sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=1.0 / sqrt_ac,
            sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / ac - 1),
            posterior_mean_coef1=betas * sqrt_ac_prev / one_minus_ac,
            posterior_mean_coef2=one_minus_ac_prev * sqrt_alphas / one_minus_ac,
            posterior_variance=betas * one_minus_ac_prev / one_minus_ac,
        )

    @property
    def n_timestep(self) -> int:
        return self.betas.shape[0]

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to(self, *args, **kwargs) -> Schedule:
        """Move/cast every array (``Tensor.to`` arguments). Cast *after* computing: a
        float64 cast of the float32 schedule keeps the float32 numbers."""
        return Schedule(**{k: v.to(*args, **kwargs) for k, v in self.as_dict().items()})


def make_schedule(
    n_timestep: int = 1000,
    kind: str = "cosine",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Schedule:
    """Genie's schedule ``kind`` (``cosine`` or ``linear``) over ``n_timestep`` steps,
    computed in ``dtype`` (see the module docstring) and placed on ``device``."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {kind!r}")
    if n_timestep < 1:
        raise ValueError(f"n_timestep must be >= 1, got {n_timestep}")
    betas = cosine_betas(n_timestep, dtype) if kind == "cosine" else linear_betas(n_timestep, dtype)
    schedule = Schedule.from_betas(betas)
    return schedule if device is None else schedule.to(device)
