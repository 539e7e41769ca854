"""The ``triton`` backend of triangle attention (AF2 Alg. 13/14): Triton kernels as torch custom ops.

Two custom ops, the same contract as the tk backend's (:mod:`genie_tk.tk_attention`):

* ``genie_tk::triton_attention_fwd(q, k, v, bias, mask, scale, inf) -> (o, stats)``
* ``genie_tk::triton_attention_bwd(dout, q, k, v, bias, mask, o, stats, scale, inf)
  -> (dq, dk, dv, dbias)``

with ``register_fake`` and ``register_autograd``. ``q, k, v`` are ``[B, I, H, J, D]``
(any strides with a unit stride along ``D``: the layer passes views of its projection
without copying them head-major), ``bias`` ``[B, H, J, K]``, ``mask`` ``[B, I, K]`` or
``None``; ``stats`` ``[B, I, H, J, 2]`` fp32 holds the row maximum and the log2 row sum
of the base-2 logits ``log2(e) * ((scale q.k + inf (mask - 1)) + bias)`` (OpenFold's
order of additions). Max and sum are kept apart: a fully masked row has logits near
``-1.4e9``, where a single fp32 log-sum-exp (grid 128) would lose its uniform softmax
in the backward; ``exp2((s - max) - log2sum)`` recovers it exactly.

Kernels (every program index and row offset in 64-bit, so N = 4096 and beyond are safe;
fp32 accumulation and softmax; fp32 inputs multiply in IEEE fp32, never TF32):

* ``_fwd_kernel``, one program per (b, i, h, query block): online softmax over key
  blocks; keys past N get ``-inf`` (a probability of exactly 0), query rows past N are
  computed on zeros and not stored.
* ``_bwd_dq_kernel``, per (b, i, h, query block): ``delta = rowsum(dO * O)`` (written
  for the other two kernels), then ``dq`` over key blocks.
* ``_bwd_dkdv_kernel``, per (b, i, h, key block): ``dk``, ``dv`` over query blocks.
* ``_bwd_dbias_kernel``, per (b, h, query block, key block): ``dbias`` summed over all
  rows ``i`` in fp32 registers, stored once. This recomputes ``q.k`` and ``dO.v`` (two
  of the backward's nine tile products) rather than reducing over ``i`` with atomics:
  ``I·H·N²`` fp32 atomic adds contended I ways (4.3e9 at N = 1024, H = 4) would cost
  more than the two GEMMs, and would not be deterministic; and no ``[B, I, H, N, N]``
  (N³) buffer is ever held.

On a GPU each kernel is autotuned over a few block/warp/stage configurations keyed on
the head dim and N rounded up to a power of two; ``_fits`` prunes the configurations
whose shared memory or fp32 accumulators a GPU cannot hold. Under the interpreter
(``TRITON_INTERPRET=1``, read when this module is imported) one small fixed
configuration runs, on CPU tensors. Every launch goes on the current stream and nothing
synchronises.

The layer op (:func:`run_layer`, with the fused gate op ``genie_tk::triton_gate_fwd`` /
``_bwd``) is documented there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from genie_tk import _backend

HEAD_DIMS = (16, 32, 64)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
INTERPRETED = _backend.triton_interpreted()
# Under the interpreter, whose cost is per operation and program, not per element: blocks
# of 64 give tails at every test N and two blocks (online rescaling) at N = 65.
INTERPRETER_BLOCK = 64


def check(q, k, v, bias, mask, *, head_dim: int) -> str:
    """Why the kernels cannot take this triangle attention call ("" if they can)."""
    return _check(q.dtype, head_dim)


def check_layer(z, mask, *, head_dim: int) -> str:
    """Why the kernels cannot take this ``triangle_attention_layer`` call ("" if they can)."""
    return _check(z.dtype, head_dim)


def _check(dtype: torch.dtype, head_dim: int) -> str:
    if dtype not in DTYPES:
        return f"the triton kernels take float16, bfloat16 or float32 inputs, got {dtype}"
    if head_dim not in HEAD_DIMS:
        return f"the triton kernels have head dims {HEAD_DIMS}, got {head_dim}"
    return ""


# ---------------------------------------------------------------- kernels


# ``INTERP`` (Triton's interpreter) works around two of its departures from the GPU:
# it mis-reads 16-bit tl.dot operands, so those are multiplied in fp32 after rounding to
# 16 bits (the same exact products and fp32 sums as a GPU's MMA); and it truncates
# fp32 -> bfloat16 where GPUs round to nearest even, so that rounding is done here.
# ``OPERAND`` is the operand type loaded tiles are cast to (a no-op on a GPU).


@triton.jit
def _logits(q, kt, bias_ptrs, mask_ptrs, j_ok, k_ok, scale, inf,
            HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 logits ``[BJ, BK]`` of one tile in fp32, ``-inf`` at keys past N."""
    s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale
    if HAS_MASK:
        keep = tl.load(mask_ptrs, mask=k_ok, other=1.0).to(tl.float32)
        s = s + (inf * (keep - 1.0))[None, :]
    bias = tl.load(bias_ptrs, mask=j_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    s = (s + bias) * 1.4426950408889634
    return tl.where(k_ok[None, :], s, float("-inf"))


@triton.jit
def _rounded(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in ``dtype``."""
    if INTERP:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _operand(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """``x`` rounded to the operand ``dtype`` of the next tile product."""
    x = _rounded(x, dtype, INTERP)
    if INTERP:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_kernel(Q, K, V, BIAS, MASK, OUT, STATS,
                sq_b, sq_i, sq_h, sq_j, sk_b, sk_i, sk_h, sk_j, sv_b, sv_i, sv_h, sv_j,
                sb_b, sb_h, sb_j, sm_b, sm_i,
                ROWS, H, N, N_BUCKET, scale, inf,
                HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr, OPERAND: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (b, i, h) flattened; 64-bit from here on
    h = row % H
    i = (row // H) % ROWS
    b = row // (H * ROWS)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, HEAD_DIM)
    j_ok = offs_j < N
    q = tl.load(Q + b * sq_b + i * sq_i + h * sq_h + offs_j[:, None] * sq_j + offs_d[None, :], mask=j_ok[:, None], other=0.0).to(OPERAND)
    k_ptrs = K + b * sk_b + i * sk_i + h * sk_h + offs_k[:, None] * sk_j + offs_d[None, :]
    v_ptrs = V + b * sv_b + i * sv_i + h * sv_h + offs_k[:, None] * sv_j + offs_d[None, :]
    bias_ptrs = BIAS + b * sb_b + h * sb_h + offs_j[:, None] * sb_j + offs_k[None, :]
    mask_ptrs = MASK + b * sm_b + i * sm_i + offs_k
    m_i = tl.full((BLOCK_J,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_J,), tl.float32)
    acc = tl.zeros((BLOCK_J, HEAD_DIM), tl.float32)
    for k0 in range(0, N, BLOCK_K):
        k_ok = offs_k < N - k0
        kt = tl.load(k_ptrs, mask=k_ok[:, None], other=0.0).to(OPERAND)
        vt = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0).to(OPERAND)
        s = _logits(q, kt, bias_ptrs, mask_ptrs, j_ok, k_ok, scale, inf, HAS_MASK, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(_operand(p, V.dtype.element_ty, INTERP), vt,
                                            input_precision=PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_K * sk_j
        v_ptrs += BLOCK_K * sv_j
        bias_ptrs += BLOCK_K
        mask_ptrs += BLOCK_K
    # o [B, I, H, N, D] and stats [B, I, H, N, 2] are contiguous.
    out = row * N + offs_j
    tl.store(OUT + out[:, None] * HEAD_DIM + offs_d[None, :], _rounded(acc / l_i[:, None], OUT.dtype.element_ty, INTERP),
             mask=j_ok[:, None])
    tl.store(STATS + out * 2, m_i, mask=j_ok)
    tl.store(STATS + out * 2 + 1, tl.log2(l_i), mask=j_ok)


@triton.jit
def _bwd_dq_kernel(Q, K, V, BIAS, MASK, OUT, STATS, DO, DQ, DELTA,
                   sq_b, sq_i, sq_h, sq_j, sk_b, sk_i, sk_h, sk_j, sv_b, sv_i, sv_h, sv_j,
                   sb_b, sb_h, sb_j, sm_b, sm_i, sd_b, sd_i, sd_h, sd_j,
                   ROWS, H, N, N_BUCKET, scale, inf,
                   HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr, OPERAND: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h = row % H
    i = (row // H) % ROWS
    b = row // (H * ROWS)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, HEAD_DIM)
    j_ok = offs_j < N
    out = row * N + offs_j
    q = tl.load(Q + b * sq_b + i * sq_i + h * sq_h + offs_j[:, None] * sq_j + offs_d[None, :], mask=j_ok[:, None], other=0.0).to(OPERAND)
    do = tl.load(DO + b * sd_b + i * sd_i + h * sd_h + offs_j[:, None] * sd_j + offs_d[None, :], mask=j_ok[:, None], other=0.0).to(OPERAND)
    o = tl.load(OUT + out[:, None] * HEAD_DIM + offs_d[None, :], mask=j_ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + out, delta, mask=j_ok)
    # Rows past N read zero statistics: their logits are <= 0, nothing overflows.
    m_i = tl.load(STATS + out * 2, mask=j_ok, other=0.0)
    l_i = tl.load(STATS + out * 2 + 1, mask=j_ok, other=0.0)
    k_ptrs = K + b * sk_b + i * sk_i + h * sk_h + offs_k[:, None] * sk_j + offs_d[None, :]
    v_ptrs = V + b * sv_b + i * sv_i + h * sv_h + offs_k[:, None] * sv_j + offs_d[None, :]
    bias_ptrs = BIAS + b * sb_b + h * sb_h + offs_j[:, None] * sb_j + offs_k[None, :]
    mask_ptrs = MASK + b * sm_b + i * sm_i + offs_k
    dq = tl.zeros((BLOCK_J, HEAD_DIM), tl.float32)
    for k0 in range(0, N, BLOCK_K):
        k_ok = offs_k < N - k0
        kt = tl.load(k_ptrs, mask=k_ok[:, None], other=0.0).to(OPERAND)
        vt = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0).to(OPERAND)
        s = _logits(q, kt, bias_ptrs, mask_ptrs, j_ok, k_ok, scale, inf, HAS_MASK, PRECISION)
        p = tl.exp2((s - m_i[:, None]) - l_i[:, None])
        ds = p * (tl.dot(do, tl.trans(vt), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(_operand(ds, K.dtype.element_ty, INTERP), kt, input_precision=PRECISION)
        k_ptrs += BLOCK_K * sk_j
        v_ptrs += BLOCK_K * sv_j
        bias_ptrs += BLOCK_K
        mask_ptrs += BLOCK_K
    tl.store(DQ + out[:, None] * HEAD_DIM + offs_d[None, :], _rounded(dq * scale, DQ.dtype.element_ty, INTERP),
             mask=j_ok[:, None])


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, BIAS, MASK, STATS, DO, DELTA, DK, DV,
                     sq_b, sq_i, sq_h, sq_j, sk_b, sk_i, sk_h, sk_j, sv_b, sv_i, sv_h, sv_j,
                     sb_b, sb_h, sb_j, sm_b, sm_i, sd_b, sd_i, sd_h, sd_j,
                     ROWS, H, N, N_BUCKET, scale, inf,
                     HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr, OPERAND: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h = row % H
    i = (row // H) % ROWS
    b = row // (H * ROWS)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_J)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ok = offs_k < N
    kt = tl.load(K + b * sk_b + i * sk_i + h * sk_h + offs_k[:, None] * sk_j + offs_d[None, :], mask=k_ok[:, None], other=0.0).to(OPERAND)
    vt = tl.load(V + b * sv_b + i * sv_i + h * sv_h + offs_k[:, None] * sv_j + offs_d[None, :], mask=k_ok[:, None], other=0.0).to(OPERAND)
    mask_ptrs = MASK + b * sm_b + i * sm_i + offs_k
    q_ptrs = Q + b * sq_b + i * sq_i + h * sq_h + offs_j[:, None] * sq_j + offs_d[None, :]
    do_ptrs = DO + b * sd_b + i * sd_i + h * sd_h + offs_j[:, None] * sd_j + offs_d[None, :]
    bias_ptrs = BIAS + b * sb_b + h * sb_h + offs_j[:, None] * sb_j + offs_k[None, :]
    stat = row * N + offs_j
    dk = tl.zeros((BLOCK_K, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_K, HEAD_DIM), tl.float32)
    for j0 in range(0, N, BLOCK_J):
        j_ok = offs_j < N - j0
        q = tl.load(q_ptrs, mask=j_ok[:, None], other=0.0).to(OPERAND)
        do = tl.load(do_ptrs, mask=j_ok[:, None], other=0.0).to(OPERAND)
        m_i = tl.load(STATS + stat * 2, mask=j_ok, other=0.0)
        l_i = tl.load(STATS + stat * 2 + 1, mask=j_ok, other=0.0)
        delta = tl.load(DELTA + stat, mask=j_ok, other=0.0)
        s = _logits(q, kt, bias_ptrs, mask_ptrs, j_ok, k_ok, scale, inf, HAS_MASK, PRECISION)
        # Query rows past N (zeros, zero statistics) must add nothing: drop them exactly.
        p = tl.where(j_ok[:, None], tl.exp2((s - m_i[:, None]) - l_i[:, None]), 0.0)
        dv += tl.dot(tl.trans(_operand(p, DO.dtype.element_ty, INTERP)), do, input_precision=PRECISION)
        ds = p * (tl.dot(do, tl.trans(vt), input_precision=PRECISION) - delta[:, None])
        dk += tl.dot(tl.trans(_operand(ds, Q.dtype.element_ty, INTERP)), q, input_precision=PRECISION)
        q_ptrs += BLOCK_J * sq_j
        do_ptrs += BLOCK_J * sd_j
        bias_ptrs += BLOCK_J * sb_j
        stat += BLOCK_J
    out = (row * N + offs_k)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, _rounded(dk * scale, DK.dtype.element_ty, INTERP), mask=k_ok[:, None])
    tl.store(DV + out, _rounded(dv, DV.dtype.element_ty, INTERP), mask=k_ok[:, None])


@triton.jit
def _bwd_dbias_kernel(Q, K, V, BIAS, MASK, STATS, DO, DELTA, DBIAS,
                      sq_b, sq_i, sq_h, sq_j, sk_b, sk_i, sk_h, sk_j, sv_b, sv_i, sv_h, sv_j,
                      sb_b, sb_h, sb_j, sm_b, sm_i, sd_b, sd_i, sd_h, sd_j,
                      ROWS, H, N, N_BUCKET, scale, inf,
                      HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr, OPERAND: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # (b, h)
    h = bh % H
    b = bh // H
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, HEAD_DIM)
    j_ok = offs_j < N
    k_ok = offs_k < N
    bias_ptrs = BIAS + b * sb_b + h * sb_h + offs_j[:, None] * sb_j + offs_k[None, :]
    # Row pointers advance by their strides (64-bit, as b is), never as i * stride.
    q_ptrs = Q + b * sq_b + h * sq_h + offs_j[:, None] * sq_j + offs_d[None, :]
    do_ptrs = DO + b * sd_b + h * sd_h + offs_j[:, None] * sd_j + offs_d[None, :]
    k_ptrs = K + b * sk_b + h * sk_h + offs_k[:, None] * sk_j + offs_d[None, :]
    v_ptrs = V + b * sv_b + h * sv_h + offs_k[:, None] * sv_j + offs_d[None, :]
    mask_ptrs = MASK + b * sm_b + offs_k
    stat = (b * ROWS * H + h) * N + offs_j  # statistics and delta of row (b, i, h)
    acc = tl.zeros((BLOCK_J, BLOCK_K), tl.float32)
    for _ in range(0, ROWS):
        q = tl.load(q_ptrs, mask=j_ok[:, None], other=0.0).to(OPERAND)
        do = tl.load(do_ptrs, mask=j_ok[:, None], other=0.0).to(OPERAND)
        kt = tl.load(k_ptrs, mask=k_ok[:, None], other=0.0).to(OPERAND)
        vt = tl.load(v_ptrs, mask=k_ok[:, None], other=0.0).to(OPERAND)
        m_i = tl.load(STATS + stat * 2, mask=j_ok, other=0.0)
        l_i = tl.load(STATS + stat * 2 + 1, mask=j_ok, other=0.0)
        delta = tl.load(DELTA + stat, mask=j_ok, other=0.0)
        s = _logits(q, kt, bias_ptrs, mask_ptrs, j_ok, k_ok, scale, inf, HAS_MASK, PRECISION)
        p = tl.exp2((s - m_i[:, None]) - l_i[:, None])
        acc += p * (tl.dot(do, tl.trans(vt), input_precision=PRECISION) - delta[:, None])
        q_ptrs += sq_i
        do_ptrs += sd_i
        k_ptrs += sk_i
        v_ptrs += sv_i
        mask_ptrs += sm_i
        stat += H * N
    out = ((b * H + h) * N + offs_j[:, None]) * N + offs_k[None, :]
    tl.store(DBIAS + out, _rounded(acc, DBIAS.dtype.element_ty, INTERP), mask=j_ok[:, None] & k_ok[None, :])


@triton.jit
def _gate_fwd_kernel(ATT, G, BG, Y, R, J, H, sg_r,
                     HEAD_DIM: tl.constexpr, INTERP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    hd = H * HEAD_DIM
    ok = (rows < R)[:, None] & (cols < hd)[None, :]
    bi = rows // J
    h = cols // HEAD_DIM
    o_off = (bi * H * J + rows % J) * HEAD_DIM
    o_off = o_off[:, None] + (h * J * HEAD_DIM + cols % HEAD_DIM)[None, :]
    o = tl.load(ATT + o_off, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * sg_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    bg = tl.load(BG + cols, mask=cols < hd, other=0.0).to(tl.float32)
    gate = tl.sigmoid(g + bg[None, :])
    tl.store(Y + rows[:, None] * hd + cols[None, :], _rounded(o * gate, Y.dtype.element_ty, INTERP), mask=ok)


@triton.jit
def _gate_bwd_kernel(ATT, G, BG, DY, DO, DG, R, J, H, sg_r,
                     HEAD_DIM: tl.constexpr, INTERP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    hd = H * HEAD_DIM
    ok = (rows < R)[:, None] & (cols < hd)[None, :]
    bi = rows // J
    h = cols // HEAD_DIM
    o_off = (bi * H * J + rows % J) * HEAD_DIM
    o_off = o_off[:, None] + (h * J * HEAD_DIM + cols % HEAD_DIM)[None, :]
    flat = rows[:, None] * hd + cols[None, :]
    o = tl.load(ATT + o_off, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * sg_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    bg = tl.load(BG + cols, mask=cols < hd, other=0.0).to(tl.float32)
    dy = tl.load(DY + flat, mask=ok, other=0.0).to(tl.float32)
    gate = tl.sigmoid(g + bg[None, :])
    tl.store(DO + o_off, _rounded(dy * gate, DO.dtype.element_ty, INTERP), mask=ok)
    tl.store(DG + flat, _rounded(dy * o * gate * (1.0 - gate), DG.dtype.element_ty, INTERP), mask=ok)


# ---------------------------------------------------------------- autotuning


def _configs(pairs):
    return [triton.Config({"BLOCK_J": bj, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bj, bk, w, s in pairs]


def _device_limits() -> tuple[int, int]:
    """Shared memory per block (bytes) and 32-bit registers per SM of the current GPU."""
    props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
    return props["max_shared_mem"], props.get("max_num_regs", 65536)


def _fits(config: triton.Config, head_dim: int, elt: int, streamed: int, tiles: int) -> bool:
    """Whether a GPU can hold ``config``: ``streamed`` ``[block, D]`` operand tiles per
    pipeline stage plus the bias tile in shared memory, and ``tiles`` fp32
    ``[BLOCK_J, max(BLOCK_K, D)]`` accumulators within 192 registers a thread."""
    smem, regs = _device_limits()
    bj, bk = config.kwargs["BLOCK_J"], config.kwargs["BLOCK_K"]
    block = max(bj, bk)
    stage = streamed * block * head_dim * elt + bj * bk * elt
    need_smem = config.num_stages * stage + 2 * block * head_dim * elt
    threads = 32 * config.num_warps
    need_regs = tiles * bj * max(bk, head_dim) / threads + 64
    return need_smem <= smem and need_regs <= min(192, regs // threads)


def _pruner(streamed: int, tiles: int):
    def prune(configs, named_args, **kwargs):
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        elt = named_args["Q"].element_size()
        kept = [c for c in configs if _fits(c, head_dim, elt, streamed, tiles)]
        # The smallest configuration always stays: a launch is never left without one.
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_J"] * c.kwargs["BLOCK_K"] * c.num_stages)]

    return prune


_FWD_CONFIGS = _configs([(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 4, 3), (64, 32, 4, 3)])
_BWD_CONFIGS = _configs([(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 64, 8, 3)])
_KEY = ["N_BUCKET", "HEAD_DIM", "HAS_MASK"]


def _tuned(kernel, configs, streamed: int, tiles: int):
    if INTERPRETED:
        return kernel
    return triton.autotune(configs, key=_KEY, prune_configs_by={"early_config_prune": _pruner(streamed, tiles)})(kernel)


_FWD = _tuned(_fwd_kernel, _FWD_CONFIGS, streamed=2, tiles=3)
_BWD_DQ = _tuned(_bwd_dq_kernel, _BWD_CONFIGS, streamed=2, tiles=4)
_BWD_DKDV = _tuned(_bwd_dkdv_kernel, _BWD_CONFIGS, streamed=2, tiles=5)
_BWD_DBIAS = _tuned(_bwd_dbias_kernel, _BWD_CONFIGS, streamed=4, tiles=4)
_GATE_FWD, _GATE_BWD = _gate_fwd_kernel, _gate_bwd_kernel  # elementwise: one fixed tile


# ---------------------------------------------------------------- launchers


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (a seam for the tests, which poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(kernel, grid, *args, tile: bool = True, **meta) -> None:
    """Launch ``kernel`` on the current stream (a seam for the tests)."""
    if INTERPRETED and tile:
        meta.update(BLOCK_J=INTERPRETER_BLOCK, BLOCK_K=INTERPRETER_BLOCK)
    kernel[grid](*args, **meta)


def _grid(rows: int, n: int, block: str):
    return lambda meta: (rows, triton.cdiv(n, meta[block]))


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, with unit stride along its last axis (a copy only if it had none)."""
    t = t.detach()
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _mask_arg(mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], bool]:
    """The mask as the kernels read it (bool as uint8, unit key stride), its (b, i) strides."""
    if mask is None:
        return q, (0, 0), False  # never read: HAS_MASK is False
    mask = _unit_last(mask)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask, (mask.stride(0), mask.stride(1)), True


def _operand_type(dtype: torch.dtype):
    """The tile products' operand type: the input's (fp32 under the interpreter, see INTERP)."""
    return tl.float32 if INTERPRETED else {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                                           torch.float32: tl.float32}[dtype]


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


def _common(q, k, v, bias, mask):
    q, k, v, bias = (_unit_last(t) for t in (q, k, v, bias))
    mask, m_strides, has_mask = _mask_arg(mask, q)
    strides = (*q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *bias.stride()[:3], *m_strides)
    return q, k, v, bias, mask, strides, has_mask


def _forward(q, k, v, bias, mask, scale, inf):
    b, n_i, h, n, d = q.shape
    o = _empty(q.shape, q.dtype, q.device)
    stats = _empty((b, n_i, h, n, 2), torch.float32, q.device)
    if o.numel() == 0:
        return o, stats
    q, k, v, bias, mask, strides, has_mask = _common(q, k, v, bias, mask)
    _launch(_FWD, _grid(b * n_i * h, n, "BLOCK_J"), q, k, v, bias, mask, o, stats, *strides,
            n_i, h, n, triton.next_power_of_2(n), scale, inf,
            HAS_MASK=has_mask, PRECISION=_precision(q.dtype), INTERP=INTERPRETED, OPERAND=_operand_type(q.dtype), HEAD_DIM=d)
    return o, stats


def _backward(dout, q, k, v, bias, mask, o, stats, scale, inf):
    b, n_i, h, n, d = q.shape
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)
    dbias = _empty(bias.shape, bias.dtype, bias.device)
    if q.numel() == 0:
        return dq, dk, dv, dbias.zero_()
    q, k, v, bias, mask, strides, has_mask = _common(q, k, v, bias, mask)
    dout = _unit_last(dout.to(q.dtype))
    o, stats = o.detach().contiguous(), stats.detach().contiguous()
    strides = (*strides, *dout.stride()[:4])
    delta = _empty((b, n_i, h, n), torch.float32, q.device)
    tail = (n_i, h, n, triton.next_power_of_2(n), scale, inf)
    meta = dict(HAS_MASK=has_mask, PRECISION=_precision(q.dtype), INTERP=INTERPRETED, OPERAND=_operand_type(q.dtype), HEAD_DIM=d)
    rows = b * n_i * h
    _launch(_BWD_DQ, _grid(rows, n, "BLOCK_J"), q, k, v, bias, mask, o, stats, dout, dq, delta, *strides,
            *tail, **meta)
    _launch(_BWD_DKDV, _grid(rows, n, "BLOCK_K"), q, k, v, bias, mask, stats, dout, delta, dk, dv, *strides,
            *tail, **meta)
    _launch(_BWD_DBIAS, lambda m: (b * h, triton.cdiv(n, m["BLOCK_J"]), triton.cdiv(n, m["BLOCK_K"])),
            q, k, v, bias, mask, stats, dout, delta, dbias, *strides, *tail, **meta)
    return dq, dk, dv, dbias


def _gate_launch(kernel, o, g, *args):
    b, n_i, h, n, d = o.shape
    rows = b * n_i * n
    block_c = triton.next_power_of_2(h * d)
    block_r = max(1, min(64, 4096 // block_c))  # a tile of at most 4096 elements
    _launch(kernel, (triton.cdiv(rows, block_r),), o, g, *args, rows, n, h, g.stride(-2),
            HEAD_DIM=d, INTERP=INTERPRETED, BLOCK_R=block_r, BLOCK_C=block_c, tile=False)


def _gate_forward(o, g, b_g):
    b, n_i, h, n, d = o.shape
    y = _empty((b, n_i, n, h * d), o.dtype, o.device)
    if y.numel():
        _gate_launch(_GATE_FWD, o.detach().contiguous(), _rows(g), b_g.detach().contiguous(), y)
    return y


def _gate_backward(dy, o, g, b_g):
    do = _empty(o.shape, o.dtype, o.device)
    dg = _empty(g.shape, g.dtype, g.device)
    if do.numel():
        _gate_launch(_GATE_BWD, o.detach().contiguous(), _rows(g), b_g.detach().contiguous(),
                     dy.detach().contiguous(), do, dg)
    return do, dg


def _rows(g: torch.Tensor) -> torch.Tensor:
    """``g`` ``[B, I, J, H·D]`` with unit column stride and one row stride over (b, i, j)."""
    g = _unit_last(g)
    _, n_i, n, _ = g.shape
    rs = g.stride(-2)
    return g if (g.stride(0), g.stride(1)) == (n_i * n * rs, n * rs) else g.contiguous()


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op("genie_tk::triton_attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                  mask: torch.Tensor | None, scale: float, inf: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, stats)``: see the module docstring."""
    return _forward(q, k, v, bias, mask, scale, inf)


@torch.library.custom_op("genie_tk::triton_attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                  mask: torch.Tensor | None, o: torch.Tensor, stats: torch.Tensor, scale: float,
                  inf: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dbias)`` of :func:`attention_fwd` for the cotangent ``dout`` of ``o``."""
    return _backward(dout, q, k, v, bias, mask, o, stats, scale, inf)


@attention_fwd.register_fake
def _forward_fake(q, k, v, bias, mask, scale, inf):
    b, n_i, h, n, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, n_i, h, n, 2), dtype=torch.float32)


@attention_bwd.register_fake
def _backward_fake(dout, q, k, v, bias, mask, o, stats, scale, inf):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale, inf = inputs
    o, stats = output
    ctx.save_for_backward(q, k, v, bias, mask, o, stats)
    ctx.scale, ctx.inf = scale, inf


def _autograd_backward(ctx, dout, _dstats):
    q, k, v, bias, mask, o, stats = ctx.saved_tensors
    dq, dk, dv, dbias = attention_bwd(dout, q, k, v, bias, mask, o, stats, ctx.scale, ctx.inf)
    return dq, dk, dv, dbias, None, None, None


attention_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


@torch.library.custom_op("genie_tk::triton_gate_fwd", mutates_args=())
def gate_fwd(o: torch.Tensor, g: torch.Tensor, b_g: torch.Tensor) -> torch.Tensor:
    """``o`` ``[B, I, H, J, D]`` (head-major, as the attention returns it) gated by
    ``σ(g + b_g)``, ``g`` ``[B, I, J, H·D]``: ``[B, I, J, H·D]``, ready for the output
    GEMM. One pass: the head transpose, the bias, the sigmoid and the product."""
    return _gate_forward(o, g, b_g)


@torch.library.custom_op("genie_tk::triton_gate_bwd", mutates_args=())
def gate_bwd(dy: torch.Tensor, o: torch.Tensor, g: torch.Tensor,
             b_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(do, dg)`` of :func:`gate_fwd` (``db_g`` is ``dg`` summed over rows)."""
    return _gate_backward(dy, o, g, b_g)


@gate_fwd.register_fake
def _gate_forward_fake(o, g, b_g):
    b, n_i, h, n, d = o.shape
    return o.new_empty((b, n_i, n, h * d))


@gate_bwd.register_fake
def _gate_backward_fake(dy, o, g, b_g):
    return o.new_empty(o.shape), g.new_empty(g.shape)


def _gate_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gate_autograd_backward(ctx, dy):
    o, g, b_g = ctx.saved_tensors
    do, dg = gate_bwd(dy, o, g, b_g)
    db_g = dg.sum(dim=(0, 1, 2), dtype=torch.promote_types(dg.dtype, torch.float32)).to(b_g.dtype)
    return do, dg, db_g


gate_fwd.register_autograd(_gate_autograd_backward, setup_context=_gate_setup_context)


# ---------------------------------------------------------------- backend


def run(q, k, v, bias, mask, scale, inf):
    """:func:`genie_tk.triangle_attention` on the kernels (arguments already validated)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _ = attention_fwd(q, k, v, bias, mask, scale, float(inf))
    return o


def run_layer(z, mask, weights, starting, inf, eps, transpose_bias=False):
    """:func:`genie_tk.triangle_attention_layer` with the attention core on the kernels.

    Passes over the pair tensor (``[B, N, N, C]``), forward:

    1. LayerNorm (fp32 statistics) writing ``x`` in the input dtype;
    2. one GEMM of ``x`` against the five projections concatenated
       (``[4·H·D + H, C]``): ``x`` is read once, and in the backward its gradient
       comes out of one GEMM instead of a sum of five;
    3. the attention kernel reads ``q``, ``k``, ``v`` as strided views of that
       projection (no head-major copies); only the ``[B, H, N, N]`` bias slice is
       made contiguous (``N²H``, small beside ``N²C``);
    4. one gate kernel (``genie_tk::triton_gate_fwd``) reads the head-major attention
       output and the gate slice of the projection and writes ``o·σ(g + b_g)`` in the
       ``[B, I, J, H·D]`` layout of the output GEMM: the head transpose, bias, sigmoid
       and product in one pass (PyTorch takes four, and autograd keeps their
       intermediates); its backward is one pass too (``do``, ``dg``; ``db_g`` a sum);
    5. the output GEMM (cuBLAS).

    Autograd runs the reverse. Not fused, and why: LayerNorm into the projection GEMM
    (a Triton LN-prologue GEMM would save one write and read of ``x``, ``N²C``, but C
    is 128 in AF2 layers, too short a reduction for a Triton GEMM to beat cuBLAS by
    that margin, and its backward needs ``x`` again); the gate into the attention
    epilogue (it would save the gate kernel's pass, but the backward needs the ungated
    output for ``delta`` and the gate gradient, i.e. a second output of the same size).
    Whether either pays is to be measured on a GPU (``nox -s bench``).

    ``transpose_bias`` (OpenFold3): the bias of query ``j``, key ``k`` is read from pair
    ``(k, j)``.
    """
    ln_w, ln_b, w_bias, w_q, w_k, w_v, w_g, b_g, w_o, b_o = weights
    if not starting:
        z = z.transpose(-2, -3)
        mask = None if mask is None else mask.transpose(-1, -2)
    lead, (n, _, c) = z.shape[:-3], z.shape[-3:]
    z = z.reshape(-1, n, n, c)
    mask = None if mask is None else mask.reshape(-1, n, n)
    n_h, hd = w_bias.shape[0], w_q.shape[0]
    # LayerNorm in fp32 as under autocast: its weight and bias gradients are sums over
    # all N² pairs, too long for bf16 accumulation.
    acc = torch.promote_types(z.dtype, torch.float32)
    x = F.layer_norm(z.to(acc), (c,), ln_w.to(acc), ln_b.to(acc), eps).to(z.dtype)
    proj = F.linear(x, torch.cat([w_q, w_k, w_v, w_g, w_bias]))
    bias = proj[..., 4 * hd:].permute((0, 3, 2, 1) if transpose_bias else (0, 3, 1, 2)).contiguous()  # [B, H, J, K]
    q, k, v, g = proj[..., : 4 * hd].split(hd, -1)
    q, k, v = (t.unflatten(-1, (n_h, -1)).transpose(2, 3) for t in (q, k, v))
    o = run(q, k, v, bias, mask, None, inf)  # [B, I, H, J, D]
    out = F.linear(gate_fwd(o, g, b_g), w_o, b_o)
    out = out.reshape(*lead, n, n, -1)
    return out if starting else out.transpose(-2, -3)
