"""Genie's pair transform net: triangle updates (genie-tk), optional triangle
attention (genie-tk) and a pair transition, per layer.

The triangle modules come from genie-tk's public, OpenFold-compatible API, so
their ``state_dict`` keys are Genie's and the ``tk`` CUDA kernels take over on
GPU with no change here.
"""

from __future__ import annotations

import torch
from torch import nn

from flash_genie.model.primitives import Linear, SharedDropout
from genie_tk import (
    TriangleAttentionEndingNode,
    TriangleAttentionStartingNode,
    TriangleMultiplicationIncoming,
    TriangleMultiplicationOutgoing,
)


class PairTransition(nn.Module):
    """AF2 Algorithm 15 with the output masked: ``(Linear(ReLU(Linear(LN(z))))) · m``."""

    def __init__(self, c_z: int, n: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c_z)
        self.linear_1 = Linear(c_z, n * c_z, init="relu")
        self.linear_2 = Linear(n * c_z, c_z, init="final")

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``z`` ``[*, N, N, C]``, ``mask`` ``[*, N, N]`` -> update ``[*, N, N, C]``."""
        z = self.linear_2(torch.relu(self.linear_1(self.layer_norm(z))))
        return z * mask.unsqueeze(-1).to(z.dtype)


class PairTransformLayer(nn.Module):
    """One layer, in Genie's order, each update added residually:
    tri-mul outgoing, tri-mul incoming, [tri-att start, tri-att end], transition;
    then the pair mask. Dropout (training only) is row-wise except after the
    ending-node attention, which is column-wise.
    """

    def __init__(
        self,
        c_p: int,
        include_mul_update: bool,
        include_tri_att: bool,
        c_hidden_mul: int,
        c_hidden_tri_att: int,
        n_head_tri: int,
        tri_dropout: float,
        pair_transition_n: int,
    ):
        super().__init__()
        self.tri_mul_out = TriangleMultiplicationOutgoing(c_p, c_hidden_mul) if include_mul_update else None
        self.tri_mul_in = TriangleMultiplicationIncoming(c_p, c_hidden_mul) if include_mul_update else None
        # c_hidden_tri_att is the width of one head, as in Genie and OpenFold.
        self.tri_att_start = (
            TriangleAttentionStartingNode(c_p, c_hidden_tri_att, n_head_tri) if include_tri_att else None
        )
        self.tri_att_end = (
            TriangleAttentionEndingNode(c_p, c_hidden_tri_att, n_head_tri) if include_tri_att else None
        )
        self.pair_transition = PairTransition(c_p, pair_transition_n)
        self.dropout_row = SharedDropout(tri_dropout, shared_dim=-3)
        self.dropout_col = SharedDropout(tri_dropout, shared_dim=-2)

    def forward(
        self, p: torch.Tensor, pair_mask: torch.Tensor, chunk_size: int | None = None
    ) -> torch.Tensor:
        """``p`` ``[B, N, N, c_p]``, ``pair_mask`` ``[B, N, N]`` -> ``[B, N, N, c_p]``.

        ``chunk_size`` bounds the rows the triangle attention processes at once
        (no numerical effect).
        """
        if self.tri_mul_out is not None:
            p = p + self.dropout_row(self.tri_mul_out(p, mask=pair_mask))
            p = p + self.dropout_row(self.tri_mul_in(p, mask=pair_mask))
        if self.tri_att_start is not None:
            p = p + self.dropout_row(self.tri_att_start(p, mask=pair_mask, chunk_size=chunk_size))
            p = p + self.dropout_col(self.tri_att_end(p, mask=pair_mask, chunk_size=chunk_size))
        p = p + self.pair_transition(p, pair_mask)
        return p * pair_mask.unsqueeze(-1).to(p.dtype)


class PairTransformNet(nn.Module):
    """``n_pair_transform_layer`` :class:`PairTransformLayer` s (keys ``net.{i}.*``)."""

    def __init__(self, c_p: int, n_pair_transform_layer: int, **layer_kwargs):
        super().__init__()
        self.chunk_size: int | None = None
        self.net = nn.ModuleList(PairTransformLayer(c_p, **layer_kwargs) for _ in range(n_pair_transform_layer))

    def forward(self, p: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """``p`` ``[B, N, N, c_p]``, ``pair_mask`` ``[B, N, N]`` -> ``[B, N, N, c_p]``."""
        for layer in self.net:
            # The one place where per-layer memory options (activation
            # checkpointing, sequence parallelism) will wrap the layer call.
            p = layer(p, pair_mask, chunk_size=self.chunk_size)
        return p
