"""Genie's pair transform net: triangle updates (genie-tk), optional triangle
attention (genie-tk) and a pair transition, per layer.

The triangle modules come from genie-tk's public, OpenFold-compatible API, so
their ``state_dict`` keys are Genie's and the ``tk`` CUDA kernels take over on
GPU with no change here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flash_genie.model.axial import AxialAttention
from flash_genie.model.chunking import chunked
from flash_genie.model.primitives import Linear, SharedDropout
from genie_tk import (
    TriangleAttentionEndingNode,
    TriangleAttentionStartingNode,
    TriangleMultiplicationIncoming,
    TriangleMultiplicationOutgoing,
)

#: Elements of the transition's hidden layer per block in inference (1 MiB of float32).
_CACHE_ELEMENTS = 1 << 18


class PairTransition(nn.Module):
    """AF2 Algorithm 15 with the output masked: ``(Linear(ReLU(Linear(LN(z))))) · m``."""

    def __init__(self, c_z: int, n: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c_z)
        self.linear_1 = Linear(c_z, n * c_z, init="relu")
        self.linear_2 = Linear(n * c_z, c_z, init="final")

    def forward(self, z: torch.Tensor, mask: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """``z`` ``[B, N, N, C]``, ``mask`` ``[B, N, N]`` -> update ``[B, N, N, C]``.

        ``chunk_size`` evaluates blocks of that many rows and recomputes them in
        backward (:func:`~flash_genie.model.chunking.chunked`), so the ``4·C``-wide
        hidden layer exists for one block at a time.
        """
        if chunk_size is not None:
            return chunked(self._update, (z, mask), params=tuple(self.parameters()), chunk_size=chunk_size)
        if torch.is_grad_enabled() and (z.requires_grad or self.linear_1.weight.requires_grad):
            return self._update(z, mask)
        # Inference: blocks of rows whose hidden layer stays in cache between the passes.
        rows = max(1, _CACHE_ELEMENTS // max(1, z.shape[0] * z.shape[2] * self.linear_1.out_features))
        if rows >= z.shape[1]:
            return self._update(z, mask)
        out = torch.empty_like(z)
        for i0 in range(0, z.shape[1], rows):
            out[:, i0 : i0 + rows] = self._update(z[:, i0 : i0 + rows], mask[:, i0 : i0 + rows])
        return out

    def _update(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.linear_2(torch.relu(self.linear_1(self.layer_norm(z))))
        return z * mask.unsqueeze(-1).to(z.dtype)


class PairTransformLayer(nn.Module):
    """One layer, in Genie's order, each update added residually:
    tri-mul outgoing, tri-mul incoming, [tri-att start, tri-att end], transition;
    then the pair mask. Dropout (training only) is row-wise except after the
    ending-node attention, which is column-wise.

    ``axial=True`` (approximate mode ``useAxialAttention``) puts row and column
    attention (:class:`~flash_genie.model.axial.AxialAttention`, modules ``row_att`` and
    ``col_att``) where triangle attention would be, whether or not
    ``include_tri_att`` asks for triangle attention.
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
        axial: bool = False,
    ):
        super().__init__()
        self.tri_mul_out = TriangleMultiplicationOutgoing(c_p, c_hidden_mul) if include_mul_update else None
        self.tri_mul_in = TriangleMultiplicationIncoming(c_p, c_hidden_mul) if include_mul_update else None
        # c_hidden_tri_att is the width of one head, as in Genie and OpenFold.
        triangle = include_tri_att and not axial
        self.tri_att_start = TriangleAttentionStartingNode(c_p, c_hidden_tri_att, n_head_tri) if triangle else None
        self.tri_att_end = TriangleAttentionEndingNode(c_p, c_hidden_tri_att, n_head_tri) if triangle else None
        self.row_att = AxialAttention(c_p, c_hidden_tri_att, n_head_tri, starting=True) if axial else None
        self.col_att = AxialAttention(c_p, c_hidden_tri_att, n_head_tri, starting=False) if axial else None
        self.pair_transition = PairTransition(c_p, pair_transition_n)
        self.dropout_row = SharedDropout(tri_dropout, shared_dim=-3)
        self.dropout_col = SharedDropout(tri_dropout, shared_dim=-2)

    def forward(
        self,
        p: torch.Tensor,
        pair_mask: torch.Tensor,
        chunk_size: int | None = None,
        transition_chunk_size: int | None = None,
        inplace: bool = False,
    ) -> torch.Tensor:
        """``p`` ``[B, N, N, c_p]``, ``pair_mask`` ``[B, N, N]`` -> ``[B, N, N, c_p]``.

        ``chunk_size`` bounds the rows the triangle attention processes at once,
        ``transition_chunk_size`` those of the pair transition; ``inplace`` adds each
        residual into its freshly computed update and masks in place. None of the
        three changes a number.
        """
        if self.tri_mul_out is not None:
            p = _residual(p, self.dropout_row(self.tri_mul_out(p, mask=pair_mask)), inplace)
            p = _residual(p, self.dropout_row(self.tri_mul_in(p, mask=pair_mask)), inplace)
        if self.tri_att_start is not None:
            p = _residual(p, self.dropout_row(self.tri_att_start(p, mask=pair_mask, chunk_size=chunk_size)), inplace)
            p = _residual(p, self.dropout_col(self.tri_att_end(p, mask=pair_mask, chunk_size=chunk_size)), inplace)
        if self.row_att is not None:
            p = _residual(p, self.dropout_row(self.row_att(p, pair_mask, chunk_size=chunk_size)), inplace)
            p = _residual(p, self.dropout_col(self.col_att(p, pair_mask, chunk_size=chunk_size)), inplace)
        p = _residual(p, self.pair_transition(p, pair_mask, transition_chunk_size), inplace)
        mask = pair_mask.unsqueeze(-1).to(p.dtype)
        return p.mul_(mask) if inplace else p * mask


def _residual(p: torch.Tensor, update: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``p + update``; with ``inplace``, written into ``update`` when it is a fresh dense
    tensor of the sum's dtype (float addition commutes, so the sum is the same number; under
    autocast a bfloat16 update is not, as the sum with the float32 stream is float32).
    Autograd refuses the in-place add if anything kept ``update`` for backward, so a misuse
    is an error, never a wrong gradient."""
    if (inplace and update._base is None and update.is_contiguous() and update.shape == p.shape
            and update.dtype == torch.promote_types(p.dtype, update.dtype)):
        return update.add_(p)
    return p + update


class PairTransformNet(nn.Module):
    """``n_pair_transform_layer`` :class:`PairTransformLayer` s (keys ``net.{i}.*``).

    ``shared=True`` (model compression) keeps one layer (``net.0.*``) and applies it
    ``n_pair_transform_layer`` times, as a universal transformer does.

    Memory options (see :mod:`flash_genie.model.options`): ``chunk_size`` (triangle
    attention rows), ``transition_chunk_size``, ``inplace``; ``forward``'s
    ``checkpoint_layers`` recomputes the first that many layer calls in backward.
    """

    def __init__(self, c_p: int, n_pair_transform_layer: int, *, shared: bool = False, **layer_kwargs):
        super().__init__()
        self.chunk_size: int | None = None
        self.transition_chunk_size: int | None = None
        self.inplace = False
        self.n_layer = n_pair_transform_layer
        n_modules = min(1, n_pair_transform_layer) if shared else n_pair_transform_layer
        self.net = nn.ModuleList(PairTransformLayer(c_p, **layer_kwargs) for _ in range(n_modules))

    def calls(self) -> list[PairTransformLayer]:
        """The layers in the order they run (one module repeated when shared)."""
        return [self.net[i % len(self.net)] for i in range(self.n_layer)] if len(self.net) else []

    def forward(self, p: torch.Tensor, pair_mask: torch.Tensor, checkpoint_layers: int = 0) -> torch.Tensor:
        """``p`` ``[B, N, N, c_p]``, ``pair_mask`` ``[B, N, N]`` -> ``[B, N, N, c_p]``."""
        options = {"chunk_size": self.chunk_size, "transition_chunk_size": self.transition_chunk_size,
                   "inplace": self.inplace}
        for index, layer in enumerate(self.calls()):
            # The one place where per-layer memory options (activation
            # checkpointing, sequence parallelism) wrap the layer call.
            if index < checkpoint_layers and torch.is_grad_enabled():
                # Non-reentrant checkpointing restores the RNG, so dropout masks repeat exactly.
                p = checkpoint(layer, p, pair_mask, use_reentrant=False, **options)
            else:
                p = layer(p, pair_mask, **options)
        return p
