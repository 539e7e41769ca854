"""Rigid transforms as plain ``(rots, trans)`` tensor pairs.

A frame maps local points to global ones: ``x_global = R @ x_local + t``.
Rotations are ``[*, 3, 3]`` matrices whose columns are the local axes.

Products are written as elementwise multiply-and-sum rather than ``matmul``:
autocast leaves elementwise ops alone, so under bf16 autocast the frames stay
in the (float32) precision of their inputs instead of drifting over the
structure layers (the reason OpenFold's ``rot_matmul`` exists).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Rigid(NamedTuple):
    """A batch of rigid transforms: ``rots`` ``[*, 3, 3]``, ``trans`` ``[*, 3]``."""

    rots: torch.Tensor
    trans: torch.Tensor

    def compose(self, other: Rigid) -> Rigid:
        """``self ∘ other``: apply ``other`` first, ``R = R1 R2``, ``t = R1 t2 + t1``."""
        rots = torch.sum(self.rots.unsqueeze(-1) * other.rots.unsqueeze(-3), dim=-2)
        return Rigid(rots, rotate(self.rots, other.trans) + self.trans)

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        """Local to global; ``points`` ``[*, P, 3]`` broadcast against frames ``[*]``."""
        return rotate(self.rots.unsqueeze(-3), points) + self.trans.unsqueeze(-2)

    def invert_apply(self, points: torch.Tensor) -> torch.Tensor:
        """Global to local, ``Rᵀ (x - t)``; ``points`` ``[*, P, 3]``."""
        local = points - self.trans.unsqueeze(-2)
        return rotate(self.rots.unsqueeze(-3).transpose(-1, -2), local)


def rotate(rots: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``R @ v`` for ``rots`` ``[*, 3, 3]`` and ``vectors`` ``[*, 3]`` (broadcasting)."""
    return torch.sum(rots * vectors.unsqueeze(-2), dim=-1)


def quaternion_to_rotation(quat: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[*, 3, 3]`` of unit quaternions ``[*, 4]`` ordered ``(a, b, c, d)``
    with ``a`` the real part."""
    a, b, c, d = quat.unbind(-1)
    rows = (
        (a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)),
        (2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)),
        (2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d),
    )
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)
