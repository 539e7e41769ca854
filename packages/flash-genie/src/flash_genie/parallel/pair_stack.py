"""The pair stack with its pair tensor split by rows over a process group (Dynamic Axial
Parallelism, FastFold's scheme).

Each rank holds rows ``shard.rows`` of the pair tensor, ``[B, I_r, N, C]``. The operations
that read along rows run on those rows as they are; those that read along columns run on the
rank's rows of the transposed tensor, reached by one all-to-all (:func:`transpose_rows`):

* tri-mul outgoing, ``x_ij = Σ_k a_ik b_jk``: ``a`` local, the row blocks of ``b`` broadcast
  one at a time (:func:`row_gathered_product`);
* tri-mul incoming, ``x_ij = Σ_k a_ki b_kj``, on rows of ``zᵀ``: ``xᵀ_ji = Σ_k bᵀ_jk aᵀ_ik``, the
  same product with ``bᵀ`` local and ``aᵀ`` gathered;
* triangle attention, starting node: the local rows, plus the ``[B, H, N, N]`` triangle bias
  all-gathered (``H`` channels, small next to the pair tensor);
* ending node: the starting-node computation with the ending module's weights on the rows of
  ``zᵀ``, exactly as OpenFold transposes around it;
* pair transition and the pair mask: pointwise, in whichever layout the tensor is in.

A layer with triangle attention makes four all-to-alls, one without makes two. The
attention core is genie-tk's public :func:`genie_tk.triangle_attention`. Like genie-tk's
``torch`` layers, each triangle update keeps only its input rows for backward (and the
attention its gathered bias) and is computed again there (``torch.utils.checkpoint``).

Dropout draws the same full-size shared mask as the single-process layer (same shape, same
generator, same order) and keeps this rank's part, so with equal RNG states on the ranks of
the group a training step is the single-process step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import genie_tk
from flash_genie.model.pair_stack import PairTransformLayer, PairTransformNet
from flash_genie.model.primitives import SharedDropout
from flash_genie.parallel.comm import (
    SequenceShard,
    all_reduce_sum,
    gather_rows,
    row_gathered_product,
    transpose_rows,
)

__all__ = ["pair_layer", "pair_stack"]


def _global_std(t: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """``t.std()`` of the tensor whose blocks the ranks hold, in float32 (two passes,
    differentiable)."""
    t = t.float()
    count = t.numel() // t.shape[1] * shard.n
    mean = all_reduce_sum(t.sum(), shard) / count
    return torch.sqrt(all_reduce_sum(((t - mean) ** 2).sum(), shard) / (count - 1))


def _tri_mul(module, z: torch.Tensor, mask: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    zn = module.layer_norm_in(z)
    m = mask.unsqueeze(-1).to(zn.dtype)
    a = m * torch.sigmoid(module.linear_a_g(zn)) * module.linear_a_p(zn)
    b = m * torch.sigmoid(module.linear_b_g(zn)) * module.linear_b_p(zn)
    if genie_tk.reference.fp16_enabled(z):
        std_a, std_b = _global_std(a, shard), _global_std(b, shard)
        if bool(std_a != 0) and bool(std_b != 0):
            a, b = (a / std_a).float(), (b / std_b).float()
    if isinstance(module, genie_tk.TriangleMultiplicationOutgoing):
        x = row_gathered_product(a, b, shard)
    else:
        x = row_gathered_product(b, a, shard)
    x = module.linear_z(module.layer_norm_out(x.to(zn.dtype)))
    return x * torch.sigmoid(module.linear_g(zn))


def tri_mul(module, z: torch.Tensor, mask: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """A genie-tk ``TriangleMultiplication{Outgoing,Incoming}`` update on split rows.

    ``z`` ``[B, I_r, N, C]`` and ``mask`` ``[B, I_r, N]`` are this rank's rows of the pair
    tensor for the outgoing module and of its transpose for the incoming one; so is the
    result. Same semantics as the module: the mask multiplies ``a`` and ``b``, the gate reads
    the layer-normed input, and in float16 ``a`` and ``b`` are divided by their (global)
    standard deviations and contracted in float32. Only ``z`` is kept for backward, where
    the update is computed again (its broadcasts included, in the same order on every rank).
    """
    return checkpoint(_tri_mul, module, z, mask, shard, use_reentrant=False)


def _attention(module, z, bias, mask, chunk_size):
    mha = module.mha
    x = module.layer_norm(z)

    def heads(t):  # [B, I, N, H*D] -> [B, I, H, N, D]
        return t.unflatten(-1, (module.no_heads, -1)).transpose(-2, -3)

    q, k, v = heads(mha.linear_q(x)), heads(mha.linear_k(x)), heads(mha.linear_v(x))
    o = genie_tk.triangle_attention(q, k, v, bias, mask, inf=module.inf, chunk_size=chunk_size,
                                    backend=module.backend)
    o = o.transpose(-2, -3).flatten(-2) * torch.sigmoid(mha.linear_g(x))
    return mha.linear_o(o)


def tri_att(module, z: torch.Tensor, mask: torch.Tensor, shard: SequenceShard,
            chunk_size: int | None = None) -> torch.Tensor:
    """A genie-tk ``TriangleAttention`` update, starting-node form, on split rows.

    ``z`` ``[B, I_r, N, C]``, ``mask`` ``[B, I_r, N]``: rows of the pair tensor for the
    starting-node module, rows of its transpose for the ending-node one (whose ``starting``
    flag is then ignored: the transposition is the layout). Returns the update's rows.
    """
    bias = module.linear(module.layer_norm(z))  # [B, I_r, N, H]: rows j of bias[b, h, j, k]
    bias = gather_rows(bias, 1, shard).permute(0, 3, 1, 2)
    return checkpoint(_attention, module, z, bias, mask, chunk_size, use_reentrant=False)


def _dropout(module: SharedDropout, x: torch.Tensor, transposed: bool, shard: SequenceShard):
    """``module`` (shared-mask dropout of ``[B, N, N, C]`` updates) applied to split rows."""
    if not module.training or module.rate == 0.0:
        return x
    shape = [x.shape[0], shard.n, shard.n, x.shape[-1]]
    shape[module.shared_dim % 4] = 1
    keep = F.dropout(x.new_ones(shape), module.rate, training=True)
    if transposed:
        keep = keep.transpose(1, 2)
    if keep.shape[1] != 1:
        keep = keep[:, shard.rows]
    return x * keep


def pair_layer(layer: PairTransformLayer, p: torch.Tensor, mask: torch.Tensor, mask_t: torch.Tensor,
               shard: SequenceShard, chunk_size: int | None = None) -> torch.Tensor:
    """:class:`PairTransformLayer` on this rank's rows ``p`` ``[B, I_r, N, C]``.

    ``mask`` ``[B, I_r, N]`` holds the same rows of the pair mask, ``mask_t`` those of its
    transpose. Returns the layer's output rows.
    """
    def attention(module, z, m, shard):
        return tri_att(module, z, m, shard, chunk_size)

    steps = []  # (needs the transposed layout, update, module, dropout), in Genie's order
    if layer.tri_mul_out is not None:
        steps += [(False, tri_mul, layer.tri_mul_out, layer.dropout_row),
                  (True, tri_mul, layer.tri_mul_in, layer.dropout_row)]
    if layer.tri_att_start is not None:
        steps += [(False, attention, layer.tri_att_start, layer.dropout_row),
                  (True, attention, layer.tri_att_end, layer.dropout_col)]
    transposed = False
    for needs_t, update, module, dropout in steps:
        if needs_t != transposed:
            p, transposed = transpose_rows(p, shard), needs_t
        m = mask_t if transposed else mask
        p = p + _dropout(dropout, update(module, p, m, shard), transposed, shard)
    m = mask_t if transposed else mask
    p = p + layer.pair_transition(p, m)
    p = p * m.unsqueeze(-1).to(p.dtype)
    return transpose_rows(p, shard) if transposed else p


def pair_stack(net: PairTransformNet, p: torch.Tensor, mask: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """:class:`PairTransformNet` on this rank's rows: ``p`` ``[B, I_r, N, c_p]``, ``mask``
    ``[B, I_r, N]`` (rows ``shard.rows`` of the pair mask) -> the output's rows."""
    mask_t = transpose_rows(mask, shard)
    for layer in net.calls():
        p = pair_layer(layer, p, mask, mask_t, shard, net.chunk_size)
    return p
