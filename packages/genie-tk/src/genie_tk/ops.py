"""Public functional API of genie-tk: argument checks, backend dispatch.

Three entry points, each with a ``backend=`` argument (``None`` reads
``GENIE_TK_BACKEND``; see :mod:`genie_tk._backend`):

* :func:`triangle_attention`: the attention core on head-major ``q, k, v``;
* :func:`triangle_attention_layer`: OpenFold's whole ``TriangleAttention``
  (LayerNorm, projections, attention, gate, output projection) from its weights;
* :func:`triangle_multiplicative_update`: the whole tri-mul (Alg. 11/12).
"""

from __future__ import annotations

import math
import numbers

import torch

from genie_tk import reference, torch_backend
from genie_tk._backend import KERNEL_BACKENDS, kernel, select

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The largest mask magnitude whose base-2 bias log2(e) * inf (what the tk kernels
# add, in float32) is still a finite float32.
MAX_INF = torch.finfo(torch.float32).max / math.log2(math.e) * (1 - 1e-6)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _check_device(device: torch.device, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {device}; move both to one device")


def check_inf(inf: float) -> float:
    """``inf`` (the mask bias magnitude) as a float: a positive finite number that
    stays finite in float32 after the kernels' scaling by log2(e)."""
    if isinstance(inf, bool) or not isinstance(inf, numbers.Real):
        raise TypeError(f"inf must be a real number (OpenFold: 1e9), got {type(inf).__name__}")
    value = float(inf)
    if not math.isfinite(value) or not 0 < value <= MAX_INF:
        raise ValueError(
            f"inf must be a positive finite number at most {MAX_INF:.3g} (the mask bias inf * (mask - 1) is "
            f"added in float32, and -inf would turn fully masked rows into NaN), got {inf!r}"
        )
    return value


def check_pair(name: str, z: torch.Tensor, channels: int | None = None) -> None:
    """``z`` must be a floating ``[*, N, N, C]`` tensor (with ``C == channels`` if given)."""
    _check_float(name, z)
    if z.dim() < 3 or z.shape[-3] != z.shape[-2]:
        raise ValueError(f"{name} must have shape [*, N, N, C] (two equal residue axes), got {tuple(z.shape)}")
    if channels is not None and z.shape[-1] != channels:
        raise ValueError(f"{name} has {z.shape[-1]} channels in its last axis, expected {channels}")


def check_dtypes(name: str, z: torch.Tensor, weights: dict[str, torch.Tensor]) -> None:
    """``z`` and ``weights`` share one dtype, or ``z`` is float16/bfloat16 over float32 weights
    (autocast, and the tk kernels' inputs); otherwise a ``TypeError`` naming ``name``."""
    first, ref = next(iter(weights.items()))
    for wname, w in weights.items():
        if w.dtype != ref.dtype:
            raise TypeError(f"{wname} is {w.dtype} but {first} is {ref.dtype}: all weights must share one dtype")
    if z.dtype == ref.dtype or (ref.dtype == torch.float32 and z.dtype in (torch.float16, torch.bfloat16)):
        return
    also = " (or float16/bfloat16)" if ref.dtype == torch.float32 else ""
    raise TypeError(f"{name} is {z.dtype} but the weights (a module's parameters) are {ref.dtype}: expected "
                    f"{name} in {ref.dtype}{also}; "
                    f"convert one to the other, e.g. {name}.to({ref.dtype}) or module.to({z.dtype})")


def check_chunk_size(chunk_size: int | None, name: str = "chunk_size") -> None:
    """``chunk_size`` is ``None`` or a positive integer."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"{name} must be a positive int or None, got {chunk_size}")


def check_mask(mask: torch.Tensor | None, shape: torch.Size, device: torch.device, name: str = "mask") -> None:
    """``mask`` is ``None`` or a bool/floating tensor of ``shape`` (1 keep, 0 mask) on ``device``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a bool or floating tensor of 0/1 values, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    _check_device(device, **{name: mask})


def _or_zeros(bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """``bias``, or zeros of ``weight``'s output width for a bias-free linear (OpenFold3, Boltz):
    adding 0 changes no value, so every backend serves both layouts unchanged."""
    return weight.new_zeros(weight.shape[0]) if bias is None else bias


def triangle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    inf: float = 1e9,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Triangle attention core (AF2 Alg. 13, starting-node layout).

    ``o[b,i,h,j] = Σ_k softmax_k(q[b,i,h,j]·k[b,i,h,k]·scale + mask_bias[b,i,k] + bias[b,h,j,k]) v[b,i,h,k]``

    Args:
        q, k, v: ``[B, I, H, J, D]``; row ``i`` is a batch axis shared by the three.
        bias: ``[B, H, J, K]`` triangle bias, shared by every row ``i`` (differentiable).
        mask: ``[B, I, K]`` bool or 0/1 float, 1 = keep, or ``None``. It becomes
            OpenFold's finite bias ``inf * (mask - 1)``, so a fully masked row is
            finite. Not differentiable.
        scale: factor on ``q``; ``None`` divides by ``sqrt(D)``.
        inf: magnitude of the mask bias (OpenFold: 1e9): a positive finite number
            at most ``MAX_INF`` (about 2.4e38, so that ``log2(e) * inf`` is a finite
            float32); anything else raises.
        chunk_size: rows ``i`` per chunk for the torch backend (``None``: automatic).
        backend: ``"auto"``, ``"tk"``, ``"triton"``, ``"torch"``, ``"reference"`` or ``None``.

    Returns:
        ``[B, I, H, J, D]`` in the dtype of ``q``.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("bias", bias)):
        _check_float(name, t)
    if q.dim() != 5:
        raise ValueError(f"q must have shape [B, I, H, J, D], got {tuple(q.shape)}")
    b, n_i, h, n_j, d = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k and v must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if tuple(bias.shape) != (b, h, n_j, n_j):
        raise ValueError(f"bias must have shape [B, H, J, K] = {(b, h, n_j, n_j)}, got {tuple(bias.shape)}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_device(q.device, k=k, v=v, bias=bias)
    check_mask(mask, torch.Size((b, n_i, n_j)), q.device)
    inf = check_inf(inf)
    check_chunk_size(chunk_size)
    bias = bias.to(q.dtype)
    name = select("triangle_attention", backend, q, k, v, bias, mask, head_dim=d)
    if name == "reference":
        return reference.triangle_attention(q, k, v, bias, mask, scale, inf)
    if name == "torch":
        return torch_backend.triangle_attention(q, k, v, bias, mask, scale, inf, chunk_size)
    return kernel(name, "triangle_attention").run(q, k, v, bias, mask, scale, inf)


def triangle_attention_layer(
    z: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    layer_norm_weight: torch.Tensor,
    layer_norm_bias: torch.Tensor,
    bias_weight: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor | None,
    starting: bool = True,
    transpose_bias: bool = False,
    inf: float = 1e9,
    eps: float = 1e-5,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """OpenFold's ``TriangleAttention`` as a function of its weights.

    Args:
        z: ``[*, N, N, C]`` pair representation.
        mask: ``[*, N, N]`` (1 keep, 0 pad) or ``None``.
        layer_norm_weight, layer_norm_bias: ``[C]``.
        bias_weight: ``[H, C]`` triangle-bias projection (``linear.weight``).
        q_weight, k_weight, v_weight, gate_weight: ``[H·D, C]`` (``mha.linear_*``);
            gate_bias ``[H·D]``; out_weight ``[C, H·D]``, out_bias ``[C]``; a bias
            may be ``None`` (a bias-free linear, as in OpenFold3 and Boltz).
        starting: ``False`` computes the ending-node attention (Alg. 14): the
            input and mask are transposed on entry and the output on exit.
        transpose_bias: OpenFold3's switch: the triangle bias of query ``j`` and
            key ``k`` is projected from pair ``(k, j)`` of the (entry-transposed)
            input instead of ``(j, k)``.
        chunk_size: rows per chunk (torch backend; ``None``: automatic).

    Returns:
        ``[*, N, N, C]``.
    """
    c = layer_norm_weight.shape[0]
    check_pair("z", z, c)
    n_h, hd = bias_weight.shape[0], q_weight.shape[0]
    if hd % n_h:
        raise ValueError(f"q_weight has {hd} rows, not a multiple of the {n_h} heads of bias_weight")
    check_mask(mask, z.shape[:-1], z.device)
    inf = check_inf(inf)
    gate_bias, out_bias = _or_zeros(gate_bias, gate_weight), _or_zeros(out_bias, out_weight)
    check_chunk_size(chunk_size)
    weights = (layer_norm_weight, layer_norm_bias, bias_weight, q_weight, k_weight, v_weight,
               gate_weight, gate_bias, out_weight, out_bias)
    _check_device(z.device, **{f"weight {i}": w for i, w in enumerate(weights)})
    names = ("layer_norm_weight", "layer_norm_bias", "bias_weight", "q_weight", "k_weight", "v_weight",
             "gate_weight", "gate_bias", "out_weight", "out_bias")
    check_dtypes("z", z, dict(zip(names, weights)))
    name = select("triangle_attention_layer", backend, z, mask, head_dim=hd // n_h)
    if name == "reference":
        params = dict(zip(reference.ATTENTION_KEYS, weights))
        return reference.triangle_attention_layer(z, mask, params, n_h, starting, inf, eps, transpose_bias)
    if name in KERNEL_BACKENDS:
        return kernel(name, "triangle_attention_layer").run(z, mask, weights, starting, inf, eps, transpose_bias)
    if not starting:
        z = z.transpose(-2, -3)
        mask = None if mask is None else mask.transpose(-1, -2)
    lead, (n, _, _) = z.shape[:-3], z.shape[-3:]
    zb = z.reshape(-1, n, n, c)
    mb = None if mask is None else mask.reshape(-1, n, n)
    out = torch_backend.triangle_attention_layer(zb, mb, weights, inf, eps, chunk_size, transpose_bias)
    out = out.reshape(*lead, n, n, out.shape[-1])
    return out if starting else out.transpose(-2, -3)


_DIRECTIONS = ("outgoing", "incoming")


def triangle_multiplicative_update(
    z: torch.Tensor,
    mask: torch.Tensor | None = None,
    direction: str = "outgoing",
    *,
    norm_in_weight: torch.Tensor,
    norm_in_bias: torch.Tensor,
    p_in_weight: torch.Tensor,
    p_in_bias: torch.Tensor | None,
    g_in_weight: torch.Tensor,
    g_in_bias: torch.Tensor | None,
    norm_out_weight: torch.Tensor,
    norm_out_bias: torch.Tensor,
    p_out_weight: torch.Tensor,
    p_out_bias: torch.Tensor | None,
    g_out_weight: torch.Tensor,
    g_out_bias: torch.Tensor | None,
    eps: float = 1e-5,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Triangle multiplicative update (AF2 Alg. 11 outgoing / Alg. 12 incoming).

    ``zn = LN_in(z)``; ``[a | b] = mask · σ(zn G_inᵀ + g_in) ⊙ (zn P_inᵀ + p_in)``;
    outgoing ``x_ij = Σ_k a_ik b_jk``, incoming ``x_ij = Σ_k a_ki b_kj`` (per channel);
    ``out = σ(zn G_outᵀ + g_out) ⊙ (LN_out(x) P_outᵀ + p_out)``.

    Args:
        z: ``[*, N, N, C]``; mask: ``[*, N, N]`` (1 keep, 0 pad) or ``None``.
        direction: ``"outgoing"`` or ``"incoming"``.
        norm_in_weight, norm_in_bias: ``[C]``.
        p_in_weight, g_in_weight: ``[2·Ch, C]``, rows ``[0, Ch)`` make ``a`` and
            ``[Ch, 2·Ch)`` make ``b``; p_in_bias, g_in_bias ``[2·Ch]``.
        norm_out_weight, norm_out_bias: ``[Ch]``.
        p_out_weight: ``[C, Ch]``; g_out_weight ``[C, C]``; biases ``[C]``.
            The four projection biases may be ``None`` (bias-free, as in OpenFold3,
            Boltz and cuEquivariance).
        chunk_size: compute the output in blocks of this many rows (torch backend).

    Returns:
        ``[*, N, N, C]``.

    In float16 (inputs or autocast) ``a`` and ``b`` are divided by their standard
    deviations before a float32 contraction, as OpenFold does, so nothing overflows.
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be 'outgoing' or 'incoming', got {direction!r}")
    c = norm_in_weight.shape[0]
    check_pair("z", z, c)
    check_mask(mask, z.shape[:-1], z.device)
    if p_in_weight.shape[0] % 2 or p_in_weight.shape != g_in_weight.shape:
        raise ValueError(f"p_in_weight and g_in_weight must both be [2*c_hidden, {c}], got "
                         f"{tuple(p_in_weight.shape)} and {tuple(g_in_weight.shape)}")
    p_in_bias, g_in_bias = _or_zeros(p_in_bias, p_in_weight), _or_zeros(g_in_bias, g_in_weight)
    p_out_bias, g_out_bias = _or_zeros(p_out_bias, p_out_weight), _or_zeros(g_out_bias, g_out_weight)
    check_chunk_size(chunk_size)
    weights = (norm_in_weight, norm_in_bias, p_in_weight, p_in_bias, g_in_weight, g_in_bias,
               norm_out_weight, norm_out_bias, p_out_weight, p_out_bias, g_out_weight, g_out_bias)
    _check_device(z.device, **{f"weight {i}": w for i, w in enumerate(weights)})
    names = ("norm_in_weight", "norm_in_bias", "p_in_weight", "p_in_bias", "g_in_weight", "g_in_bias",
             "norm_out_weight", "norm_out_bias", "p_out_weight", "p_out_bias", "g_out_weight", "g_out_bias")
    check_dtypes("z", z, dict(zip(names, weights)))
    outgoing = direction == "outgoing"
    name = select("triangle_multiplicative_update", backend, z, mask, hidden=p_in_weight.shape[0] // 2)
    if name == "reference":
        params = dict(zip(reference.TRI_MUL_KEYS, weights))
        return reference.triangle_multiplicative_update(z, mask, params, outgoing, eps)
    if name in KERNEL_BACKENDS:
        return kernel(name, "triangle_multiplicative_update").run(z, mask, weights, outgoing, eps)
    lead, n = z.shape[:-3], z.shape[-2]
    zb = z.reshape(-1, n, n, c)
    mb = None if mask is None else mask.reshape(-1, n, n)
    out = torch_backend.triangle_multiplicative_update(zb, mb, weights, outgoing, eps, chunk_size)
    return out.reshape(*lead, n, n, out.shape[-1])
