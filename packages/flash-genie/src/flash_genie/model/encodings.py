"""Index encodings of Genie's feature nets."""

from __future__ import annotations

import math

import torch


def sinusoidal_encoding(v: torch.Tensor, scale: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Genie's sinusoidal encoding ``[*, dim]`` of integer positions ``v`` ``[*]``.

    Channel ``j`` (0-based) is ``cos(v·π / scale^(2j/dim))`` for even ``j`` and
    ``sin(v·π / scale^(2(j+1)/dim))`` for odd ``j``: the factor is π, not 1, and
    cos/sin channels interleave without sharing frequencies. ``scale`` is the
    padded length for residue indices and ``n_timestep`` for timesteps. Computed
    in ``dtype`` with the original's order of operations, so a float32 model sees
    the same rounding as the original's float32 run.
    """
    j = torch.arange(dim, device=v.device)
    exponent = (2 * (j + j % 2)).to(dtype) / dim  # 2j/D for even j, 2(j+1)/D for odd j
    angle = v.to(dtype).unsqueeze(-1) * math.pi / scale**exponent
    return torch.where(j % 2 == 0, torch.cos(angle), torch.sin(angle))


def relative_position_bins(
    n_res: int, k: int, device: torch.device | None = None, rows: slice | None = None
) -> torch.Tensor:
    """``clip(i - j, -k, k) + k`` as ``[N, N]`` int64: row index minus column index.

    ``rows`` keeps only those rows ``i`` (``[len(rows), N]``), as a sequence-parallel rank needs.
    """
    r = torch.arange(n_res, device=device)
    i = r if rows is None else r[rows]
    return (i[:, None] - r[None, :]).clamp(-k, k) + k
