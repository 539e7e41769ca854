"""Frenet–Serret frames of Cα traces, as Genie builds its residue frames.

For a chain of length ``L`` and a residue ``1 <= i <= L-2`` (0-based), with
``unit(v) = v / sqrt(eps + |v|²)``:

* ``t_i = unit(x_{i+1} - x_i)`` (forward bond),
* ``b_i = unit(unit(x_i - x_{i-1}) × t_i)``,
* ``n_i = b_i × t_i``,
* ``R_i`` has columns ``[t_i, b_i, n_i]``.

Note that ``[t, b, b × t]`` is left-handed: these "rotations" have determinant
-1. That is Genie's convention and its weights are trained on it, so it is kept.

Residue 0 copies ``R_1``, residue ``L-1`` copies ``R_{L-2}``; padded slots, and
every slot of a chain with ``L <= 2``, are the identity. Collinear triples give
``b = n = 0`` (a degenerate "rotation"), exactly as in Genie.

Deviation from the original: Genie calls ``torch.cross`` without ``dim``, which
crosses along the *first* axis of size 3, i.e. over the batch when the batch
size is 3 or over residues when the padded length is 5. Here the cross product
is always the intended per-residue one (last axis); on every other shape the
two agree.
"""

from __future__ import annotations

import torch

from flash_genie.model.rigid import Rigid


def _unit(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v / torch.sqrt(eps + torch.sum(v * v, dim=-1, keepdim=True))


def prefix_lengths(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Chain lengths ``[B]`` (int64) of a ``[B, N]`` mask that must be a prefix of ones.

    Raises ``ValueError`` if an entry is not 0/1 or a 1 follows a 0 in some row.
    """
    if mask.dim() != 2:
        raise ValueError(f"{name} must have shape [B, N], got {tuple(mask.shape)}")
    m = mask.to(torch.float32) if mask.dtype == torch.bool else mask
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError(f"{name} must contain only 0 and 1")
    if bool((m[:, 1:] > m[:, :-1]).any()):
        raise ValueError(
            f"{name} must be a contiguous prefix of ones in every row (real residues first, "
            "padding after): Genie's frames take the chain length from the mask sum"
        )
    return m.sum(-1).round().long()


def frenet_frames(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Rotations ``[B, N, 3, 3]`` of the Frenet–Serret frames of ``x`` ``[B, N, 3]``.

    ``mask`` ``[B, N]`` is a prefix mask (see :func:`prefix_lengths`). The frames
    are computed in at least float32 (so bf16 inputs stay well conditioned) and
    returned in ``x.dtype``.
    """
    if x.dim() != 3 or x.shape[-1] != 3:
        raise ValueError(f"x must have shape [B, N, 3], got {tuple(x.shape)}")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must have shape [B, N] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    lengths = prefix_lengths(mask)[:, None]  # [B, 1]
    batch, n_res = mask.shape
    work = torch.promote_types(x.dtype, torch.float32)
    eye = torch.eye(3, dtype=work, device=x.device).expand(batch, n_res, 3, 3)
    if n_res < 3:
        return eye.to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        xw = x.to(work)
        t = _unit(xw[:, 1:] - xw[:, :-1], eps)  # [B, N-1, 3]: t[k] = unit(x_{k+1} - x_k)
        b = _unit(torch.linalg.cross(t[:, :-1], t[:, 1:], dim=-1), eps)  # residues 1..N-2
        n = torch.linalg.cross(b, t[:, 1:], dim=-1)
        tbn = torch.stack([t[:, 1:], b, n], dim=-1)  # [B, N-2, 3, 3], columns t, b, n
        # Residue i takes the frame of residue clamp(i, 1, L-2), stored at index that - 1.
        idx = torch.arange(n_res, device=x.device)[None, :]
        src = (torch.minimum(idx.clamp(min=1), lengths - 2) - 1).clamp(0, n_res - 3)
        rots = torch.gather(tbn, 1, src[..., None, None].expand(batch, n_res, 3, 3))
        valid = (idx < lengths) & (lengths > 2)
        rots = torch.where(valid[..., None, None], rots, eye)
    return rots.to(x.dtype)


def frenet_rigid(x: torch.Tensor, mask: torch.Tensor) -> Rigid:
    """The input frames of the denoiser: Frenet rotations of ``x`` and translations ``x``."""
    return Rigid(frenet_frames(x, mask), x)
