"""cuEquivariance's functional triangle API on genie-tk.

``from genie_tk.cuequivariance import triangle_attention, triangle_multiplicative_update``
replaces ``from cuequivariance_torch import ...`` (cuEquivariance 0.13): the same
argument names, order, shapes and defaults, computed by :func:`genie_tk.triangle_attention`
and :func:`genie_tk.triangle_multiplicative_update` on any genie-tk backend (one
keyword-only extra, ``backend``). Where genie-tk cannot honour an argument it says
so: see each function's docstring for what is accepted, ignored or refused.
"""

from __future__ import annotations

import enum
import math

import torch

from genie_tk import ops


class TriMulPrecision(enum.IntEnum):
    """cuEquivariance's matmul precision modes (same values as ``cuequivariance_ops_torch``)."""

    NONE = -1
    DEFAULT = 0
    TF32 = 1
    TF32x3 = 2
    IEEE = 3


def _five_dims(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
    """cuEquivariance's "for B = 1, can also be 4-D": prepend the batch axis."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 4:
        return t.unsqueeze(0)
    if t.dim() != 5:
        raise ValueError(f"{name} must be 5-D (or 4-D for B = 1), got shape {tuple(t.shape)}")
    return t


def triangle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_aux: bool = False,
    *,
    kv_lengths: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """cuEquivariance's ``triangle_attention``.

    ``out[b,n,h,q] = Σ_k softmax_k(scale·q·k + mask_bias[b,n,k] + bias[b,0,h,q,k]) v[b,n,h,k]``

    Args:
        q, k, v: ``(B, N, H, Q, D)`` (``(N, H, Q, D)`` for B = 1); ``K == Q``.
        bias: ``(B, 1, H, Q, K)`` (``(1, H, Q, K)`` for B = 1), cast to ``q``'s dtype
            (cuEquivariance's generic kernels read it in float32).
        mask: ``(B, N, 1, 1, K)`` (``(N, 1, 1, K)``), cast to bool (``True`` = keep).
            A masked key gets the additive bias ``-1e9`` (``-6e4`` for float16), as
            in cuEquivariance's PyTorch path, added before ``bias``.
        scale: factor on ``q·k``; ``None``: ``1/sqrt(D)``.
        return_aux: refused (``True`` raises ``ValueError``): genie-tk does not
            return the softmax statistics.
        kv_lengths: ``(B, N, 1, 1, 1)`` integer key lengths of a right-padded mask
            (values above ``K`` clamp to ``K``); exclusive with ``mask``. As in
            cuEquivariance, a row of length 0 returns zeros.
        backend: genie-tk's backend (``None``: ``GENIE_TK_BACKEND``).

    Returns:
        ``(B, N, H, Q, D)`` in ``q``'s dtype (5-D also for 4-D inputs, as
        cuEquivariance returns).
    """
    if return_aux:
        raise ValueError("return_aux=True is not supported by genie_tk.cuequivariance.triangle_attention: "
                         "genie-tk does not return the softmax log-sum-exp and max")
    if mask is not None and kv_lengths is not None:
        raise ValueError("triangle_attention: pass either mask or kv_lengths, not both")
    q, k, v = (_five_dims(n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    bias, mask = _five_dims("bias", bias), _five_dims("mask", mask)
    b, n, h, n_q, _ = q.shape
    if tuple(bias.shape) != (b, 1, h, n_q, k.shape[3]):
        raise ValueError(f"bias must have shape (B, 1, H, Q, K) = {(b, 1, h, n_q, k.shape[3])}, got {tuple(bias.shape)}")
    empty = None
    if kv_lengths is not None:
        lengths = _five_dims("kv_lengths", kv_lengths)
        if tuple(lengths.shape) != (b, n, 1, 1, 1) or lengths.is_floating_point():
            raise ValueError(f"kv_lengths must be an integer tensor of shape (B, N, 1, 1, 1) = {(b, n, 1, 1, 1)}, "
                             f"got {lengths.dtype} {tuple(lengths.shape)}")
        mask = torch.arange(k.shape[3], device=k.device) < lengths.reshape(b, n, 1)
        empty = lengths.reshape(b, n, 1, 1, 1) <= 0
    elif mask is not None:
        if tuple(mask.shape) != (b, n, 1, 1, k.shape[3]):
            raise ValueError(f"mask must have shape (B, N, 1, 1, K) = {(b, n, 1, 1, k.shape[3])}, "
                             f"got {tuple(mask.shape)}")
        mask = mask.reshape(b, n, -1).to(torch.bool)
    inf = 6e4 if q.dtype == torch.float16 else 1e9
    out = ops.triangle_attention(q, k, v, bias[:, 0], mask, scale, inf=inf, backend=backend)
    return out if empty is None else out.masked_fill(empty, 0)


_PRECISIONS = {"NONE": TriMulPrecision.NONE, "DEFAULT": TriMulPrecision.DEFAULT, "IEEE": TriMulPrecision.IEEE}


def _bfloat16(precision) -> bool:
    """Whether ``precision`` is cuEquivariance's ``"bfloat16"`` mode; refuse what genie-tk cannot do."""
    if precision is None:
        return False
    if isinstance(precision, str):
        name = precision.upper()
        if name in ("BF16", "BFLOAT16"):
            return True
        if name == "MXFP8":
            raise ValueError("precision='mxfp8' is not supported by genie-tk (no MXFP8 path); "
                             "use None, 'default', 'ieee' or 'bfloat16'")
        if name not in _PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of None, 'default', 'none', 'ieee', 'bfloat16'")
        return False
    if isinstance(precision, int) and precision in set(TriMulPrecision):
        return False
    raise ValueError(f"precision must be None, a TriMulPrecision or one of 'default', 'none', 'ieee', "
                     f"'bfloat16'; got {precision!r}")


def triangle_multiplicative_update(
    x: torch.Tensor,
    direction: str = "outgoing",
    mask: torch.Tensor | None = None,
    norm_in_weight: torch.Tensor | None = None,
    norm_in_bias: torch.Tensor | None = None,
    p_in_weight: torch.Tensor | None = None,
    p_in_bias: torch.Tensor | None = None,
    g_in_weight: torch.Tensor | None = None,
    g_in_bias: torch.Tensor | None = None,
    norm_out_weight: torch.Tensor | None = None,
    norm_out_bias: torch.Tensor | None = None,
    p_out_weight: torch.Tensor | None = None,
    p_out_bias: torch.Tensor | None = None,
    g_out_weight: torch.Tensor | None = None,
    g_out_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    precision: TriMulPrecision | str | int | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """cuEquivariance's ``triangle_multiplicative_update``.

    ``xn = LN_in(x)``; ``[a | b] = mask · σ(xn G_inᵀ + g_in) ⊙ (xn P_inᵀ + p_in)``;
    outgoing ``u_ij = Σ_k a_ik b_jk``, incoming ``u_ij = Σ_k a_ki b_kj``;
    ``out = σ(xn G_outᵀ + g_out) ⊙ (LN_out(u) P_outᵀ + p_out)``.

    Args:
        x: ``(B, N, N, C)``, or any number of leading axes (``(N, N, C)`` too).
        direction: ``"outgoing"`` or ``"incoming"``.
        mask: ``(B, N, N)`` (bool or 0/1), multiplies ``a`` and ``b``; ``None`` keeps all.
        norm_in_weight, norm_in_bias: ``(C,)``; ``None``: ones / zeros.
        p_in_weight, g_in_weight: ``(2D, C)``, rows ``[0, D)`` make ``a``. ``None``
            is refused (cuEquivariance draws random weights there).
        p_in_bias, g_in_bias: ``(2D,)`` or ``None`` (no bias).
        norm_out_weight, norm_out_bias: ``(D,)``; ``None``: ones / zeros.
        p_out_weight: ``(C, D)``; g_out_weight: ``(C, C)``; ``None`` is refused.
        p_out_bias, g_out_bias: ``(C,)`` or ``None``.
        eps: LayerNorm epsilon of both norms.
        precision: ``None``, ``"default"``, ``"none"``, ``"ieee"`` or a
            :class:`TriMulPrecision` are accepted and ignored: genie-tk computes in
            the input dtype with float32 (or float64) accumulation, and its GPU
            matmuls follow ``torch.backends.cuda.matmul.allow_tf32``.
            ``"bfloat16"`` rounds ``x``, the mask and every weight to bfloat16 first,
            as cuEquivariance does. ``"mxfp8"`` is refused.
        backend: genie-tk's backend (``None``: ``GENIE_TK_BACKEND``).

    Returns:
        The update, shaped like ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 3:
        raise ValueError(f"x must have shape (B, N, N, C) (or (N, N, C)), got {tuple(x.shape)}")
    for name, w in (("p_in_weight", p_in_weight), ("g_in_weight", g_in_weight),
                    ("p_out_weight", p_out_weight), ("g_out_weight", g_out_weight)):
        if w is None:
            raise ValueError(f"{name} is required: genie-tk does not draw random weights for a missing projection")
    c, d = x.shape[-1], p_in_weight.shape[0] // 2
    if norm_in_weight is None:
        norm_in_weight = x.new_ones(c)
    if norm_in_bias is None:
        norm_in_bias = x.new_zeros(c)
    if norm_out_weight is None:
        norm_out_weight = x.new_ones(d)
    if norm_out_bias is None:
        norm_out_bias = x.new_zeros(d)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.numel() != math.prod(x.shape[:-1]):
            raise ValueError(f"mask must have shape {tuple(x.shape[:-1])} (x without its channel axis), "
                             f"got {tuple(mask.shape)}")
        mask = mask.reshape(x.shape[:-1])
    weights = {
        "norm_in_weight": norm_in_weight, "norm_in_bias": norm_in_bias,
        "p_in_weight": p_in_weight, "p_in_bias": p_in_bias,
        "g_in_weight": g_in_weight, "g_in_bias": g_in_bias,
        "norm_out_weight": norm_out_weight, "norm_out_bias": norm_out_bias,
        "p_out_weight": p_out_weight, "p_out_bias": p_out_bias,
        "g_out_weight": g_out_weight, "g_out_bias": g_out_bias,
    }
    if _bfloat16(precision):
        x = x.to(torch.bfloat16)
        mask = None if mask is None else mask.to(torch.bfloat16)
        weights = {k: None if w is None else w.to(torch.bfloat16) for k, w in weights.items()}
    return ops.triangle_multiplicative_update(x, mask, direction, eps=eps, backend=backend, **weights)
