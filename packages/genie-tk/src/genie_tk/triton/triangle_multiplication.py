"""The ``triton`` backend of :func:`genie_tk.triangle_multiplicative_update`.

Forward, three passes over the pair tensor (``R = B·N²`` pairs, ``C`` = c_z,
``Ch`` = c_hidden):

1. ``_input_kernel`` (Triton): per tile of ``BLOCK_M`` pairs, LayerNorm_in with
   fp32 statistics, the four gated projections on ``tl.dot`` (``a`` and ``b``
   stacked, ``[2·Ch, C]``), the mask, written channel-first ``ab [2, B, Ch, N, N]``
   so each channel is one row-major ``N × N`` matrix;
2. the per-channel contraction, ``torch.matmul`` on ``ab`` (cuBLAS batched GEMM
   on a GPU): outgoing ``x = a·bᵀ``, incoming ``x = aᵀ·b``, ``x [B, Ch, N, N]``;
3. ``_output_kernel`` (Triton): per tile, LayerNorm_out over the ``Ch`` channels
   of ``x`` (read channel-first), ``linear_z``, and the gate
   ``σ(LN_in(z) G_outᵀ + g_out)`` with LN_in recomputed from ``z``: one more read
   of ``z`` (``R·C`` values) instead of writing LN_in(z) in pass 1 and reading it
   here (twice that), for ``O(C)`` FLOPs per pair.

float16 follows OpenFold: ``a`` and ``b`` are divided by their standard
deviations (whole tensor) before the contraction so it cannot overflow. Pass 1
writes per-tile moments (Σa, Σa², Σb, Σb² of the rounded values), torch sums them
on the device (no host sync) and scales ``a`` and ``b`` in place: one extra pass
over ``ab`` that only float16 pays.

Backward keeps ``z``, the mask, the weights, ``x`` and six fp32 scalars and
recomputes the rest:

1. ``_output_bwd_kernel`` (Triton): recompute the gate and ``y = LN_out(x) W_zᵀ``,
   ``dy = dout·gate`` and the gate logits' gradient; ``dx`` through ``linear_z``
   (``tl.dot``) and LayerNorm_out, written channel-first; per-tile partial sums
   of the LayerNorm_out and bias gradients;
2. ``a``, ``b`` recomputed by ``_input_kernel``; ``da``, ``db`` by two
   ``torch.matmul`` s of the forward's shape;
3. ``_input_bwd_kernel`` (Triton): recompute LN_in, the projections and gates;
   the gradients of the projections and gates (with the float16 term through
   the two standard deviations), ``d LN_in(z)`` from them and from the output
   gate (three ``tl.dot`` s), LayerNorm_in's backward, ``dz``.

The weight gradients are reductions over all ``R`` pairs: GEMMs with ``K = R``,
done by torch on the bf16/fp16 operands the kernels write (``dy``, ``LN_out(x)``,
the gate gradients, ``LN_in(z)``) with fp32 output where torch has it; the bias
and LayerNorm gradients are the kernels' per-tile fp32 partial sums, summed by
torch (deterministic: no atomics).

Both entry points are ``torch.library.custom_op`` s (``genie_tk::triton_trimul_fwd``,
``genie_tk::triton_trimul_bwd``) with fake implementations and autograd. Launches
go on the current stream and nothing synchronises. On a GPU the kernels are
autotuned over two feature-tile widths and two warp counts, dropping
the configurations whose estimated registers or shared memory the device cannot
hold; under the interpreter one small fixed configuration runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from genie_tk._backend import triton_interpreted
from genie_tk.tk_trimul import _outer

OP = "triangle_multiplicative_update"
MAX_CHANNELS = 256  # a tile holds whole rows of C and Ch channels in registers
# Pairs per tile (fixed: the per-tile partial sums are sized by it); the interpreter's
# cost is mostly per program, so it takes bigger tiles.
# The backward kernels keep twice the whole-row state of the forward ones, so half the pairs.
GPU_BLOCK_M, GPU_BWD_BLOCK_M = 64, 32
BLOCK_M = 256 if triton_interpreted() else GPU_BLOCK_M
BWD_BLOCK_M = 256 if triton_interpreted() else GPU_BWD_BLOCK_M
_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_HALF = (torch.float16, torch.bfloat16)
# Read by the kernels when they are defined: the interpreter stores bfloat16 as raw
# bits, so its tl.dot multiplies integers and its casts truncate; the kernels then
# widen bfloat16 dot operands (exact) and round to nearest even themselves.
INTERPRETED = tl.constexpr(triton_interpreted())

# Output allocations go through this name so tests can fill them with NaN first.
_empty = torch.empty


def _device_function(fn):
    """``triton.jit`` for the kernels' helpers; under the interpreter a plain function
    (the kernel has already patched ``tl``), which saves the interpreter's per-call
    set-up of a nested jit function, most of its time at the tested sizes."""
    return fn if triton_interpreted() else triton.jit(fn)


# ------------------------------------------------------------ device helpers


@_device_function
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@_device_function
def _round(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to ``DTYPE`` (to nearest even)."""
    if INTERPRETED and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@_device_function
def _dot(a, b, DTYPE: tl.constexpr):
    """``a @ b`` with fp32 accumulation; fp32 operands in full precision (no TF32),
    as torch's fp32 matmul."""
    if DTYPE == tl.float32:
        acc = tl.dot(a, b, input_precision="ieee")
    elif INTERPRETED and DTYPE == tl.bfloat16:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(a, b)
    return acc


@_device_function
def _layer_norm_rows(x, cmask, w_ptr, b_ptr, cols, count, eps):
    """Rows of fp32 ``x [BM, BC]`` (zero outside ``cmask``): ``(x̂, rstd, x̂·w + b)``."""
    mean = tl.sum(x, 1) / count
    xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / count + eps)
    xhat = xc * rstd[:, None]
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
    return xhat, rstd, xhat * w[None, :] + b[None, :]


@_device_function
def _layer_norm_rows_backward(dy, xhat, rstd, cmask, w_ptr, cols, count):
    """Input gradient of ``_layer_norm_rows`` for the output gradient ``dy`` (fp32)."""
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    dxhat = dy * w[None, :]
    c1 = tl.sum(dxhat * xhat, 1) / count
    c2 = tl.sum(dxhat, 1) / count
    return tl.where(cmask[None, :], (dxhat - c2[:, None] - xhat * c1[:, None]) * rstd[:, None], 0.0)


@_device_function
def _pair_tile(z_ptr, ln_w, ln_b, R, C, eps, DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's ``BLOCK_M`` pairs (64-bit indices) and LN_in of their ``z`` rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    z = tl.load(z_ptr + rows[:, None] * C + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    zhat, rstd, zn = _layer_norm_rows(z.to(tl.float32), cmask, ln_w, ln_b, cols, C, eps)
    return rows, rmask, cols, cmask, zhat, rstd, _round(zn, DTYPE)


@_device_function
def _features(f0, C, CH, cols, cmask, w_ptr, b_ptr, BLOCK_H: tl.constexpr):
    """Features ``[f0, f0 + BLOCK_H)`` of the stacked a/b projection: indices, mask, and
    the weight rows ``[BLOCK_H, BLOCK_C]`` and biases (fp32)."""
    f = f0 + tl.arange(0, BLOCK_H)
    fmask = f < 2 * CH
    w = tl.load(w_ptr + f[:, None] * C + cols[None, :], mask=fmask[:, None] & cmask[None, :], other=0.0)
    b = tl.load(b_ptr + f, mask=fmask, other=0.0)
    return f, fmask, w, b


@_device_function
def _ab_offsets(rows, f, R, NN, CH):
    """Offsets of pairs ``rows`` and stacked features ``f`` in ``ab [2, B, Ch, N, N]``."""
    half = (f // CH).to(tl.int64)
    h = f % CH
    batch = rows // NN
    ij = rows % NN
    return half[None, :] * R * CH + (batch[:, None] * CH + h[None, :]) * NN + ij[:, None]


@_device_function
def _x_tile(x_ptr, rows, rmask, NN, CH, BLOCK_CH: tl.constexpr):
    """The ``Ch`` channels of pairs ``rows`` from channel-first ``x [B, Ch, N, N]``."""
    hs = tl.arange(0, BLOCK_CH)
    hmask = hs < CH
    off = ((rows // NN)[:, None] * CH + hs[None, :]) * NN + (rows % NN)[:, None]
    x = tl.load(x_ptr + off, mask=rmask[:, None] & hmask[None, :], other=0.0).to(tl.float32)
    return hs, hmask, off, x


# ------------------------------------------------------------ forward kernels


@triton.jit
def _input_kernel(ab_ptr, moments_ptr, z_ptr, mask_ptr, ln_w, ln_b, p_w, p_b, g_w, g_b, R, NN, C: tl.constexpr, CH: tl.constexpr, eps,
                  HAS_MASK: tl.constexpr, MOMENTS: tl.constexpr, DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """``ab = mask · σ(zn G_inᵀ + g_in) ⊙ (zn P_inᵀ + p_in)`` channel-first; with
    ``MOMENTS``, this tile's (Σa, Σa², Σb, Σb²) to ``moments [tiles, 4]``."""
    rows, rmask, cols, cmask, _zhat, _rstd, zn = _pair_tile(z_ptr, ln_w, ln_b, R, C, eps, DTYPE, BLOCK_M, BLOCK_C)
    keep = rmask.to(tl.float32)
    if HAS_MASK:
        keep = tl.load(mask_ptr + rows, mask=rmask, other=0.0)
    sum_a = tl.zeros([BLOCK_M], tl.float32)
    sq_a = tl.zeros([BLOCK_M], tl.float32)
    sum_b = tl.zeros([BLOCK_M], tl.float32)
    sq_b = tl.zeros([BLOCK_M], tl.float32)
    for f0 in range(0, 2 * CH, BLOCK_H):
        f, fmask, wp, bp = _features(f0, C, CH, cols, cmask, p_w, p_b, BLOCK_H)
        _f, _fmask, wg, bg = _features(f0, C, CH, cols, cmask, g_w, g_b, BLOCK_H)
        proj = _dot(zn, tl.trans(wp), DTYPE) + bp[None, :]
        gate = _dot(zn, tl.trans(wg), DTYPE) + bg[None, :]
        v = _round(_sigmoid(gate) * proj * keep[:, None], DTYPE)
        tl.store(ab_ptr + _ab_offsets(rows, f, R, NN, CH), v, mask=rmask[:, None] & fmask[None, :])
        if MOMENTS:
            vf = tl.where(fmask[None, :], v.to(tl.float32), 0.0)
            is_a = (f < CH)[None, :]
            va = tl.where(is_a, vf, 0.0)
            vb = tl.where(is_a, 0.0, vf)
            sum_a += tl.sum(va, 1)
            sq_a += tl.sum(va * va, 1)
            sum_b += tl.sum(vb, 1)
            sq_b += tl.sum(vb * vb, 1)
    if MOMENTS:
        out = moments_ptr + tl.program_id(0).to(tl.int64) * 4
        tl.store(out, tl.sum(sum_a, 0))
        tl.store(out + 1, tl.sum(sq_a, 0))
        tl.store(out + 2, tl.sum(sum_b, 0))
        tl.store(out + 3, tl.sum(sq_b, 0))


@triton.jit
def _output_kernel(out_ptr, x_ptr, z_ptr, ln_w, ln_b, lo_w, lo_b, po_w, po_b, go_w, go_b, R, NN, C: tl.constexpr, CH: tl.constexpr, eps,
                   DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CH: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """``out = σ(zn G_outᵀ + g_out) ⊙ (LN_out(x) W_zᵀ + b_z)`` for a tile of pairs."""
    rows, rmask, cols, cmask, _zhat, _rstd, zn = _pair_tile(z_ptr, ln_w, ln_b, R, C, eps, DTYPE, BLOCK_M, BLOCK_C)
    hs, hmask, _x_off, x = _x_tile(x_ptr, rows, rmask, NN, CH, BLOCK_CH)
    _xhat, _xrstd, xn = _layer_norm_rows(x, hmask, lo_w, lo_b, hs, CH, eps)
    xn = _round(xn, DTYPE)
    for n0 in range(0, C, BLOCK_N):
        o = n0 + tl.arange(0, BLOCK_N)
        omask = o < C
        wz = tl.load(po_w + o[:, None] * CH + hs[None, :], mask=omask[:, None] & hmask[None, :], other=0.0)
        wg = tl.load(go_w + o[:, None] * C + cols[None, :], mask=omask[:, None] & cmask[None, :], other=0.0)
        y = _dot(xn, tl.trans(wz), DTYPE) + tl.load(po_b + o, mask=omask, other=0.0)[None, :]
        gate = _sigmoid(_dot(zn, tl.trans(wg), DTYPE) + tl.load(go_b + o, mask=omask, other=0.0)[None, :])
        tl.store(out_ptr + rows[:, None] * C + o[None, :], _round(gate * y, DTYPE),
                 mask=rmask[:, None] & omask[None, :])


# ------------------------------------------------------------ backward kernels


@triton.jit
def _output_bwd_kernel(dx_ptr, dy_ptr, dgl_ptr, xn_ptr, part_ptr, dout_ptr, x_ptr, z_ptr, ln_w, ln_b, lo_w, lo_b,
                       po_w, po_b, go_w, go_b, R, NN, C: tl.constexpr, CH: tl.constexpr, eps, PART, DTYPE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CH: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Output side of the backward for a tile of pairs: ``dx`` (channel-first), ``dy =
    dout·gate`` and the gate logits' gradient ``dgl`` (pair-major, for the weight
    GEMMs), ``LN_out(x)``; partial sums to ``part [tiles, PART]``: d lo_w, d lo_b
    (``Ch`` each), Σ dx·x, d po_b, d go_b (``C`` each)."""
    rows, rmask, cols, cmask, _zhat, _zrstd, zn = _pair_tile(z_ptr, ln_w, ln_b, R, C, eps, DTYPE, BLOCK_M, BLOCK_C)
    hs, hmask, x_off, x = _x_tile(x_ptr, rows, rmask, NN, CH, BLOCK_CH)
    xhat, rstd, xn = _layer_norm_rows(x, hmask, lo_w, lo_b, hs, CH, eps)
    xn = _round(xn, DTYPE)
    part = part_ptr + tl.program_id(0).to(tl.int64) * PART
    dxn = tl.zeros([BLOCK_M, BLOCK_CH], tl.float32)
    for n0 in range(0, C, BLOCK_N):
        o = n0 + tl.arange(0, BLOCK_N)
        omask = o < C
        wz = tl.load(po_w + o[:, None] * CH + hs[None, :], mask=omask[:, None] & hmask[None, :], other=0.0)
        wg = tl.load(go_w + o[:, None] * C + cols[None, :], mask=omask[:, None] & cmask[None, :], other=0.0)
        y = _dot(xn, tl.trans(wz), DTYPE) + tl.load(po_b + o, mask=omask, other=0.0)[None, :]
        gate = _sigmoid(_dot(zn, tl.trans(wg), DTYPE) + tl.load(go_b + o, mask=omask, other=0.0)[None, :])
        tile = rmask[:, None] & omask[None, :]
        do = tl.load(dout_ptr + rows[:, None] * C + o[None, :], mask=tile, other=0.0).to(tl.float32)
        dy = do * gate
        dgl = do * y * gate * (1.0 - gate)
        dy_r = _round(dy, DTYPE)
        tl.store(dy_ptr + rows[:, None] * C + o[None, :], dy_r, mask=tile)
        tl.store(dgl_ptr + rows[:, None] * C + o[None, :], _round(dgl, DTYPE), mask=tile)
        tl.store(part + 2 * CH + 1 + o, tl.sum(dy, 0), mask=omask)
        tl.store(part + 2 * CH + 1 + C + o, tl.sum(dgl, 0), mask=omask)
        dxn += _dot(dy_r, wz, DTYPE)
    xtile = rmask[:, None] & hmask[None, :]
    tl.store(xn_ptr + rows[:, None] * CH + hs[None, :], xn, mask=xtile)
    tl.store(part + hs, tl.sum(dxn * xhat, 0), mask=hmask)
    tl.store(part + CH + hs, tl.sum(dxn, 0), mask=hmask)
    dx = _round(_layer_norm_rows_backward(dxn, xhat, rstd, hmask, lo_w, hs, CH), DTYPE)
    tl.store(dx_ptr + x_off, dx, mask=xtile)
    # x again (L2-hot) rather than kept live through the loop.
    x = tl.load(x_ptr + x_off, mask=xtile, other=0.0).to(tl.float32)
    tl.store(part + 2 * CH, tl.sum(tl.sum(dx.to(tl.float32) * x, 1), 0))


@triton.jit
def _input_bwd_kernel(dz_ptr, zn_ptr, dproj_ptr, dsig_ptr, part_ptr, dab_ptr, dgl_ptr, z_ptr, mask_ptr, ln_w, ln_b,
                      p_w, p_b, g_w, g_b, go_w, norm_ptr, R, NN, C: tl.constexpr, CH: tl.constexpr, eps, PART, HAS_MASK: tl.constexpr,
                      NORMALISED: tl.constexpr, DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """Input side of the backward for a tile of pairs: from ``dab`` (the gradient of
    the contraction's operands, channel-first) and ``dgl``, the projections' and
    gates' gradients (pair-major), ``LN_in(z)`` and ``dz``; partial sums to ``part``:
    d ln_w, d ln_b (``C`` each), d p_b, d g_b (``2·Ch`` each). ``NORMALISED``
    (float16): ``norm = (s_a, s_b, coef_a, coef_b, mean_a, mean_b)`` and the operands'
    gradient is ``s·dab + coef·(v - mean)``, the last term through the two stds."""
    rows, rmask, cols, cmask, zhat, rstd, zn = _pair_tile(z_ptr, ln_w, ln_b, R, C, eps, DTYPE, BLOCK_M, BLOCK_C)
    ztile = rmask[:, None] & cmask[None, :]
    keep = rmask.to(tl.float32)
    if HAS_MASK:
        keep = tl.load(mask_ptr + rows, mask=rmask, other=0.0)
    part = part_ptr + tl.program_id(0).to(tl.int64) * PART
    dgl = tl.load(dgl_ptr + rows[:, None] * C + cols[None, :], mask=ztile, other=0.0)
    wgo = tl.load(go_w + cols[:, None] * C + cols[None, :], mask=cmask[:, None] & cmask[None, :], other=0.0)
    dzn = _dot(dgl, wgo, DTYPE)
    for f0 in range(0, 2 * CH, BLOCK_H):
        f, fmask, wp, bp = _features(f0, C, CH, cols, cmask, p_w, p_b, BLOCK_H)
        _f, _fmask, wg, bg = _features(f0, C, CH, cols, cmask, g_w, g_b, BLOCK_H)
        proj = _dot(zn, tl.trans(wp), DTYPE) + bp[None, :]
        sig = _sigmoid(_dot(zn, tl.trans(wg), DTYPE) + bg[None, :])
        tile = rmask[:, None] & fmask[None, :]
        d = tl.load(dab_ptr + _ab_offsets(rows, f, R, NN, CH), mask=tile, other=0.0).to(tl.float32)
        if NORMALISED:
            is_a = f < CH
            scale = tl.where(is_a, tl.load(norm_ptr), tl.load(norm_ptr + 1))
            coef = tl.where(is_a, tl.load(norm_ptr + 2), tl.load(norm_ptr + 3))
            mean = tl.where(is_a, tl.load(norm_ptr + 4), tl.load(norm_ptr + 5))
            d = d * scale[None, :] + coef[None, :] * (keep[:, None] * sig * proj - mean[None, :])
        dm = d * keep[:, None]
        dproj = dm * sig
        dsig = dm * proj * sig * (1.0 - sig)
        dproj_r = _round(dproj, DTYPE)
        dsig_r = _round(dsig, DTYPE)
        out = rows[:, None] * 2 * CH + f[None, :]
        tl.store(dproj_ptr + out, dproj_r, mask=tile)
        tl.store(dsig_ptr + out, dsig_r, mask=tile)
        tl.store(part + 2 * C + f, tl.sum(dproj, 0), mask=fmask)
        tl.store(part + 2 * C + 2 * CH + f, tl.sum(dsig, 0), mask=fmask)
        dzn += _dot(dproj_r, wp, DTYPE) + _dot(dsig_r, wg, DTYPE)
    tl.store(zn_ptr + rows[:, None] * C + cols[None, :], zn, mask=ztile)
    tl.store(part + cols, tl.sum(dzn * zhat, 0), mask=cmask)
    tl.store(part + C + cols, tl.sum(dzn, 0), mask=cmask)
    dz = _layer_norm_rows_backward(dzn, zhat, rstd, cmask, ln_w, cols, C)
    tl.store(dz_ptr + rows[:, None] * C + cols[None, :], _round(dz, DTYPE), mask=ztile)


# ------------------------------------------------------------ launch configurations


def _block(n: int) -> int:
    """A whole row of ``n`` channels as a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(n))


def _device_limits() -> tuple[int, int]:
    """(shared memory per block in bytes, 32-bit registers per thread) of the current GPU."""
    props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
    return int(props["max_shared_mem"]), 255


def fits(config: triton.Config, named_args: dict, shared_bytes: int, registers: int, rows: float = 1.0) -> bool:
    """Whether a configuration's estimated shared memory (the ``tl.dot`` operands of
    one feature tile, times the stages) and fp32 registers per thread (``rows`` whole-row
    fp32 ``[BLOCK_M, K]`` tensors the kernel keeps live, plus four feature-tile
    temporaries) fit the GPU. An estimate: ``benchmarks/triton_trimul_compile.py`` prints
    ptxas' counts beside it; the autotuner then times the configurations it keeps."""
    kw = {**named_args, **config.kwargs}
    width = kw.get("BLOCK_H", kw.get("BLOCK_N"))
    k = max(kw["BLOCK_C"], kw.get("BLOCK_CH", 0))
    elt = 4 if kw["DTYPE"] == tl.float32 else 2
    block_m = kw.get("BLOCK_M", GPU_BLOCK_M)
    smem = (block_m * k + 2 * width * k) * elt * max(1, config.num_stages)
    live = block_m * (rows * k + 4 * width)
    return smem <= shared_bytes and live / (32 * config.num_warps) <= 0.75 * registers


def _pruner(rows: float):
    def prune(configs, named_args, **kwargs):
        shared, registers = _device_limits()
        kept = [c for c in configs if fits(c, {**named_args, **kwargs}, shared, registers, rows)]
        # The smallest configuration always runs, possibly spilling, rather than none.
        return kept or [min(configs, key=lambda c: (c.kwargs.get("BLOCK_H", c.kwargs.get("BLOCK_N")), c.num_stages))]

    return prune


def _configs(name: str) -> list[triton.Config]:
    # Four: each is compiled on first use per (C, Ch, dtype), seconds apiece.
    return [triton.Config({name: w}, num_warps=nw, num_stages=2) for w in (32, 64) for nw in (4, 8)]


def _tuned(kernel, name: str, rows: float):
    """``(kernel, fixed launch arguments)``: autotuned on a GPU over ``name`` (the
    feature tile), warps and stages, pruned by :func:`fits` with the kernel's ``rows``
    of live whole-row state; one small configuration under the interpreter."""
    if triton_interpreted():
        return kernel, {name: 64}
    tuned = triton.autotune(_configs(name), key=["C", "CH", "DTYPE"],
                            prune_configs_by={"early_config_prune": _pruner(rows)})
    return tuned(kernel), {}


# Live whole-row state (fp32 units): zn (half); zn, xn (halves); zn, xn, x̂, dxn; zn, ẑ, dzn.
_INPUT, _INPUT_ARGS = _tuned(_input_kernel, "BLOCK_H", 0.5)
_OUTPUT, _OUTPUT_ARGS = _tuned(_output_kernel, "BLOCK_N", 1.0)
_OUTPUT_BWD, _OUTPUT_BWD_ARGS = _tuned(_output_bwd_kernel, "BLOCK_N", 3.0)
_INPUT_BWD, _INPUT_BWD_ARGS = _tuned(_input_bwd_kernel, "BLOCK_H", 2.5)


# ------------------------------------------------------------ launchers


def _tiles(rows: int, block: int = BLOCK_M) -> int:
    return triton.cdiv(rows, block)


def _launch_input(ab, moments, z, mask, ln_w, ln_b, p_w, p_b, g_w, g_b, eps):
    b, n, _, c = z.shape
    ch = p_w.shape[0] // 2
    r = b * n * n
    _INPUT[(_tiles(r),)](ab, moments, z, mask, ln_w, ln_b, p_w, p_b, g_w, g_b, r, n * n, c, ch, eps,
                         HAS_MASK=mask is not None, MOMENTS=moments is not None, DTYPE=_DTYPES[z.dtype],
                         BLOCK_M=BLOCK_M, BLOCK_C=_block(c), **_INPUT_ARGS)


def _launch_output(out, x, z, ln_w, ln_b, lo_w, lo_b, po_w, po_b, go_w, go_b, eps):
    b, n, _, c = z.shape
    ch = x.shape[1]
    r = b * n * n
    _OUTPUT[(_tiles(r),)](out, x, z, ln_w, ln_b, lo_w, lo_b, po_w, po_b, go_w, go_b, r, n * n, c, ch, eps,
                          DTYPE=_DTYPES[z.dtype], BLOCK_M=BLOCK_M, BLOCK_C=_block(c), BLOCK_CH=_block(ch),
                          **_OUTPUT_ARGS)


def _contract(out, a, b, outgoing):
    """Per channel ``out = a bᵀ`` (outgoing) or ``aᵀ b`` (incoming), ``[B, Ch, N, N]``."""
    torch.matmul(a, b.transpose(-1, -2), out=out) if outgoing else torch.matmul(a.transpose(-1, -2), b, out=out)


def _normalisation(moments: Tensor | None, count: int, device: torch.device) -> Tensor:
    """fp32 ``[6]``: ``(s_a, s_b, std_a, std_b, mean_a, mean_b)`` from the per-tile moments.

    ``s = 1/std`` (unbiased, as ``Tensor.std``) when both stds are non-zero, as
    OpenFold's float16 branch; otherwise, and without moments (bfloat16, float32),
    ``s = 1`` and both stds read 0 so the backward adds no term through them.
    """
    stats = torch.zeros(6, device=device)
    if moments is None:
        stats[:2] = 1.0
        return stats
    m = moments.double().sum(0)
    sums, squares = m[0::2], m[1::2]
    mean = sums / count
    std = ((squares - sums * mean) / max(count - 1, 1)).clamp_min(0).sqrt()
    ok = (std[0] != 0) & (std[1] != 0)
    scale = torch.where(ok, 1 / std.clamp_min(1e-300), torch.ones_like(std))
    std = torch.where(ok, std, torch.zeros_like(std))
    return torch.cat([scale, std, mean]).float()


def _input_pass(z, mask, ln_w, ln_b, p_w, p_b, g_w, g_b, eps, stats=None):
    """``(ab [2, B, Ch, N, N], stats)``; float16 ``a``, ``b`` come out normalised (the
    stats from their moments, or the given ``stats`` when recomputing)."""
    b, n, _, _ = z.shape
    ch = p_w.shape[0] // 2
    ab = _empty((2, b, ch, n, n), dtype=z.dtype, device=z.device)
    normalise = z.dtype == torch.float16
    moments = None
    if normalise and stats is None:
        moments = _empty((_tiles(b * n * n), 4), dtype=torch.float32, device=z.device)
    _launch_input(ab, moments, z, mask, ln_w, ln_b, p_w, p_b, g_w, g_b, eps)
    if stats is None:
        stats = _normalisation(moments, b * n * n * ch, z.device)
    if normalise:
        ab[0].mul_(stats[0])
        ab[1].mul_(stats[1])
    return ab, stats


def forward(z, mask, ln_w, ln_b, p_w, p_b, g_w, g_b, lo_w, lo_b, po_w, po_b, go_w, go_b, outgoing, eps):
    """``(out [B, N, N, C], x [B, Ch, N, N], stats fp32 [6])``; arguments as ``triton_trimul_fwd``."""
    b, n, _, _ = z.shape
    ab, stats = _input_pass(z, mask, ln_w, ln_b, p_w, p_b, g_w, g_b, eps)
    x = _empty((b, ab.shape[2], n, n), dtype=z.dtype, device=z.device)
    _contract(x, ab[0], ab[1], outgoing)
    del ab
    out = _empty(z.shape, dtype=z.dtype, device=z.device)
    _launch_output(out, x, z, ln_w, ln_b, lo_w, lo_b, po_w, po_b, go_w, go_b, eps)
    return out, x, stats


def backward(dout, z, mask, ln_w, ln_b, p_w, p_b, g_w, g_b, lo_w, lo_b, po_w, po_b, go_w, go_b, x, stats,
             outgoing, eps):
    """``(dz, d ln_w, d ln_b, d p_w, d p_b, d g_w, d g_b, d lo_w, d lo_b, d po_w, d po_b,
    d go_w, d go_b)`` of :func:`forward`, each in its input's dtype."""
    b, n, _, c = z.shape
    ch = x.shape[1]
    r = b * n * n
    cd, dev = z.dtype, z.device
    tiles = _tiles(r, BWD_BLOCK_M)

    # 1. Output side: dx (channel-first), dy, the gate logits' gradient, LN_out(x).
    dx = _empty(x.shape, dtype=cd, device=dev)
    dy = _empty((r, c), dtype=cd, device=dev)
    dgl = _empty((r, c), dtype=cd, device=dev)
    xn = _empty((r, ch), dtype=cd, device=dev)
    part1 = _empty((tiles, 2 * ch + 1 + 2 * c), dtype=torch.float32, device=dev)
    _OUTPUT_BWD[(tiles,)](dx, dy, dgl, xn, part1, dout, x, z, ln_w, ln_b, lo_w, lo_b, po_w, po_b, go_w, go_b,
                          r, n * n, c, ch, eps, part1.shape[1], DTYPE=_DTYPES[cd], BLOCK_M=BWD_BLOCK_M,
                          BLOCK_C=_block(c), BLOCK_CH=_block(ch), **_OUTPUT_BWD_ARGS)
    d_po_w = _outer(dy, xn, cd)
    del dy, xn
    p1 = part1.sum(0)
    d_lo_w, d_lo_b, dxx = p1[:ch], p1[ch:2 * ch], part1[:, 2 * ch].double().sum()
    d_po_b, d_go_b = p1[2 * ch + 1:2 * ch + 1 + c], p1[2 * ch + 1 + c:]

    # 2. The contraction's operands, recomputed, and their gradients (two matmuls).
    ab, _ = _input_pass(z, mask, ln_w, ln_b, p_w, p_b, g_w, g_b, eps, stats)
    dab = _empty(ab.shape, dtype=cd, device=dev)
    if outgoing:  # x = a bᵀ: da = dx b, db = dxᵀ a
        torch.matmul(dx, ab[1], out=dab[0])
        torch.matmul(dx.transpose(-1, -2), ab[0], out=dab[1])
    else:  # x = aᵀ b: da = b dxᵀ, db = a dx
        torch.matmul(ab[1], dx.transpose(-1, -2), out=dab[0])
        torch.matmul(ab[0], dx, out=dab[1])
    del ab, dx

    # 3. Input side. float16: d v += coef (v - mean), coef = -Σ dx·x / ((count - 1) std²).
    normalised = cd == torch.float16
    norm = stats
    if normalised:
        count = b * n * n * ch
        std = stats[2:4].double()
        coef = torch.where(std > 0, -dxx / (max(count - 1, 1) * std.clamp_min(1e-300) ** 2), torch.zeros_like(std))
        norm = torch.cat([stats[:2], coef.float(), stats[4:6]])
    dz = _empty(z.shape, dtype=cd, device=dev)
    zn = _empty((r, c), dtype=cd, device=dev)
    dproj = _empty((r, 2 * ch), dtype=cd, device=dev)
    dsig = _empty((r, 2 * ch), dtype=cd, device=dev)
    part3 = _empty((tiles, 2 * c + 4 * ch), dtype=torch.float32, device=dev)
    _INPUT_BWD[(tiles,)](dz, zn, dproj, dsig, part3, dab, dgl, z, mask, ln_w, ln_b, p_w, p_b, g_w, g_b, go_w, norm,
                         r, n * n, c, ch, eps, part3.shape[1], HAS_MASK=mask is not None, NORMALISED=normalised,
                         DTYPE=_DTYPES[cd], BLOCK_M=BWD_BLOCK_M, BLOCK_C=_block(c), **_INPUT_BWD_ARGS)
    del dab
    p3 = part3.sum(0)
    d_ln_w, d_ln_b = p3[:c], p3[c:2 * c]
    d_p_b, d_g_b = p3[2 * c:2 * c + 2 * ch], p3[2 * c + 2 * ch:]
    d_p_w, d_g_w, d_go_w = _outer(dproj, zn, cd), _outer(dsig, zn, cd), _outer(dgl, zn, cd)
    grads = (d_ln_w, d_ln_b, d_p_w, d_p_b, d_g_w, d_g_b, d_lo_w, d_lo_b, d_po_w, d_po_b, d_go_w, d_go_b)
    like = (ln_w, ln_b, p_w, p_b, g_w, g_b, lo_w, lo_b, po_w, po_b, go_w, go_b)
    # Copies: several gradients are slices of one sum, and a custom op's outputs must not alias.
    return (dz, *(gr.to(w.dtype, copy=True) for gr, w in zip(grads, like)))


# ------------------------------------------------------------ custom ops


def _prepared(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.detach().contiguous() for t in tensors]


def _on_device(fn, z, *args):
    if z.is_cuda:
        with torch.cuda.device(z.device):
            return fn(z, *args)
    return fn(z, *args)


@torch.library.custom_op("genie_tk::triton_trimul_fwd", mutates_args=())
def triton_trimul_fwd(
    z: Tensor, mask: Tensor | None, ln_in_w: Tensor, ln_in_b: Tensor, p_w: Tensor, p_b: Tensor,
    g_w: Tensor, g_b: Tensor, ln_out_w: Tensor, ln_out_b: Tensor, po_w: Tensor, po_b: Tensor,
    go_w: Tensor, go_b: Tensor, outgoing: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Tri-mul forward on ``z [B, N, N, C]`` (fp16/bf16/fp32): ``(out [B, N, N, C],
    x [B, Ch, N, N], stats fp32 [6])``. ``mask``: fp32 ``[B, N, N]`` or ``None``;
    LayerNorm parameters and biases fp32; projection weights in z's dtype."""
    args = _prepared(z, mask, ln_in_w, ln_in_b, p_w, p_b, g_w, g_b, ln_out_w, ln_out_b, po_w, po_b, go_w, go_b)
    return _on_device(forward, *args, outgoing, eps)


@triton_trimul_fwd.register_fake
def _(z, mask, ln_in_w, ln_in_b, p_w, p_b, g_w, g_b, ln_out_w, ln_out_b, po_w, po_b, go_w, go_b, outgoing, eps):
    b, n, _, _ = z.shape
    return torch.empty_like(z), z.new_empty((b, p_w.shape[0] // 2, n, n)), z.new_empty(6, dtype=torch.float32)


@torch.library.custom_op("genie_tk::triton_trimul_bwd", mutates_args=())
def triton_trimul_bwd(
    dout: Tensor, z: Tensor, mask: Tensor | None, ln_in_w: Tensor, ln_in_b: Tensor, p_w: Tensor,
    p_b: Tensor, g_w: Tensor, g_b: Tensor, ln_out_w: Tensor, ln_out_b: Tensor, po_w: Tensor,
    po_b: Tensor, go_w: Tensor, go_b: Tensor, x: Tensor, stats: Tensor, outgoing: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor]:
    """Gradients of ``triton_trimul_fwd``'s ``out`` for ``z`` and the twelve parameters."""
    args = _prepared(dout.to(z.dtype), z, mask, ln_in_w, ln_in_b, p_w, p_b, g_w, g_b, ln_out_w, ln_out_b, po_w,
                     po_b, go_w, go_b, x, stats)
    return _on_device(backward, *args, outgoing, eps)


@triton_trimul_bwd.register_fake
def _(dout, z, mask, *rest):
    return (torch.empty_like(z), *(torch.empty_like(w) for w in rest[:12]))


def _setup_context(ctx, inputs, output):
    z, mask, *weights, outgoing, eps = inputs
    _, x, stats = output
    ctx.save_for_backward(z, mask, *weights, x, stats)
    ctx.outgoing, ctx.eps = outgoing, eps


def _backward(ctx, dout, _dx, _dstats):
    z, mask, *weights, x, stats = ctx.saved_tensors
    grads = torch.ops.genie_tk.triton_trimul_bwd(dout, z, mask, *weights, x, stats, ctx.outgoing, ctx.eps)
    return (grads[0], None, *grads[1:], None, None)


triton_trimul_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------ dispatch entry points


def compute_dtype(z: Tensor) -> tuple[torch.dtype | None, str]:
    """The dtype the kernels run in for input ``z`` and, if they cannot, why not.

    float16, bfloat16 and float32 inputs run in their own dtype; float32 under
    autocast (on z's device type) to a half type runs in that type.
    """
    device = z.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if z.dtype in _HALF:
        if autocast is not None and autocast != z.dtype:
            return None, f"{z.dtype} inputs under {autocast} autocast: the triton kernels compute in one dtype"
        return z.dtype, ""
    if z.dtype == torch.float32:
        return (autocast if autocast in _HALF else torch.float32), ""
    return None, f"the triton kernels take float16, bfloat16 or float32 inputs, got {z.dtype}"


def check(z: Tensor, mask: Tensor | None = None, *, hidden: int) -> str:
    """Why the triton kernels cannot run this call ("" if they can); devices are checked by the caller."""
    _, reason = compute_dtype(z)
    if reason:
        return reason
    c = z.shape[-1]
    if c > MAX_CHANNELS:
        return f"c_z = {c}: the triton kernels hold a pair's channels in registers, at most {MAX_CHANNELS}"
    if hidden > MAX_CHANNELS:
        return f"c_hidden = {hidden}: the triton kernels hold a pair's channels in registers, at most {MAX_CHANNELS}"
    if z.numel() == 0:
        return "the input is empty"
    return ""


def run(z: Tensor, mask: Tensor | None, weights: tuple[Tensor, ...], outgoing: bool, eps: float) -> Tensor:
    """The triton backend: ``z [*, N, N, C]``, ``mask [*, N, N]`` or ``None``, ``weights``
    in :func:`genie_tk.triangle_multiplicative_update`'s order. Returns ``[*, N, N, C]``
    in the compute dtype."""
    dtype, _ = compute_dtype(z)
    lead, n, c = z.shape[:-3], z.shape[-2], z.shape[-1]
    zb = z.reshape(-1, n, n, c).to(dtype)
    mb = None if mask is None else mask.reshape(-1, n, n).to(torch.float32)
    (ln_w, ln_b, p_w, p_b, g_w, g_b, lo_w, lo_b, po_w, po_b, go_w, go_b) = weights

    def f32(t):
        return t.to(torch.float32)

    def cast(t):
        return t.to(dtype)

    with torch.autocast(z.device.type, enabled=False):
        out, _, _ = torch.ops.genie_tk.triton_trimul_fwd(
            zb, mb, f32(ln_w), f32(ln_b), cast(p_w), f32(p_b), cast(g_w), f32(g_b),
            f32(lo_w), f32(lo_b), cast(po_w), f32(po_b), cast(go_w), f32(go_b), outgoing, float(eps),
        )
    return out.reshape(*lead, n, n, c)
