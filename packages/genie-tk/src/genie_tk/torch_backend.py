"""The ``torch`` backend: exact, memory-efficient PyTorch implementations.

Triangle attention never holds the ``[B, I, H, J, K]`` logits: rows ``i`` are
processed in chunks, the forward keeps only the softmax log-normaliser
(``[B, I, H, J]``), and the backward recomputes each chunk (flash-attention's
scheme, in PyTorch). The whole attention *layer* (LayerNorm, projections,
attention, gate, output projection) is one autograd node that saves only its
input, the ``[B, H, N, N]`` triangle bias and the log-normaliser, so its memory
for backward is O(N²·(C + H)) instead of O(N³·H); every O(N²·C) activation is
recomputed chunk by chunk.

Arithmetic follows OpenFold's order where it is observable in float64:
``q / sqrt(D)`` first, then ``(q·k + mask_bias) + triangle_bias``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genie_tk.reference import fp16_enabled

# Elements of one chunk's logits ([B, c, H, J, K]) when no chunk size is given; 2**20
# floats is 4 MiB: a chunk's logits, probabilities and their gradient stay near the
# CPU's caches between the products and the softmax, which is what makes the
# chunked path faster than the plain one once the whole logits no longer fit.
_CHUNK_ELEMENTS = 1 << 20

#: Largest working set (bytes of the plain computation's biggest intermediate: the
#: ``[B, I, H, J, K]`` logits of attention, one ``[B, N, N, max(2·Ch, C)]`` activation of
#: the tri-mul) for which the torch backend runs the plain computation of
#: :mod:`genie_tk.reference` instead of the chunked one. Below it the plain path is as
#: fast and no larger (nothing to save by chunking while everything sits in cache);
#: above it the chunked path is faster and smaller. The values come from
#: ``benchmarks/torch_vs_reference.py`` on one CPU thread; 0 forces the chunked path.
#: For the tri-mul in training the memory-efficient node recomputes its projections in
#: backward (about a fifth more arithmetic at AF2's widths), so plain autograd stays the
#: choice until its activations (about sixteen of that size) grow large: 64 MiB is
#: N = 256 at ``C = Ch = 128``, batch 1.
PLAIN_BYTES = {"triangle_attention": 4 << 20, "triangle_attention_layer": 4 << 20,
               "triangle_multiplicative_update": 4 << 20, "triangle_multiplicative_update_grad": 64 << 20}

#: Elements of the widest per-pair intermediate in one block of the tri-mul's inference
#: path (1 MiB of float32): a block's passes find their inputs in cache.
_CACHE_ELEMENTS = 1 << 18

_PATH: dict[str, str] = {}


def last_path(op: str) -> str | None:
    """``"plain"`` or ``"efficient"``: how the latest torch-backend call of ``op`` ran."""
    return _PATH.get(op)


def plain(op: str, working_bytes: int, chunk_size: int | None, grad: bool = False,
          float16: bool = False) -> bool:
    """Whether the torch backend runs ``op`` as the plain reference computation: only
    when no ``chunk_size`` is asked for, the working set is at most ``PLAIN_BYTES``
    (the training entry for the tri-mul when ``grad``) and, for attention, it does not
    compute in ``float16`` (see :func:`_computes_in_float16`); records the choice."""
    key = op + "_grad" if grad and op + "_grad" in PLAIN_BYTES else op
    choice = not float16 and chunk_size is None and working_bytes <= PLAIN_BYTES[key]
    _PATH[op] = "plain" if choice else "efficient"
    return choice


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, the input dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def row_chunk(rows: int, elements_per_row: int, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size`` when given, else what keeps a chunk near ``_CHUNK_ELEMENTS``."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, min(rows, _CHUNK_ELEMENTS // max(1, elements_per_row)))


def _spans(n: int, step: int):
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _scaled(q: torch.Tensor, scale: float | None) -> torch.Tensor:
    return q / math.sqrt(q.shape[-1]) if scale is None else q * scale


def _logits(qs, k, bias, mask_bias):
    """``(q·k + mask_bias) + bias`` in the accumulation dtype: ``[B, c, H, J, K]``
    (added in place into the fresh product: the same sums in the same order)."""
    s = qs @ k.transpose(-1, -2)
    acc = acc_dtype(qs.dtype)
    s = s.to(acc) if s.dtype != acc else s
    if mask_bias is not None:
        s.add_(mask_bias[:, :, None, None, :])
    return s.add_(bias[:, None])


def _probs(qs, k, bias, mask_bias):
    """Attention probabilities of one chunk of rows, ``[B, c, H, J, K]``."""
    return torch.softmax(_logits(qs, k, bias, mask_bias), dim=-1)


def attention_chunk_forward(qs, k, v, bias, mask_bias):
    """One chunk of rows: ``o`` ``[B, c, H, J, D]`` = ``softmax(logits) v``."""
    return _probs(qs, k, bias, mask_bias).to(v.dtype) @ v


def attention_chunk_backward(p, qs, k, v, do, q_scale):
    """Gradients of one chunk from its probabilities ``p`` (recomputed by :func:`_probs`
    with the forward's softmax, so no statistics are saved and a fully masked row,
    whose logits sit near -1e9, comes out as in the forward): ``(dq, dk, dv, dbias)``,
    ``dbias`` summed over the chunk rows. ``q_scale`` is the factor between ``q`` and
    ``qs`` (``d q = q_scale * d qs``).
    """
    dv = p.to(do.dtype).transpose(-1, -2) @ do
    dp = (do @ v.transpose(-1, -2)).to(p.dtype)
    ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)  # p · (dp - Σ p·dp)
    del p, dp
    dbias = ds.sum(1)
    ds = ds.to(qs.dtype)
    return (ds @ k).mul_(q_scale), ds.transpose(-1, -2) @ qs, dv, dbias


def _computes_in_float16(t: torch.Tensor) -> bool:
    """Whether attention on ``t`` would run in float16 (its dtype, or float16 autocast on its
    device): the plain path's mask bias ``inf·(mask − 1)`` is ``-inf`` there and a fully
    masked row turns NaN, so float16 always takes the chunked path, which keeps that bias in
    float32."""
    if t.dtype == torch.float16:
        return True
    device = t.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16


def _mask_bias(mask: torch.Tensor | None, inf: float, dtype: torch.dtype) -> torch.Tensor | None:
    return None if mask is None else inf * (mask.to(dtype) - 1)


def triangle_attention(q, k, v, bias, mask, scale, inf, chunk_size):
    """The torch backend's attention core (arguments as :func:`genie_tk.triangle_attention`)."""
    from genie_tk import reference

    b, n_i, h, n_j, _ = q.shape
    logits = b * n_i * h * n_j * k.shape[-2] * acc_dtype(q.dtype).itemsize
    if plain("triangle_attention", logits, chunk_size, float16=_computes_in_float16(q)):
        return reference.triangle_attention(q, k, v, bias, mask, scale, inf)
    return TriangleAttentionCore.apply(q, k, v, bias, mask, scale, inf, chunk_size)


class TriangleAttentionCore(torch.autograd.Function):
    """Chunked triangle attention core; see :func:`genie_tk.triangle_attention` for shapes.

    Saves only its inputs; backward recomputes each chunk's probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, inf, chunk_size):
        b, n_i, h, n_j, _ = q.shape
        step = row_chunk(n_i, b * h * n_j * k.shape[-2], chunk_size)
        mb = _mask_bias(mask, inf, acc_dtype(q.dtype))
        o = torch.empty_like(q)
        for i0, i1 in _spans(n_i, step):
            o[:, i0:i1] = attention_chunk_forward(
                _scaled(q[:, i0:i1], scale), k[:, i0:i1], v[:, i0:i1], bias,
                None if mb is None else mb[:, i0:i1],
            )
        ctx.save_for_backward(q, k, v, bias, mb)
        ctx.scale, ctx.step = scale, step
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, bias, mb = ctx.saved_tensors
        q_scale = 1 / math.sqrt(q.shape[-1]) if ctx.scale is None else ctx.scale
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias = torch.zeros_like(bias, dtype=acc_dtype(bias.dtype))
        for i0, i1 in _spans(q.shape[1], ctx.step):
            qs, kc = _scaled(q[:, i0:i1], ctx.scale), k[:, i0:i1]
            p = _probs(qs, kc, bias, None if mb is None else mb[:, i0:i1])
            dq[:, i0:i1], dk[:, i0:i1], dv[:, i0:i1], db = attention_chunk_backward(
                p, qs, kc, v[:, i0:i1], do[:, i0:i1], q_scale
            )
            del p
            dbias += db
        return dq, dk, dv, dbias.to(bias.dtype), None, None, None, None


def _layer_norm(z, weight, bias, eps):
    """LayerNorm returning ``(x, mean, rstd)`` for the matching explicit backward."""
    return torch.ops.aten.native_layer_norm(z, [z.shape[-1]], weight, bias, eps)


def _layer_norm_backward(dx, z, mean, rstd, weight, bias):
    return torch.ops.aten.native_layer_norm_backward(
        dx, z, [z.shape[-1]], mean, rstd, weight, bias, [True, True, True]
    )


def _outer(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Weight gradient of ``y = x Wᵀ``: ``dyᵀ x`` over all leading axes."""
    return dy.reshape(-1, dy.shape[-1]).transpose(0, 1) @ x.reshape(-1, x.shape[-1])


class TriangleAttentionLayer(torch.autograd.Function):
    """OpenFold ``TriangleAttention`` (starting-node layout) as one memory-efficient node.

    Input ``z`` is ``[B, I, J, C]`` (the caller transposes for the ending node),
    ``mask`` ``[B, I, J]`` or ``None``. Parameters in OpenFold's layout;
    ``transpose_bias`` is OpenFold3's (the bias of ``(j, k)`` read from pair ``(k, j)``).
    """

    @staticmethod
    def forward(ctx, z, mask, ln_w, ln_b, w_bias, w_q, w_k, w_v, w_g, b_g, w_o, b_o, inf, eps,
                chunk_size, transpose_bias=False):
        b, n_i, n_j, _ = z.shape
        n_h, hd = w_bias.shape[0], w_q.shape[0]
        w_in = torch.cat([w_q, w_k, w_v, w_g])
        step = row_chunk(n_i, b * n_h * n_j * n_j, chunk_size)
        bias = _triangle_bias(z, ln_w, ln_b, w_bias, eps, step, transpose_bias)
        mb = _mask_bias(mask, inf, acc_dtype(z.dtype))
        out = z.new_empty((*z.shape[:-1], w_o.shape[0]))
        for i0, i1 in _spans(n_i, step):
            x = F.layer_norm(z[:, i0:i1], z.shape[-1:], ln_w, ln_b, eps)
            q, k, v, g = _heads_split(x @ w_in.T, n_h, hd)
            o = attention_chunk_forward(_scaled(q, None), k, v, bias, None if mb is None else mb[:, i0:i1])
            o = _merge_heads(o)
            out[:, i0:i1] = F.linear(o * torch.sigmoid(g + b_g), w_o, b_o)
        ctx.save_for_backward(z, mb, ln_w, ln_b, w_bias, w_in, b_g, w_o, bias)
        ctx.eps, ctx.step, ctx.hd, ctx.transpose_bias = eps, step, hd, transpose_bias
        return out

    @staticmethod
    def backward(ctx, dout):
        z, mb, ln_w, ln_b, w_bias, w_in, b_g, w_o, bias = ctx.saved_tensors
        n_h, hd, eps = w_bias.shape[0], ctx.hd, ctx.eps
        acc = acc_dtype(z.dtype)
        q_scale = 1 / math.sqrt(hd // n_h)
        dz = torch.empty_like(z)
        d_ln_w, d_ln_b = torch.zeros_like(ln_w, dtype=acc), torch.zeros_like(ln_b, dtype=acc)
        d_w_in = torch.zeros_like(w_in, dtype=acc)
        d_b_g = torch.zeros_like(b_g, dtype=acc)
        d_w_o = torch.zeros_like(w_o, dtype=acc)
        d_b_o = torch.zeros(w_o.shape[0], dtype=acc, device=z.device)
        d_bias = torch.zeros_like(bias, dtype=acc)
        for i0, i1 in _spans(z.shape[1], ctx.step):
            zc, dy = z[:, i0:i1], dout[:, i0:i1]
            x, mean, rstd = _layer_norm(zc, ln_w, ln_b, eps)
            q, k, v, g = _heads_split(x @ w_in.T, n_h, hd)
            qs = _scaled(q, None)
            mbc = None if mb is None else mb[:, i0:i1]
            p = _probs(qs, k, bias, mbc)
            o = _merge_heads(p.to(v.dtype) @ v)
            gate = torch.sigmoid(g + b_g)
            d_w_o += _outer(dy, o * gate)
            d_b_o += dy.sum((0, 1, 2), dtype=acc)
            d_og = dy @ w_o
            d_g = d_og * o * gate * (1 - gate)
            d_o = (d_og * gate).unflatten(-1, (n_h, -1)).transpose(2, 3)
            dq, dk, dv, db = attention_chunk_backward(p, qs, k, v, d_o, q_scale)
            del p
            d_bias += db
            d_proj = torch.cat([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv), d_g], -1)
            d_w_in += _outer(d_proj, x)
            d_b_g += d_g.sum((0, 1, 2), dtype=acc)
            dz[:, i0:i1], dw, dbb = _layer_norm_backward(d_proj @ w_in, zc, mean, rstd, ln_w, ln_b)
            d_ln_w += dw
            d_ln_b += dbb
        # The triangle bias reads every pair: its gradient is complete only now.
        if ctx.transpose_bias:
            d_bias = d_bias.transpose(-1, -2)
        d_w_bias = torch.zeros_like(w_bias, dtype=acc)
        for j0, j1 in _spans(z.shape[1], ctx.step):
            zc = z[:, j0:j1]
            x, mean, rstd = _layer_norm(zc, ln_w, ln_b, eps)
            db = d_bias[:, :, j0:j1].permute(0, 2, 3, 1).to(z.dtype)  # [B, c, K, H]
            d_w_bias += _outer(db, x)
            dzc, dw, dbb = _layer_norm_backward(db @ w_bias, zc, mean, rstd, ln_w, ln_b)
            dz[:, j0:j1] += dzc
            d_ln_w += dw
            d_ln_b += dbb
        d_w_q, d_w_k, d_w_v, d_w_g = d_w_in.to(w_in.dtype).split(hd)
        grads = (d_ln_w, d_ln_b, d_w_bias, d_w_q, d_w_k, d_w_v, d_w_g, d_b_g, d_w_o, d_b_o)
        like = (ln_w, ln_b, w_bias, w_in, w_in, w_in, w_in, b_g, w_o, w_o)
        grads = tuple(gr.to(ref.dtype) for gr, ref in zip(grads, like))
        return (dz, None, *grads, None, None, None, None)


def _triangle_bias(z, ln_w, ln_b, w_bias, eps, step, transpose=False):
    """``[B, H, J, K]`` triangle bias ``LN(z) W_biasᵀ`` (its ``J, K`` transpose with
    ``transpose``), computed row chunk by row chunk."""
    b, n_j, n_k, _ = z.shape
    bias = z.new_empty((b, w_bias.shape[0], n_j, n_k))
    for j0, j1 in _spans(n_j, step):
        x = F.layer_norm(z[:, j0:j1], z.shape[-1:], ln_w, ln_b, eps)
        if transpose:
            bias[:, :, :, j0:j1] = (x @ w_bias.T).permute(0, 3, 2, 1)
        else:
            bias[:, :, j0:j1] = (x @ w_bias.T).permute(0, 3, 1, 2)
    return bias


def _heads_split(proj, n_h, hd):
    """``[B, c, J, 4·H·D]`` -> q, k, v as ``[B, c, H, J, D]`` and the gate pre-activation."""
    q, k, v, g = proj.split(hd, dim=-1)
    return (*(t.unflatten(-1, (n_h, -1)).transpose(2, 3) for t in (q, k, v)), g)


def _merge_heads(t):
    """``[B, c, H, J, D]`` -> ``[B, c, J, H·D]``."""
    return t.transpose(2, 3).flatten(-2)


def triangle_attention_layer(z, mask, weights, inf, eps, chunk_size, transpose_bias=False):
    """The torch backend's ``TriangleAttention`` on ``z`` ``[B, I, J, C]`` (starting-node
    layout), ``mask`` ``[B, I, J]`` or ``None``; ``weights`` in the order of
    :data:`genie_tk.reference.ATTENTION_KEYS`; ``transpose_bias`` as OpenFold3's."""
    from genie_tk import reference

    b, n_i, n_j, _ = z.shape
    n_h = weights[2].shape[0]
    logits = b * n_i * n_h * n_j * n_j * acc_dtype(z.dtype).itemsize
    if plain("triangle_attention_layer", logits, chunk_size, float16=_computes_in_float16(z)):
        params = dict(zip(reference.ATTENTION_KEYS, weights))
        return reference.triangle_attention_layer(z, mask, params, n_h, True, inf, eps, transpose_bias)
    return TriangleAttentionLayer.apply(z, mask, *weights, inf, eps, chunk_size, transpose_bias)


def triangle_multiplicative_update(z, mask, weights, outgoing, eps, chunk_size):
    """Tri-mul on ``[B, N, N, C]``: natural-layout projections, channel-first contraction.

    ``weights`` is ``(ln_in_w, ln_in_b, p_in_w, p_in_b, g_in_w, g_in_b, ln_out_w,
    ln_out_b, p_out_w, p_out_b, g_out_w, g_out_b)`` with the a/b projections
    stacked (``[2·Ch, C]``). Both input projections run as one fused ``addmm`` in the
    natural layout and the gated, masked product is written straight into the
    channel-first ``[B, 2·Ch, N, N]`` buffer the per-channel contraction reads;
    ``chunk_size`` computes the output in blocks of rows so the ``[B, N, N, Ch]``
    product is never whole (inference memory).

    When autograd records (training), the whole update runs as one
    :class:`TriangleMultiplicationLayer` node that keeps only its input and the
    contraction for backward, unless the working set is small enough for plain
    autograd on the reference to be as fast (:func:`plain`); OpenFold's float16
    branch, whose normalisation by standard deviations is differentiated through,
    stays on plain autograd.
    """
    from genie_tk import reference

    b, n, _, c = z.shape
    ch = weights[2].shape[0] // 2
    grad = torch.is_grad_enabled() and (z.requires_grad or any(w.requires_grad for w in weights))
    working = b * n * n * max(2 * ch, c) * acc_dtype(z.dtype).itemsize
    if (fp16_enabled(z) and grad) or plain("triangle_multiplicative_update", working, chunk_size, grad):
        _PATH["triangle_multiplicative_update"] = "plain"
        params = dict(zip(reference.TRI_MUL_KEYS, weights))
        return reference.triangle_multiplicative_update(z, mask, params, outgoing, eps)
    if grad:
        return TriangleMultiplicationLayer.apply(z, mask, outgoing, eps, chunk_size, *weights)
    # Inference: the per-pair stages (LayerNorm, projections, gates) run in blocks of rows
    # that stay in cache from one elementwise pass to the next; the contraction is whole.
    w_in, b_in = _stacked_inputs(weights)
    ab = z.new_empty((b, 2 * ch, n, n))
    rows = max(1, min(n, _CACHE_ELEMENTS // max(1, b * n * 4 * ch)))
    for i0, i1 in _spans(n, rows):
        zn = F.layer_norm(z[:, i0:i1], (c,), weights[0], weights[1], eps)
        _trimul_project(zn, None if mask is None else mask[:, i0:i1], w_in, b_in, out=ab[:, :, i0:i1])
    a, bb = ab.split(ch, dim=1)
    if fp16_enabled(z) and bool(a.std() != 0) and bool(bb.std() != 0):
        a, bb = (a / a.std()).float(), (bb / bb.std()).float()
    step = n if chunk_size is None else max(1, int(chunk_size))
    out = None
    for i0, i1 in _spans(n, step):
        x = _trimul_contract(a, bb, outgoing, i0, i1)
        for r0, r1 in _spans(i1 - i0, rows):
            zn = F.layer_norm(z[:, i0 + r0 : i0 + r1], (c,), weights[0], weights[1], eps)
            block = _trimul_output(x[:, :, r0:r1], zn, weights[6:], eps)
            if out is None:
                out = block.new_empty((b, n, n, block.shape[-1]))
            out[:, i0 + r0 : i0 + r1] = block
    return out


def _stacked_inputs(weights):
    """``(W, b)``: the projection and gate of a and b stacked, ``[4·Ch, C]`` and ``[4·Ch]``."""
    p_w, p_b, g_w, g_b = weights[2:6]
    return torch.cat([p_w, g_w]), torch.cat([p_b, g_b])


def _trimul_project(zn, mask, w, bias, out=None):
    """``[a | b] = (zn P_inᵀ + p_in) ⊙ σ(zn G_inᵀ + g_in) · mask`` from ``zn`` ``[B, R, N, C]``
    into channel-first ``out`` ``[B, 2·Ch, R, N]`` (allocated when ``None``).

    ``w``, ``bias``: the stacked projection and gate (:func:`_stacked_inputs`), so both
    come from one ``addmm`` in the natural layout, bias included; the product is
    written through a permuted view of ``out``, the one layout change. The mask (0 or
    1) multiplies the gate first: the same numbers as multiplying the product."""
    b, r, n, _ = zn.shape
    ch2 = w.shape[0] // 2
    proj = F.linear(zn, w, bias)  # [B, R, N, 4·Ch]
    p, gate = proj[..., :ch2], proj[..., ch2:].sigmoid_()
    if mask is not None:
        gate.mul_(mask.unsqueeze(-1).to(gate.dtype))
    if out is None:
        out = zn.new_empty((b, ch2, r, n))
    torch.mul(p, gate, out=out.permute(0, 2, 3, 1))
    return out


def _trimul_contract(a, bb, outgoing, i0, i1):
    """Rows ``[i0, i1)`` of the per-channel contraction, channel-first ``[B, Ch, i1-i0, N]``."""
    if outgoing:  # x[c, i, j] = Σ_k a[c, i, k] b[c, j, k]
        return a[:, :, i0:i1] @ bb.transpose(-1, -2)
    return a[:, :, :, i0:i1].transpose(-1, -2) @ bb  # x[c, i, j] = Σ_k a[c, k, i] b[c, k, j]


def _trimul_output(x, zn, out_weights, eps):
    """``σ(zn G_outᵀ + g_out) ⊙ (LN_out(x) P_outᵀ + p_out)`` for channel-first ``x``
    ``[B, Ch, R, N]`` and ``zn`` ``[B, R, N, C]``."""
    lo_w, lo_b, po_w, po_b, go_w, go_b = out_weights
    x = F.layer_norm(x.permute(0, 2, 3, 1).to(zn.dtype), x.shape[1:2], lo_w, lo_b, eps)
    return F.linear(x, po_w, po_b) * torch.sigmoid(F.linear(zn, go_w, go_b))


class TriangleMultiplicationLayer(torch.autograd.Function):
    """The tri-mul (Alg. 11/12) as one autograd node for training.

    Plain autograd keeps about ``5·C + 8·Ch`` values per pair for backward (the
    layer-normed input, both projections, the gates, ``a``, ``b``, the
    contraction, its LayerNorm, the output projection and the gate). This node
    keeps the input ``z`` (which the residual stream holds anyway) and the
    contraction ``x`` (``Ch`` per pair, so that backward does not redo the
    O(N³) product); backward recomputes the rest row chunk by row chunk, holds
    ``a``, ``b`` and the contraction's gradient (``3·Ch`` per pair) at most, and
    writes the gradients of ``a`` and ``b`` over them. Arguments as in
    :func:`triangle_multiplicative_update` (``z`` ``[B, N, N, C]``, ``mask``
    ``[B, N, N]`` or ``None``), then the twelve weights.

    Backward runs in the input's dtype with autocast off: under autocast its
    gradients are those of the forward's values, computed at the input precision.
    """

    @staticmethod
    def forward(ctx, z, mask, outgoing, eps, chunk_size, *weights):
        b, n, _, c = z.shape
        ch = weights[2].shape[0] // 2
        zn = F.layer_norm(z, (c,), weights[0], weights[1], eps)
        a, bb = _trimul_project(zn, mask, *_stacked_inputs(weights)).split(ch, dim=1)
        x = _trimul_contract(a, bb, outgoing, 0, n)
        del a, bb
        step = _trimul_rows(b, n, c, ch, chunk_size)
        out = None
        for i0, i1 in _spans(n, step):
            block = _trimul_output(x[:, :, i0:i1], zn[:, i0:i1], weights[6:], eps)
            if out is None:
                out = block.new_empty((b, n, n, block.shape[-1]))
            out[:, i0:i1] = block
        ctx.save_for_backward(z, mask, x, *weights)
        ctx.outgoing, ctx.eps, ctx.step = outgoing, eps, step
        return out

    @staticmethod
    def backward(ctx, dout):
        z, mask, x, *weights = ctx.saved_tensors
        with torch.autocast(z.device.type, enabled=False):
            grads = _trimul_backward(z, mask, x, weights, dout.to(z.dtype), ctx.outgoing, ctx.eps, ctx.step)
        return (grads[0], None, None, None, None, *grads[1:])


def _trimul_rows(b: int, n: int, c: int, ch: int, chunk_size: int | None) -> int:
    """Rows per chunk of the tri-mul node: ``chunk_size`` when given, else as many as
    keep a chunk's temporaries (about ``6·Ch + 4·C`` values per pair) near half of one
    ``[B, N, N, C]`` tensor (and at least 16 MiB, so small inputs run in one piece)."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    budget = max(_CHUNK_ELEMENTS, b * n * n * c // 2)
    return max(1, min(n, budget // max(1, b * n * (6 * ch + 4 * c))))


def _trimul_backward(z, mask, x, weights, dout, outgoing, eps, step):
    w = [t.to(z.dtype) for t in weights]
    (ln_w, ln_b, p_w, _, _, _, lo_w, lo_b, po_w, po_b, go_w, go_b) = w
    b, n, _, c = z.shape
    ch = p_w.shape[0] // 2
    spans = _spans(n, step)
    acc = {name: torch.zeros_like(t) for name, t in zip(_TRIMUL_NAMES, w)}

    # a and b (channel-first [B, 2·Ch, N, N]), recomputed in row chunks.
    w_in, b_in = _stacked_inputs(w)
    ab = z.new_empty((b, 2 * ch, n, n))
    for i0, i1 in spans:
        zn = F.layer_norm(z[:, i0:i1], (c,), ln_w, ln_b, eps)
        _trimul_project(zn, None if mask is None else mask[:, i0:i1], w_in, b_in, out=ab[:, :, i0:i1])

    # Output side, row chunk by row chunk: the contraction's gradient dx, and the
    # output gate's share of d LN_in(z), parked in dz until the input side adds its own.
    dx = torch.empty_like(ab[:, :ch])
    dz = torch.empty_like(z)
    for i0, i1 in spans:
        zn = F.layer_norm(z[:, i0:i1], (c,), ln_w, ln_b, eps)
        xr = x[:, :, i0:i1].permute(0, 2, 3, 1).to(z.dtype)  # [B, R, N, Ch]
        xn, mean, rstd = _layer_norm(xr, lo_w, lo_b, eps)
        y = F.linear(xn, po_w, po_b)
        gate = torch.sigmoid(F.linear(zn, go_w, go_b))
        d = dout[:, i0:i1]
        dy = d * gate
        dg = d * y * gate * (1 - gate)
        acc["po_w"] += _outer(dy, xn)
        acc["po_b"] += dy.sum((0, 1, 2))
        acc["go_w"] += _outer(dg, zn)
        acc["go_b"] += dg.sum((0, 1, 2))
        dxr, dw, dbb = _layer_norm_backward(dy @ po_w, xr, mean, rstd, lo_w, lo_b)
        acc["lo_w"] += dw
        acc["lo_b"] += dbb
        dx[:, :, i0:i1] = dxr.permute(0, 3, 1, 2)
        dz[:, i0:i1] = dg @ go_w

    # Contraction backward, a few channels at a time; d a and d b overwrite a and b.
    c_step = max(1, ch // 8)
    for c0, c1 in _spans(ch, c_step):
        a, bb, dxc = ab[:, c0:c1], ab[:, ch + c0 : ch + c1], dx[:, c0:c1]
        if outgoing:  # x = a bᵀ
            da, db = dxc @ bb, dxc.transpose(-1, -2) @ a
        else:  # x = aᵀ b
            da, db = bb @ dxc.transpose(-1, -2), a @ dxc
        a.copy_(da)
        bb.copy_(db)
    del dx

    # Input side: through the masked gated projections and LN_in, in the natural layout.
    d_w_in = torch.zeros_like(w_in)
    d_b_in = torch.zeros_like(b_in)
    for i0, i1 in spans:
        zc = z[:, i0:i1]
        zn, mean, rstd = _layer_norm(zc, ln_w, ln_b, eps)
        proj = F.linear(zn, w_in, b_in)  # [B, R, N, 4·Ch]
        p, sig = proj[..., : 2 * ch], proj[..., 2 * ch :].sigmoid_()
        dab = ab[:, :, i0:i1].permute(0, 2, 3, 1)  # d[a | b], [B, R, N, 2·Ch]
        if mask is not None:
            dab = dab * mask[:, i0:i1].unsqueeze(-1).to(dab.dtype)
        d_in = torch.empty_like(proj)
        torch.mul(dab, sig, out=d_in[..., : 2 * ch])  # d projection
        torch.mul(dab * p, sig * (1 - sig), out=d_in[..., 2 * ch :])  # d gate pre-activation
        del proj, p, sig, dab
        d_w_in += _outer(d_in, zn)
        d_b_in += d_in.sum((0, 1, 2))
        dzn = torch.addmm(dz[:, i0:i1].reshape(-1, c), d_in.reshape(-1, 4 * ch), w_in).view(zc.shape)
        dz[:, i0:i1], dw, dbb = _layer_norm_backward(dzn, zc, mean, rstd, ln_w, ln_b)
        acc["ln_w"] += dw
        acc["ln_b"] += dbb
    acc["p_w"], acc["g_w"] = d_w_in.split(2 * ch)
    acc["p_b"], acc["g_b"] = d_b_in.split(2 * ch)
    return (dz, *(acc[name].to(t.dtype) for name, t in zip(_TRIMUL_NAMES, weights)))


_TRIMUL_NAMES = ("ln_w", "ln_b", "p_w", "p_b", "g_w", "g_b", "lo_w", "lo_b", "po_w", "po_b", "go_w", "go_b")
