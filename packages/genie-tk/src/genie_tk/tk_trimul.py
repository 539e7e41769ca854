"""The ``tk`` backend of :func:`genie_tk.triangle_multiplicative_update`.

Forward, three kernels of ``genie_tk._C`` (layouts in
``csrc/triangle_multiplication/triangle_multiplication.h``, design and bytes in
its ``NOTES.md``):

1. ``trimul_input``: LayerNorm, the four gated projections and the mask of
   ``z [B, N, N, C]``, written channel-first as ``ab [2, B, Ch, N, Np]``
   (``a = ab[0]``, ``b = ab[1]``; ``Np`` is ``N`` rounded up to 64, the
   padding zero);
2. ``trimul_contract``: per channel ``x = a·bᵀ`` (outgoing) or ``aᵀ·b``
   (incoming) on wgmma, ``x [B, Ch, N, Np]``;
3. ``trimul_output``: LayerNorm of ``x`` over channels, ``linear_z``, and the
   gate recomputed from ``z``.

Backward saves only ``z``, the mask, the weights, ``x`` and five scalars. It
recomputes ``a`` and ``b`` with ``trimul_input``, runs the two contractions of
the same shape (``dA``, ``dB``) with ``trimul_contract``, and does the
pointwise work and the weight gradients in PyTorch (element-wise in fp32, GEMM
operands in the compute dtype), a block of rows at a time, recomputing what it
needs from ``z`` and ``x``.

float16: as in OpenFold, ``a`` and ``b`` are normalised by their standard
deviations (over the whole tensor); here the input kernel accumulates their
moments and the contraction multiplies its fp32 accumulator by
``1 / (std(a) std(b))`` before rounding, which is the same function, and the
backward includes the gradient through the two standard deviations.

Both entry points are ``torch.library.custom_op`` s (``genie_tk::trimul_fwd``,
``genie_tk::trimul_bwd``) with fake implementations and autograd, so
``torch.compile(fullgraph=True)`` traces through them. They are registered only
when the extension provides the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from genie_tk._backend import _C, HAS_EXTENSION, Kernel, register_tk

OP = "triangle_multiplicative_update"
SUPPORTED_CHANNELS = (64, 128)
_KERNELS = ("trimul_input", "trimul_contract", "trimul_output")
_HALF = (torch.bfloat16, torch.float16)
# fp32 elements of one backward block's temporaries (~128 MiB).
_BLOCK_ELEMENTS = 1 << 25


def padded(n):
    """Row length of the channel-first tensors: ``n`` rounded up to a multiple of 64."""
    return (n + 63) // 64 * 64


def compute_dtype(z: Tensor) -> tuple[torch.dtype | None, str]:
    """The dtype the kernels run in for input ``z`` and, if they cannot, why not.

    bfloat16 and float16 inputs run in their own dtype; float32 inputs under
    CUDA autocast run in the autocast dtype (the output has that dtype, as
    autocast's linear layers would give).
    """
    autocast = None
    if torch.is_autocast_enabled("cuda"):
        autocast = torch.get_autocast_dtype("cuda")
    if z.dtype in _HALF:
        if autocast is not None and autocast != z.dtype:
            return None, f"{z.dtype} inputs under {autocast} autocast: the tk kernel computes in one dtype"
        return z.dtype, ""
    if z.dtype == torch.float32 and autocast in _HALF:
        return autocast, ""
    return None, (f"the tk kernels take bfloat16 or float16 inputs (or float32 under CUDA autocast "
                  f"to one of them), got {z.dtype}")


def check(z: Tensor, mask: Tensor | None = None, *, hidden: int) -> str:
    """Why the tk kernels cannot run this call ("" if they can); devices are checked by the caller."""
    _, reason = compute_dtype(z)
    if reason:
        return reason
    c = z.shape[-1]
    if c not in SUPPORTED_CHANNELS:
        return f"c_z = {c}: the tk kernels are built for c_z in {SUPPORTED_CHANNELS}"
    if hidden not in SUPPORTED_CHANNELS:
        return f"c_hidden = {hidden}: the tk kernels are built for c_hidden in {SUPPORTED_CHANNELS}"
    if z.numel() == 0:
        return "the input is empty"
    n = z.shape[-2]
    if z.numel() // (n * n * c) * n * padded(n) >= 2**31:
        return f"{z.numel() // c} pairs: beyond the kernels' 32-bit tile indices"
    return ""


def run(z: Tensor, mask: Tensor | None, weights: tuple[Tensor, ...], outgoing: bool, eps: float) -> Tensor:
    """The tk backend: ``z [*, N, N, C]``, ``mask [*, N, N]`` or ``None``, ``weights`` in
    :func:`genie_tk.triangle_multiplicative_update`'s order. Returns ``[*, N, N, C]``
    in the compute dtype."""
    dtype, _ = compute_dtype(z)
    lead, n, c = z.shape[:-3], z.shape[-2], z.shape[-1]
    zb = z.reshape(-1, n, n, c).to(dtype).contiguous()
    mb = None if mask is None else mask.reshape(-1, n, n).to(torch.float32).contiguous()
    (ln_w, ln_b, p_w, p_b, g_w, g_b, lo_w, lo_b, po_w, po_b, go_w, go_b) = weights

    def f32(t):
        return t.to(torch.float32).contiguous()

    def half(t):
        return t.to(dtype).contiguous()

    out, _, _ = torch.ops.genie_tk.trimul_fwd(
        zb, mb, f32(ln_w), f32(ln_b), half(p_w), f32(p_b), half(g_w), f32(g_b),
        f32(lo_w), f32(lo_b), half(po_w), f32(po_b), half(go_w), f32(go_b), outgoing, float(eps),
    )
    return out.reshape(*lead, n, n, c)


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def normalisation(moments: Tensor | None, count: int, device: torch.device) -> Tensor:
    """fp32 ``[5]``: ``(scale, std_a, std_b, mean_a, mean_b)`` from the moments
    ``(Σa, Σa², Σb, Σb²)`` of ``count`` elements each.

    ``scale = 1 / (std_a std_b)`` when both standard deviations (unbiased, as
    ``Tensor.std``) are non-zero, as OpenFold's float16 branch; otherwise, and
    when ``moments`` is ``None`` (bfloat16), ``scale = 1`` and both stds read 0
    so that the backward adds no term through them.
    """
    if moments is None:
        stats = torch.zeros(5, device=device)  # a fill, not a copy from the host
        stats[0] = 1.0
        return stats
    sums, squares = moments[0::2], moments[1::2]
    mean = sums / count
    std = ((squares - sums * mean) / (count - 1)).clamp_min(0).sqrt()
    ok = (std[0] != 0) & (std[1] != 0)
    scale = torch.where(ok, 1 / (std[0] * std[1]), torch.ones_like(std[0]))
    std = torch.where(ok, std, torch.zeros_like(std))
    return torch.cat([scale[None], std, mean]).float()


def _blocks(n: int, per_row: int):
    step = max(1, min(n, _BLOCK_ELEMENTS // max(1, per_row)))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


_MM_OUT_DTYPE: dict[str, bool] = {}  # device type -> whether torch.mm takes out_dtype there


def _matmul(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """``a @ b`` (``b`` 2-D) for the backward: operands rounded to ``dtype``, the compute
    dtype (so half types run on tensor cores), the product in fp32 where torch can return
    it unrounded; fp32 and fp64 operands multiply as they are."""
    if dtype not in _HALF:
        return a @ b
    a2, b2 = a.reshape(-1, a.shape[-1]).to(dtype), b.to(dtype)
    device = a.device.type
    if _MM_OUT_DTYPE.get(device, True):
        try:
            return torch.mm(a2, b2, out_dtype=torch.float32).reshape(*a.shape[:-1], b.shape[-1])
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):  # no fp32-output mm for this device in this torch
            _MM_OUT_DTYPE[device] = False
    return (a2 @ b2).float().reshape(*a.shape[:-1], b.shape[-1])


def _outer(dy: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """Weight gradient of ``y = x Wᵀ`` summed over every leading axis: ``dyᵀ x``."""
    return _matmul(dy.reshape(-1, dy.shape[-1]).T, x.reshape(-1, x.shape[-1]), dtype)


def _layer_norm(x, weight, bias, eps):
    return torch.ops.aten.native_layer_norm(x, [x.shape[-1]], weight, bias, eps)


def _layer_norm_backward(dy, x, mean, rstd, weight, bias):
    return torch.ops.aten.native_layer_norm_backward(
        dy, x, [x.shape[-1]], mean, rstd, weight, bias, [True, True, True])


def forward(kernels, z, mask, ln_in_w, ln_in_b, p_w, p_b, g_w, g_b, ln_out_w, ln_out_b, po_w, po_b, go_w, go_b,
            outgoing, eps, normalise=None):
    """``(out, x, stats)`` from the three kernels of ``kernels`` (``genie_tk._C`` or a
    stand-in with the same functions). Shapes and dtypes: see ``trimul_fwd``.
    ``normalise`` (default: float16 inputs) divides the product by ``std(a) std(b)``."""
    b, n, _, _ = z.shape
    ch = p_w.shape[0] // 2
    stream = _stream(z)
    ab = z.new_empty((2, b, ch, n, padded(n)))
    if normalise is None:
        normalise = z.dtype == torch.float16
    moments = z.new_zeros(4, dtype=torch.float64) if normalise else None
    kernels.trimul_input(ab, moments, z, mask, ln_in_w, ln_in_b, p_w, p_b, g_w, g_b, eps, stream)
    stats = normalisation(moments, b * n * n * ch, z.device)
    x = z.new_empty((b, ch, n, padded(n)))
    kernels.trimul_contract(x, ab[0], ab[1], stats[:1], "ABt" if outgoing else "AtB", stream)
    del ab
    out = torch.empty_like(z)
    kernels.trimul_output(out, x, z, ln_in_w, ln_in_b, ln_out_w, ln_out_b, po_w, po_b, go_w, go_b, eps, stream)
    return out, x, stats


def backward(kernels, dout, z, mask, ln_in_w, ln_in_b, p_w, p_b, g_w, g_b, ln_out_w, ln_out_b, po_w, po_b, go_w,
             go_b, x, stats, outgoing, eps):
    """``(dz, d ln_in_w, d ln_in_b, d p_w, d p_b, d g_w, d g_b, d ln_out_w, d ln_out_b,
    d po_w, d po_b, d go_w, d go_b)`` of :func:`forward`, each in its input's dtype."""
    bsz, n, _, c = z.shape
    ch = x.shape[1]
    # Element-wise work in fp32 (fp64 for fp64); GEMM operands in the compute dtype.
    acc = torch.promote_types(z.dtype, torch.float32)
    cd = z.dtype
    stream = _stream(z)

    def mm(a, w):  # a @ w
        return _matmul(a, w, cd)

    def outer(dy, x):
        return _outer(dy, x, cd)

    d_lo_w, d_lo_b = torch.zeros_like(ln_out_w, dtype=acc), torch.zeros_like(ln_out_b, dtype=acc)
    d_po_w, d_po_b = torch.zeros_like(po_w, dtype=acc), torch.zeros(c, dtype=acc, device=z.device)
    blocks = _blocks(n, bsz * n * (4 * ch + 4 * c))

    # 1. Gradient of x (channel-first, zero padding) and of the output side's
    #    LayerNorm and linear_z; the gate is recomputed from z.
    dx = torch.zeros_like(x)
    dx_dot_x = torch.zeros((), dtype=torch.float64, device=z.device)  # Σ dx·x for the fp16 stds
    for i0, i1 in blocks:
        zn = F.layer_norm(z[:, i0:i1].to(acc), (c,), ln_in_w, ln_in_b, eps)
        gate = torch.sigmoid(mm(zn, go_w.T) + go_b)
        xc = x[:, :, i0:i1, :n].permute(0, 2, 3, 1).to(acc)  # [B, rows, N, Ch]
        xn, mean, rstd = _layer_norm(xc, ln_out_w, ln_out_b, eps)
        dy = dout[:, i0:i1].to(acc) * gate
        d_po_w += outer(dy, xn)
        d_po_b += dy.sum((0, 1, 2))
        dxc, dw, db = _layer_norm_backward(mm(dy, po_w), xc, mean, rstd, ln_out_w, ln_out_b)
        d_lo_w += dw
        d_lo_b += db
        dx_dot_x += (dxc.double() * xc.double()).sum()
        dx[:, :, i0:i1, :n] = dxc.permute(0, 3, 1, 2).to(x.dtype)

    # 2. dA, dB: two contractions of the forward's shape, on a and b recomputed.
    np_ = padded(n)
    ab = z.new_empty((2, bsz, ch, n, np_))
    kernels.trimul_input(ab, None, z, mask, ln_in_w, ln_in_b, p_w, p_b, g_w, g_b, eps, stream)
    scale = stats[:1]
    dab = torch.empty_like(ab)
    if outgoing:  # x = a bᵀ: da = dx b, db = dxᵀ a
        kernels.trimul_contract(dab[0], dx, ab[1], scale, "AB", stream)
        kernels.trimul_contract(dab[1], dx, ab[0], scale, "AtB", stream)
    else:  # x = aᵀ b: da = b dxᵀ, db = a dx
        kernels.trimul_contract(dab[0], ab[1], dx, scale, "ABt", stream)
        kernels.trimul_contract(dab[1], ab[0], dx, scale, "AB", stream)
    del ab, dx

    # 3. Input side: gates, projections, the gate of the output, LayerNorm_in.
    # Through std(a), std(b) (float16): d a += coef_a (a - mean_a), coef = -Σ dx·x / ((n - 1) std²).
    count = bsz * n * n * ch
    std, mean_ab = stats[1:3].double(), stats[3:5].double()
    coef = torch.where(std > 0, -dx_dot_x / ((count - 1) * std.clamp_min(1e-300) ** 2), torch.zeros_like(std))
    coef = coef.repeat_interleave(ch).to(acc)
    mean_ab = mean_ab.repeat_interleave(ch).to(acc)
    dz = torch.empty_like(z)
    d_ln_w, d_ln_b = torch.zeros_like(ln_in_w, dtype=acc), torch.zeros_like(ln_in_b, dtype=acc)
    d_p_w, d_p_b = torch.zeros_like(p_w, dtype=acc), torch.zeros_like(p_b, dtype=acc)
    d_g_w, d_g_b = torch.zeros_like(g_w, dtype=acc), torch.zeros_like(g_b, dtype=acc)
    d_go_w, d_go_b = torch.zeros_like(go_w, dtype=acc), torch.zeros(c, dtype=acc, device=z.device)
    for i0, i1 in blocks:
        zc = z[:, i0:i1].to(acc)
        zn, mean, rstd = _layer_norm(zc, ln_in_w, ln_in_b, eps)
        gate = torch.sigmoid(mm(zn, go_w.T) + go_b)
        xn = F.layer_norm(x[:, :, i0:i1, :n].permute(0, 2, 3, 1).to(acc), (ch,), ln_out_w, ln_out_b, eps)
        do = dout[:, i0:i1].to(acc)
        d_gate = do * (mm(xn, po_w.T) + po_b) * gate * (1 - gate)
        d_go_w += outer(d_gate, zn)
        d_go_b += d_gate.sum((0, 1, 2))
        proj = mm(zn, p_w.T) + p_b
        sig = torch.sigmoid(mm(zn, g_w.T) + g_b)
        m = 1.0 if mask is None else mask[:, i0:i1, :, None].to(acc)
        d_ab = dab[:, :, :, i0:i1, :n].permute(1, 3, 4, 0, 2).reshape(bsz, i1 - i0, n, 2 * ch).to(acc)
        d_ab = d_ab + coef * (m * sig * proj - mean_ab)
        d_proj = d_ab * m * sig
        d_sig = d_ab * m * proj * sig * (1 - sig)
        d_p_w += outer(d_proj, zn)
        d_p_b += d_proj.sum((0, 1, 2))
        d_g_w += outer(d_sig, zn)
        d_g_b += d_sig.sum((0, 1, 2))
        dzn = mm(d_proj, p_w) + mm(d_sig, g_w) + mm(d_gate, go_w)
        dzc, dw, db = _layer_norm_backward(dzn, zc, mean, rstd, ln_in_w, ln_in_b)
        d_ln_w += dw
        d_ln_b += db
        dz[:, i0:i1] = dzc.to(z.dtype)
    grads = (d_ln_w, d_ln_b, d_p_w, d_p_b, d_g_w, d_g_b, d_lo_w, d_lo_b, d_po_w, d_po_b, d_go_w, d_go_b)
    like = (ln_in_w, ln_in_b, p_w, p_b, g_w, g_b, ln_out_w, ln_out_b, po_w, po_b, go_w, go_b)
    return (dz, *(gr.to(w.dtype) for gr, w in zip(grads, like)))


class Emulation:
    """PyTorch transcriptions of the three kernels of ``genie_tk._C`` (``trimul_input``,
    ``trimul_contract``, ``trimul_output``): the same arguments, layouts and zero
    padding (``csrc/triangle_multiplication/triangle_multiplication.h``), computed
    in fp32 (fp64 for fp64 inputs). The custom ops run them on CPU tensors, which
    makes the ops testable without a GPU (dispatch never sends CPU tensors here),
    and the GPU tests check each kernel against them."""

    @staticmethod
    def _acc(t: torch.Tensor) -> torch.dtype:
        return torch.promote_types(t.dtype, torch.float32)

    @staticmethod
    def _layer_norm(x, weight, bias, eps):
        return F.layer_norm(x, x.shape[-1:], weight.to(x.dtype), bias.to(x.dtype), eps)

    @classmethod
    def trimul_input(cls, ab, moments, z, mask, ln_w, ln_b, p_w, p_b, g_w, g_b, eps, stream=0):
        acc = cls._acc(z)
        n, ch = z.shape[1], p_w.shape[0] // 2
        zn = cls._layer_norm(z.to(acc), ln_w, ln_b, eps)
        v = torch.sigmoid(F.linear(zn, g_w.to(acc), g_b.to(acc))) * F.linear(zn, p_w.to(acc), p_b.to(acc))
        if mask is not None:
            v = v * mask[..., None].to(acc)
        v = v.to(ab.dtype).unflatten(-1, (2, ch))  # [B, N, N, 2, Ch]
        ab.zero_()
        ab[..., :n] = v.permute(3, 0, 4, 1, 2)
        if moments is not None:
            a, b = v.double().unbind(-2)
            moments += torch.stack([a.sum(), (a * a).sum(), b.sum(), (b * b).sum()]).to(moments.device)

    @classmethod
    def trimul_contract(cls, out, a, b, scale, mode, stream=0):
        acc = cls._acc(a)
        n, np_ = a.shape[-2], a.shape[-1]
        # Square operands: the rows beyond N read as zero, as the TMA boxes do.
        a_sq, b_sq = (F.pad(t.to(acc), (0, 0, 0, np_ - n)) for t in (a, b))
        if mode == "ABt":
            r = a_sq @ b_sq.transpose(-1, -2)
        elif mode == "AtB":
            r = a_sq.transpose(-1, -2) @ b_sq
        elif mode == "AB":
            r = a_sq @ b_sq
        else:
            raise ValueError(f"mode must be 'ABt', 'AtB' or 'AB', got {mode!r}")
        if scale is not None:
            r = r * scale.to(acc)
        out.copy_(r[..., :n, :].to(out.dtype))

    @classmethod
    def trimul_output(cls, out, x, z, ln_in_w, ln_in_b, ln_out_w, ln_out_b, z_w, z_b, g_w, g_b, eps, stream=0):
        acc = cls._acc(z)
        n = z.shape[1]
        zn = cls._layer_norm(z.to(acc), ln_in_w, ln_in_b, eps)
        gate = torch.sigmoid(F.linear(zn, g_w.to(acc), g_b.to(acc)))
        xn = cls._layer_norm(x[..., :n].permute(0, 2, 3, 1).to(acc), ln_out_w, ln_out_b, eps)
        out.copy_((gate * F.linear(xn, z_w.to(acc), z_b.to(acc))).to(out.dtype))


def _kernels(z: Tensor):
    return _C if z.is_cuda else Emulation


def _kernel_inputs(*tensors: Tensor | None) -> list[Tensor | None]:
    """Detached (DLPack refuses tensors that require grad), contiguous, and starting on a
    16-byte boundary (TMA), copying only views that are not."""
    out = []
    for t in tensors:
        if t is not None:
            t = t.detach().contiguous()
            if t.data_ptr() % 16:
                t = t.clone()
        out.append(t)
    return out


if HAS_EXTENSION and all(hasattr(_C, name) for name in _KERNELS):

    @torch.library.custom_op("genie_tk::trimul_fwd", mutates_args=())
    def trimul_fwd(
        z: Tensor, mask: Tensor | None, ln_in_w: Tensor, ln_in_b: Tensor, p_w: Tensor, p_b: Tensor,
        g_w: Tensor, g_b: Tensor, ln_out_w: Tensor, ln_out_b: Tensor, po_w: Tensor, po_b: Tensor,
        go_w: Tensor, go_b: Tensor, outgoing: bool, eps: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Tri-mul forward on ``z [B, N, N, C]`` (contiguous; bf16/fp16 on CUDA): ``(out
        [B, N, N, C], x [B, Ch, N, Np], stats fp32 [5])``. ``mask``: fp32 ``[B, N, N]`` or
        ``None``; LayerNorm parameters and biases fp32; projection weights in z's dtype."""
        return forward(_kernels(z), *_kernel_inputs(z, mask, ln_in_w, ln_in_b, p_w, p_b, g_w, g_b, ln_out_w,
                                               ln_out_b, po_w, po_b, go_w, go_b), outgoing, eps)

    @trimul_fwd.register_fake
    def _(z, mask, ln_in_w, ln_in_b, p_w, p_b, g_w, g_b, ln_out_w, ln_out_b, po_w, po_b, go_w, go_b,
          outgoing, eps):
        b, n, _, _ = z.shape
        ch = p_w.shape[0] // 2
        return (torch.empty_like(z), z.new_empty((b, ch, n, padded(n))),
                z.new_empty(5, dtype=torch.float32))

    @torch.library.custom_op("genie_tk::trimul_bwd", mutates_args=())
    def trimul_bwd(
        dout: Tensor, z: Tensor, mask: Tensor | None, ln_in_w: Tensor, ln_in_b: Tensor, p_w: Tensor,
        p_b: Tensor, g_w: Tensor, g_b: Tensor, ln_out_w: Tensor, ln_out_b: Tensor, po_w: Tensor,
        po_b: Tensor, go_w: Tensor, go_b: Tensor, x: Tensor, stats: Tensor, outgoing: bool, eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
               Tensor, Tensor]:
        """Gradients of ``trimul_fwd``'s ``out`` for ``z`` and the twelve parameters."""
        return backward(_kernels(z), *_kernel_inputs(dout, z, mask, ln_in_w, ln_in_b, p_w, p_b, g_w, g_b, ln_out_w,
                                                ln_out_b, po_w, po_b, go_w, go_b, x, stats), outgoing, eps)

    @trimul_bwd.register_fake
    def _(dout, z, mask, *rest):
        weights = rest[:12]
        return (torch.empty_like(z), *(torch.empty_like(w) for w in weights))

    def _setup_context(ctx, inputs, output):
        z, mask, *weights, outgoing, eps = inputs
        _, x, stats = output
        ctx.save_for_backward(z, mask, *weights, x, stats)
        ctx.outgoing, ctx.eps = outgoing, eps

    def _backward(ctx, dout, _dx, _dstats):
        z, mask, *weights, x, stats = ctx.saved_tensors
        grads = torch.ops.genie_tk.trimul_bwd(dout.contiguous(), z, mask, *weights, x, stats, ctx.outgoing,
                                              ctx.eps)
        return (grads[0], None, *grads[1:], None, None)

    trimul_fwd.register_autograd(_backward, setup_context=_setup_context)
    register_tk(OP, Kernel(check=check, run=run, verified=False))
