"""Plain, readable OpenFold-semantics implementations of the triangle operations.

This module is the oracle: every backend, test and benchmark is checked against
it. It favours clarity over memory (triangle attention materialises the full
``[B, I, H, J, K]`` logits) and follows OpenFold's order of floating-point
operations where that order is observable in float64:

* the mask enters attention as the finite additive bias ``inf * (mask - 1)``,
  added to ``q·k`` *before* the triangle bias (a fully masked row then stays
  finite and, in float64, equals OpenFold to the last bits);
* ``q`` is divided by ``sqrt(head_dim)`` before the product;
* the tri-mul mask multiplies only ``a`` and ``b``; the gate reads the
  layer-normed input; incoming is ``Aᵀ·B`` per channel.

Parameters are passed as mappings with OpenFold's ``state_dict`` key names, so
``reference.triangle_attention_layer(z, mask, module.state_dict(), ...)`` is the
oracle of an OpenFold (or genie-tk) module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

Params = Mapping[str, torch.Tensor]

#: ``TriangleAttention``'s parameters in the order of :func:`genie_tk.triangle_attention_layer`'s weights.
ATTENTION_KEYS = ("layer_norm.weight", "layer_norm.bias", "linear.weight", "mha.linear_q.weight",
                  "mha.linear_k.weight", "mha.linear_v.weight", "mha.linear_g.weight",
                  "mha.linear_g.bias", "mha.linear_o.weight", "mha.linear_o.bias")
#: The fused-projection tri-mul's parameters in the order of
#: :func:`genie_tk.triangle_multiplicative_update`'s weights.
TRI_MUL_KEYS = ("layer_norm_in.weight", "layer_norm_in.bias", "linear_ab_p.weight", "linear_ab_p.bias",
                "linear_ab_g.weight", "linear_ab_g.bias", "layer_norm_out.weight", "layer_norm_out.bias",
                "linear_z.weight", "linear_z.bias", "linear_g.weight", "linear_g.bias")


def mask_bias(mask: torch.Tensor, inf: float, dtype: torch.dtype) -> torch.Tensor:
    """OpenFold's finite additive mask bias: 0 where ``mask`` is 1, ``-inf`` (finite) where 0."""
    return inf * (mask.to(dtype) - 1)


def triangle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    inf: float = 1e9,
) -> torch.Tensor:
    """Attention core of AF2 Algorithms 13/14, starting-node layout.

    Args:
        q, k, v: ``[B, I, H, J, D]``: row ``i`` is a batch axis, ``j`` the query
            (for ``q``) or key (for ``k``, ``v``) residue.
        bias: ``[B, H, J, K]`` triangle bias, shared by every row ``i``.
        mask: ``[B, I, K]``, 1 keeps key ``k`` of row ``i``, 0 masks it; ``None`` keeps all.
        scale: multiplies ``q``; ``None`` divides it by ``sqrt(D)`` as OpenFold does.
        inf: magnitude of the finite mask bias.

    Returns:
        ``[B, I, H, J, D]``.
    """
    q = q / math.sqrt(q.shape[-1]) if scale is None else q * scale
    logits = q @ k.transpose(-1, -2)
    if mask is not None:
        logits = logits + mask_bias(mask, inf, logits.dtype)[:, :, None, None, :]
    logits = logits + bias[:, None]
    return torch.softmax(logits, dim=-1) @ v


def _layer_norm(x: torch.Tensor, p: Params, prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], p[prefix + ".weight"], p[prefix + ".bias"], eps)


def _linear(x: torch.Tensor, p: Params, prefix: str) -> torch.Tensor:
    return F.linear(x, p[prefix + ".weight"], p.get(prefix + ".bias"))


def triangle_attention_layer(
    z: torch.Tensor,
    mask: torch.Tensor | None,
    params: Params,
    no_heads: int,
    starting: bool = True,
    inf: float = 1e9,
    eps: float = 1e-5,
    transpose_bias: bool = False,
) -> torch.Tensor:
    """OpenFold ``TriangleAttention`` forward from its ``state_dict``.

    Args:
        z: ``[*, N, N, C]`` pair representation.
        mask: ``[*, N, N]`` pair mask (1 keep, 0 pad) or ``None``.
        params: tensors under OpenFold's keys (``layer_norm.*``, ``linear.weight``,
            ``mha.linear_{q,k,v,g,o}.*``).
        no_heads: number of heads ``H``; the head width is ``linear_q`` rows / ``H``.
        starting: ``False`` is the ending-node module: the input and mask are
            transposed on entry and the output on exit.
        transpose_bias: OpenFold3's switch: the bias of query ``j``, key ``k`` is
            projected from pair ``(k, j)`` instead of ``(j, k)``.

    Returns:
        ``[*, N, N, C]``.
    """
    if mask is None:
        mask = z.new_ones(z.shape[:-1])
    if not starting:
        z = z.transpose(-2, -3)
        mask = mask.transpose(-1, -2)
    batch = z.shape[:-3]
    n_i, n_j, c = z.shape[-3:]
    z = z.reshape(-1, n_i, n_j, c)
    mask = mask.reshape(-1, n_i, n_j)

    x = _layer_norm(z, params, "layer_norm", eps)
    order = (0, 3, 2, 1) if transpose_bias else (0, 3, 1, 2)
    bias = _linear(x, params, "linear").permute(order)  # [B, H, J, K]

    def heads(t: torch.Tensor) -> torch.Tensor:  # [B, I, J, H*D] -> [B, I, H, J, D]
        return t.unflatten(-1, (no_heads, -1)).transpose(-2, -3)

    q = heads(_linear(x, params, "mha.linear_q"))
    k = heads(_linear(x, params, "mha.linear_k"))
    v = heads(_linear(x, params, "mha.linear_v"))
    o = triangle_attention(q, k, v, bias, mask, inf=inf)
    o = o.transpose(-2, -3).flatten(-2)  # [B, I, J, H*D]
    o = o * torch.sigmoid(_linear(x, params, "mha.linear_g"))
    out = _linear(o, params, "mha.linear_o").reshape(*batch, n_i, n_j, c)
    return out.transpose(-2, -3) if not starting else out


def triangle_multiplication(a: torch.Tensor, b: torch.Tensor, outgoing: bool) -> torch.Tensor:
    """Per-channel triangle contraction of ``a``, ``b``: ``[*, N, N, C]`` -> ``[*, N, N, C]``.

    outgoing: ``x[i, j, c] = Σ_k a[i, k, c] b[j, k, c]``;
    incoming: ``x[i, j, c] = Σ_k a[k, i, c] b[k, j, c]``.
    """
    if outgoing:
        return torch.einsum("...ikc,...jkc->...ijc", a, b)
    return torch.einsum("...kic,...kjc->...ijc", a, b)


def fp16_enabled(z: torch.Tensor) -> bool:
    """True where OpenFold's float16 branch is active: float16 inputs or float16 autocast."""
    if z.dtype == torch.float16:
        return True
    device = z.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16


def triangle_multiplicative_update(
    z: torch.Tensor,
    mask: torch.Tensor | None,
    params: Params,
    outgoing: bool = True,
    eps: float = 1e-5,
) -> torch.Tensor:
    """OpenFold ``TriangleMultiplication{Outgoing,Incoming}`` (or the fused-projection
    variant, recognised by the ``linear_ab_p`` key) forward from its ``state_dict``.

    Args:
        z: ``[*, N, N, C]``; mask: ``[*, N, N]`` or ``None``.

    Returns:
        ``[*, N, N, C]``.
    """
    if mask is None:
        mask = z.new_ones(z.shape[:-1])
    mask = mask.unsqueeze(-1).to(z.dtype)
    zn = _layer_norm(z, params, "layer_norm_in", eps)
    # (p · σ(g)) · mask, as OpenFold v1 (and Genie) write it: the same numbers as OpenFold's
    # later mask · σ(g) · p (the mask is 0 or 1), and autograd keeps one [*, N, N, Ch] tensor
    # fewer, so this plain path has the memory profile of those codes.
    if "linear_ab_p.weight" in params:
        ab = _linear(zn, params, "linear_ab_p") * torch.sigmoid(_linear(zn, params, "linear_ab_g")) * mask
        a, b = ab.chunk(2, dim=-1)
    else:
        a = _linear(zn, params, "linear_a_p") * torch.sigmoid(_linear(zn, params, "linear_a_g")) * mask
        b = _linear(zn, params, "linear_b_p") * torch.sigmoid(_linear(zn, params, "linear_b_g")) * mask
    if fp16_enabled(z) and bool(a.std() != 0) and bool(b.std() != 0):
        # OpenFold's float16 path: normalise a and b so the contraction cannot
        # overflow, and contract in float32 (LayerNorm-out is scale invariant).
        a, b = (a / a.std()).float(), (b / b.std()).float()
    x = triangle_multiplication(a, b, outgoing).to(zn.dtype)
    x = _linear(_layer_norm(x, params, "layer_norm_out", eps), params, "linear_z")
    return x * torch.sigmoid(_linear(zn, params, "linear_g"))
