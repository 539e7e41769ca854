"""Axial attention over the pair representation: row and column self-attention without the
triangle bias (``useAxialAttention True``, an approximate mode).

Row attention (``starting=True``) updates pair ``(i, j)`` from the pairs of the same row::

    out_ij = Linear_o( sigmoid(Linear_g(x_ij)) ⊙ Σ_k softmax_k(q_ij · k_ik / √d + mask_ik) v_ik ),
    x = LayerNorm(z)

and column attention (``starting=False``) from the pairs of the same column (the input
transposed). This is triangle attention (AF2 Algorithms 13/14) without the term
``b_jk = Linear(x_jk)`` that couples the third edge of the triangle: each row is an
independent sequence, which standard fused attention kernels
(:func:`torch.nn.functional.scaled_dot_product_attention`) run as they are.

Complexity, honestly: for ``N`` residues, ``H`` heads of width ``d`` and ``C`` channels,

* compute ``O(N³·H·d)`` for the attention (``N`` rows, each an ``N × N`` attention) plus
  ``O(N²·C·H·d)`` for the projections: the same order as triangle attention, which adds
  only the ``O(N²·C·H)`` bias projection and ``O(N³·H)`` bias additions (and, in backward,
  the ``O(N³·H)`` reduction of the bias gradient over rows);
* memory ``O(N²·C)`` for the projections kept for backward (as triangle attention) plus the
  attention's working set: ``O(chunk·N²·H)`` logits for a block of ``chunk`` rows with the
  math kernel, ``O(chunk·N·H·d)`` with a fused kernel. What it saves is the ``[B, H, N, N]``
  triangle bias, its gradient, and the cross-row reduction; it is not sub-cubic.

The measured cost against triangle attention is in ``benchmarks/approx_modes.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flash_genie.model.chunking import chunked
from genie_tk.modules import Attention


class AxialAttention(nn.Module):
    """Gated row (``starting=True``) or column attention over ``z`` ``[B, N, N, C]``.

    Parameters as genie-tk's / OpenFold's ``TriangleAttention`` minus the bias projection
    ``linear``: ``layer_norm``, ``mha.linear_{q,k,v,g,o}``. ``c_hidden`` is one head's width.
    """

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, starting: bool = True, inf: float = 1e9):
        super().__init__()
        self.c_in, self.c_hidden, self.no_heads = c_in, c_hidden, no_heads
        self.starting, self.inf = starting, inf
        self.layer_norm = nn.LayerNorm(c_in)
        self.mha = Attention(c_in, c_in, c_in, c_hidden, no_heads)

    def forward(self, z: torch.Tensor, mask: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """``z`` ``[B, N, N, C]``, ``mask`` ``[B, N, N]`` -> update ``[B, N, N, C]``.

        ``chunk_size`` runs blocks of that many rows and recomputes them in backward
        (:func:`~flash_genie.model.chunking.chunked`); same numbers.
        """
        if z.dim() != 4 or mask.shape != z.shape[:-1]:
            raise ValueError(f"expected z [B, N, N, C] and mask [B, N, N], got {tuple(z.shape)} and "
                             f"{tuple(mask.shape)}")
        if not self.starting:
            z, mask = z.transpose(-2, -3), mask.transpose(-1, -2)
        x = self.layer_norm(z)
        if chunk_size is None:
            out = self._rows(x, mask)
        else:
            out = chunked(self._rows, (x, mask), params=tuple(self.mha.parameters()), chunk_size=chunk_size)
        return out if self.starting else out.transpose(-2, -3)

    def _rows(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention within each row of ``x`` ``[B, I, N, C]`` (``mask`` ``[B, I, N]``)."""
        mha, h, d = self.mha, self.no_heads, self.c_hidden

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, I, N, H*d] -> [B, I, H, N, d]
            return t.unflatten(-1, (h, d)).transpose(-2, -3)

        q, k, v = heads(mha.linear_q(x)), heads(mha.linear_k(x)), heads(mha.linear_v(x))
        # A finite mask bias (as triangle attention's), clamped to the dtype's range for float16.
        bias = self.inf * (mask.to(q.dtype) - 1)
        bias = bias.clamp(min=-torch.finfo(q.dtype).max)[:, :, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0 / math.sqrt(d))
        o = o.transpose(-2, -3).flatten(-2)  # [B, I, N, H*d]
        return mha.linear_o(o * torch.sigmoid(mha.linear_g(x)))
