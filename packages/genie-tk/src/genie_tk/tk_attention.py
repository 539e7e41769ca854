"""The ``tk`` backend of triangle attention: ThunderKittens kernels as torch custom ops.

Two custom ops wrap the kernels of ``csrc/triangle_attention`` (sm_90a):

* ``genie_tk::triangle_attention_fwd(q, k, v, bias, mask, scale, inf) -> (o, stats)``
* ``genie_tk::triangle_attention_bwd(dout, q, k, v, bias, mask, o, stats, scale, inf)
  -> (dq, dk, dv, dbias)``

with ``register_fake`` (shapes only) and ``register_autograd`` (the forward's
backward is the second op), so ``torch.compile(fullgraph=True)`` and
``torch.library.opcheck`` work. Shapes as in :func:`genie_tk.triangle_attention`:
``q, k, v`` ``[B, I, H, N, D]``, ``bias`` ``[B, H, N, N]``, ``mask`` ``[B, I, N]``
or ``None``; ``stats`` is ``[B, I, H, N, 2]`` fp32 (see :func:`stats_dtype`), the row max and the log2 row
sum of the base-2 logits ``log2(e) * (scale q.k + inf (mask - 1) + bias)`` (kept
apart so that a fully masked row, whose logits sit near ``-1.4e9``, keeps its
uniform softmax in the backward).

On CUDA tensors the ops launch the kernels on the current stream (outputs
allocated here, inputs detached, made contiguous and 16-byte aligned, the key
axis of ``bias`` padded to a multiple of 64). On the CPU they run
:func:`emulate_forward` / :func:`emulate_backward`, PyTorch transcriptions of
the kernels' arithmetic (base-2 statistics, low-precision MMA operands, fp32
accumulation) that make the ops testable without a GPU; they materialise the
``[B, I, H, N, N]`` logits and are meant for small inputs: dispatch never sends
CPU tensors here.

``triangle_attention_layer`` on the tk backend composes the core op with
PyTorch for LayerNorm, the projections, the gate and the output projection.

Nothing is registered unless ``genie_tk._C`` was built with these kernels; the
registered kernels stay ``verified=False`` (``backend="tk"`` only) until they
have passed their GPU tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genie_tk import _backend, torch_backend

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64)
DTYPES = (torch.bfloat16, torch.float16)
KEY_PAD = 64  # the kernels' key tile; the padded key axis of bias and the key bias
_ALIGNMENT = 16  # bytes: TMA base addresses
# Set True in the commit that records the kernels passing tests/test_tk_attention_cuda.py on a GPU;
# until then auto never picks them (the READMEs say so: tests/test_dispatch.py checks).
VERIFIED = False
_SYMBOLS = (
    "triangle_attention_fwd",
    "triangle_attention_bwd_delta",
    "triangle_attention_bwd_dqkv",
    "triangle_attention_bwd_dbias",
    "triangle_attention_dbias_splits",
)


def check(q, k, v, bias, mask, *, head_dim: int) -> str:
    """Why the kernels cannot take this triangle attention call ("" if they can).

    Device, shapes and dtype agreement are checked by the caller
    (:func:`genie_tk.triangle_attention` and the dispatcher).
    """
    return _check(q.dtype, head_dim)


def check_layer(z, mask, *, head_dim: int) -> str:
    """Why the kernels cannot take this ``triangle_attention_layer`` call ("" if they can)."""
    return _check(z.dtype, head_dim)


def _check(dtype: torch.dtype, head_dim: int) -> str:
    if dtype not in DTYPES:
        return f"the tk kernels take bfloat16 or float16 inputs (fp32 accumulation), got {dtype}"
    if head_dim not in HEAD_DIMS:
        return f"the tk kernels have head dims {HEAD_DIMS}, got {head_dim}"
    return ""


def padded_keys(n: int) -> int:
    """The kernels' padded key axis ``Np``: ``n`` rounded up to a multiple of 64."""
    return -(-n // KEY_PAD) * KEY_PAD


def key_bias(mask, shape, n_pad: int, inf: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The base-2 mask bias ``log2(e) * inf * (mask - 1)`` as ``[B, I, n_pad]``.

    ``shape`` is ``(B, I, N)``; columns ``>= N`` are zero (the kernels exclude
    those keys themselves). ``mask=None`` keeps every key.
    """
    b, i, n = shape
    out = torch.zeros((b, i, n_pad), dtype=dtype, device=device)
    if mask is not None:
        out[..., :n] = (inf * (mask.to(dtype) - 1)) * LOG2E
    return out


# ---------------------------------------------------------------- emulation


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation and statistics dtype: float32 for the kernels' half types
    (float64 only in the CPU emulation of float64 inputs, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _base2_logits(q, k, bias, mask, scale, inf, acc):
    """``log2(e) * ((scale q.k + mask_bias) + bias)`` in ``acc``: ``[B, I, H, N, N]``."""
    b, i, _, n, _ = q.shape
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * (scale * LOG2E)
    s = s + key_bias(mask, (b, i, n), n, inf, acc, q.device)[:, :, None, None, :]
    return s + bias.to(acc)[:, None] * LOG2E


def _operand(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to the MMA operand type ``dtype`` and back."""
    return x.to(dtype).to(x.dtype)


def emulate_forward(q, k, v, bias, mask, scale, inf):
    """The forward kernel's arithmetic in PyTorch: ``(o, stats)``."""
    acc = stats_dtype(q.dtype)
    s = _base2_logits(q, k, bias, mask, scale, inf, acc)
    row_max = s.amax(-1, keepdim=True)
    e = torch.exp2(s - row_max)
    row_sum = e.sum(-1, keepdim=True)
    o = (_operand(e, q.dtype) @ v.to(acc)) / row_sum
    stats = torch.cat([row_max, torch.log2(row_sum)], dim=-1)
    return o.to(q.dtype).contiguous(), stats.contiguous()


def emulate_backward(dout, q, k, v, bias, mask, o, stats, scale, inf):
    """The backward kernels' arithmetic in PyTorch: ``(dq, dk, dv, dbias)``."""
    acc = stats_dtype(q.dtype)
    s = _base2_logits(q, k, bias, mask, scale, inf, acc)
    p = torch.exp2((s - stats[..., :1]) - stats[..., 1:])
    dout_a = dout.to(acc)
    dp = dout_a @ v.to(acc).transpose(-1, -2)
    delta = (dout_a * o.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    ds_op = _operand(ds, q.dtype)
    dv = _operand(p, q.dtype).transpose(-1, -2) @ dout_a
    dq = (ds_op @ k.to(acc)) * scale
    dk = (ds_op.transpose(-1, -2) @ q.to(acc)) * scale
    dbias = ds.sum(1)
    return tuple(t.to(dt).contiguous() for t, dt in ((dq, q.dtype), (dk, k.dtype), (dv, v.dtype),
                                                     (dbias, bias.dtype)))


# ---------------------------------------------------------------- kernels


def _kernel_input(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the kernels take it: detached, C-contiguous, 16-byte aligned."""
    t = t.detach().contiguous()
    return t if t.data_ptr() % _ALIGNMENT == 0 else t.clone()


def _padded_bias(bias: torch.Tensor, n_pad: int) -> torch.Tensor:
    n = bias.shape[-1]
    return _kernel_input(bias if n_pad == n else F.pad(bias, (0, n_pad - n)))


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _forward_cuda(ext, q, k, v, bias, mask, scale, inf):
    b, i, h, n, _ = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    stats = torch.empty((b, i, h, n, 2), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, stats
    n_pad = padded_keys(n)
    ext.triangle_attention_fwd(
        o, stats, _kernel_input(q), _kernel_input(k), _kernel_input(v), _padded_bias(bias, n_pad),
        key_bias(mask, (b, i, n), n_pad, inf, torch.float32, q.device), scale, _stream(q),
    )
    return o, stats


def _backward_cuda(ext, dout, q, k, v, bias, mask, o, stats, scale, inf):
    b, i, h, n, _ = q.shape
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # the kernel adds into it
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0:
        return dq.to(q.dtype), dk, dv, torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device)
    n_pad = padded_keys(n)
    stream = _stream(q)
    dout, q, k, v, o, stats = (_kernel_input(t) for t in (dout, q, k, v, o, stats))
    bias_p = _padded_bias(bias, n_pad)
    kb = key_bias(mask, (b, i, n), n_pad, inf, torch.float32, q.device)
    delta = torch.empty((b, i, h, n), dtype=torch.float32, device=q.device)
    ext.triangle_attention_bwd_delta(delta, dout, o, stream)
    ext.triangle_attention_bwd_dqkv(dq, dk, dv, dout, q, k, v, bias_p, kb, stats, delta, scale, stream)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    splits = ext.triangle_attention_dbias_splits(b, i, h, n, sms)
    partial = torch.empty((splits, b, h, n, n_pad), dtype=torch.float32, device=q.device)
    ext.triangle_attention_bwd_dbias(partial, dout, q, k, v, bias_p, kb, stats, delta, scale, stream)
    dbias = partial.sum(0) if splits > 1 else partial[0]
    return dq.to(q.dtype), dk, dv, dbias[..., :n].to(bias.dtype).contiguous()


def _forward_fake(q, k, v, bias, mask, scale, inf):
    b, i, h, n, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, i, h, n, 2), dtype=stats_dtype(q.dtype))


def _backward_fake(dout, q, k, v, bias, mask, o, stats, scale, inf):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale, inf = inputs
    o, stats = output
    ctx.save_for_backward(q, k, v, bias, mask, o, stats)
    ctx.scale, ctx.inf = scale, inf


def _backward(ctx, dout, _dstats):
    q, k, v, bias, mask, o, stats = ctx.saved_tensors
    dq, dk, dv, dbias = torch.ops.genie_tk.triangle_attention_bwd(
        dout, q, k, v, bias, mask, o, stats, ctx.scale, ctx.inf
    )
    return dq, dk, dv, dbias, None, None, None


def _define_ops(ext) -> None:
    """Defines the two custom ops, their CPU emulations, fakes and autograd."""

    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                mask: torch.Tensor | None, scale: float, inf: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward_cuda(ext, q, k, v, bias, mask, scale, inf)

    def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 bias: torch.Tensor, mask: torch.Tensor | None, o: torch.Tensor, stats: torch.Tensor,
                 scale: float, inf: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward_cuda(ext, dout, q, k, v, bias, mask, o, stats, scale, inf)

    fwd = torch.library.custom_op("genie_tk::triangle_attention_fwd", forward, mutates_args=(),
                                  device_types="cuda")
    fwd.register_kernel("cpu")(emulate_forward)
    fwd.register_fake(_forward_fake)
    fwd.register_autograd(_backward, setup_context=_setup_context)

    bwd = torch.library.custom_op("genie_tk::triangle_attention_bwd", backward, mutates_args=(),
                                  device_types="cuda")
    bwd.register_kernel("cpu")(emulate_backward)
    bwd.register_fake(_backward_fake)


# ---------------------------------------------------------------- backend


def run(q, k, v, bias, mask, scale, inf):
    """:func:`genie_tk.triangle_attention` on the kernels (arguments already validated)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _ = torch.ops.genie_tk.triangle_attention_fwd(q, k, v, bias, mask, scale, float(inf))
    return o


def run_layer(z, mask, weights, starting, inf, eps, transpose_bias=False):
    """:func:`genie_tk.triangle_attention_layer` with the attention core on the kernels.

    LayerNorm, the q/k/v/gate and triangle-bias projections, the gate and the
    output projection run in PyTorch (see csrc/triangle_attention/NOTES.md for
    the passes over the pair tensor this leaves).
    """
    ln_w, ln_b, w_bias, w_q, w_k, w_v, w_g, b_g, w_o, b_o = weights
    if not starting:
        z = z.transpose(-2, -3)
        mask = None if mask is None else mask.transpose(-1, -2)
    lead, (n, _, c) = z.shape[:-3], z.shape[-3:]
    z = z.reshape(-1, n, n, c)
    mask = None if mask is None else mask.reshape(-1, n, n)
    n_h, hd = w_bias.shape[0], w_q.shape[0]
    # LayerNorm in fp32, as under autocast: its weight and bias gradients are
    # sums over all N^2 pairs, too long for bf16 inputs (3-4x less accurate).
    acc = stats_dtype(z.dtype)
    x = F.layer_norm(z.to(acc), (c,), ln_w.to(acc), ln_b.to(acc), eps).to(z.dtype)
    # One GEMM for all five projections: x is read once and its gradient comes
    # out of one GEMM instead of a sum of two.
    proj = F.linear(x, torch.cat([w_q, w_k, w_v, w_g, w_bias]))
    bias = proj[..., 4 * hd:].permute((0, 3, 2, 1) if transpose_bias else (0, 3, 1, 2))  # [B, H, J, K]
    q, k, v, g = torch_backend._heads_split(proj[..., : 4 * hd], n_h, hd)
    o = torch_backend._merge_heads(run(q, k, v, bias, mask, None, inf))
    out = F.linear(o * torch.sigmoid(g + b_g), w_o, b_o).reshape(*lead, n, n, -1)
    return out if starting else out.transpose(-2, -3)


def _extension():
    """``genie_tk._C`` if it was built with the triangle attention kernels, else ``None``."""
    ext = _backend._C
    if not _backend.HAS_EXTENSION or not all(hasattr(ext, name) for name in _SYMBOLS):
        return None
    if ext.TRIANGLE_ATTENTION_KEY_PAD != KEY_PAD:
        raise ImportError(f"genie_tk._C pads keys to {ext.TRIANGLE_ATTENTION_KEY_PAD}, this module to {KEY_PAD}")
    return ext


def _register() -> bool:
    ext = _extension()
    if ext is None:
        return False
    _define_ops(ext)
    _backend.register_tk("triangle_attention", _backend.Kernel(check, run, verified=VERIFIED))
    _backend.register_tk("triangle_attention_layer", _backend.Kernel(check_layer, run_layer, verified=VERIFIED))
    return True


REGISTERED = _register()
