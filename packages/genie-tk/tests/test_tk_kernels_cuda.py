"""Each tk kernel on its own against its PyTorch emulation, on the same CUDA tensors.

The GPU visit (``benchmarks/gpu_visit.py``) runs these first, one stage per
kernel family, so that a wrong kernel is named before the end-to-end matrices
(``test_tk_*_cuda.py``) run:

* ``attention_forward``: ``triangle_attention_fwd`` (o and the statistics);
* ``attention_backward``: ``bwd_delta``, ``bwd_dqkv`` (dq, dk, dv) and
  ``bwd_dbias``, each fed the emulated forward's o and statistics, so a
  forward bug cannot show up here;
* ``trimul``: ``trimul_contract`` (three modes), ``trimul_input`` (with the
  float16 moments) and ``trimul_output``.

Shapes: N in {17, 130} for attention (one and three key tiles: odd tile counts,
tails) with an odd number of rows I (the forward pairs rows two by two), N in
{17, 100} for tri-mul; bfloat16 and float16; every head dim. Every output is
allocated with ``torch.full(..., nan)``: an element a kernel does not write
stays NaN and fails (the caching allocator's poisoning does not reach
PyTorch's small pool). Errors are the worst per-row relative error
(:func:`genie_tk.testing.row_error`), printed with the row that has it.

Tolerances: one rounding of the output is 2^-8 (bf16) or 2^-11 (fp16) of the
row's largest value; the kernels and the emulation round the same operands
(P, dS, LayerNorm outputs), but exp2.approx and another accumulation order
can flip a rounding. The bounds allow a few output roundings.
"""

from __future__ import annotations

import math

import pytest
import torch

import genie_tk
from genie_tk import _backend, tk_attention, tk_trimul
from genie_tk.testing import build, row_error

NAN = float("nan")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}  # attention, contraction
TOL_LN = {torch.bfloat16: 3e-2, torch.float16: 1e-2}  # tri-mul input/output (LayerNorm rounded in the tile)


@pytest.fixture(autouse=True)
def hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the kernels are built for sm_90a (Hopper)")
    if not _backend.HAS_EXTENSION:
        pytest.skip("genie_tk._C is not built")
    assert _backend._C.driver_status() == ""


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _check(name, got, want, tol, row_dims=1):
    torch.cuda.synchronize()
    unwritten = int((~torch.isfinite(got)).sum().item())
    err, where = row_error(got, want, row_dims)
    print(f"{name}: worst row {where} error {err:.2e} (tol {tol:.0e}); {unwritten} non-finite of {got.numel()}")
    assert unwritten == 0, f"{name}: {unwritten} elements unwritten or non-finite"
    assert err <= tol, f"{name}: row {where} has relative error {err:.2e} > {tol:.0e}"


# ---------------------------------------------------------------- attention

# (N, I): N = 17 is one partial key tile, N = 130 three (the last with 2 keys);
# I odd so the forward's last row pair has one row past I.
ATT_SHAPES = [(17, 17), (130, 33)]
ATT_IDS = [f"N{n}-I{i}" for n, i in ATT_SHAPES]


def _attention_inputs(n, rows, d, dtype, seed, b=2, h=3):
    """Random q, k, v, dout ``[B, I, H, N, D]``, bias ``[B, H, N, N]``, a 0/1 mask
    ``[B, I, N]`` with a fully masked row, a masked key and holes; the padded bias
    and the base-2 key bias the kernels take."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype)

    q, k, v, dout = (randn(b, rows, h, n, d) for _ in range(4))
    bias = randn(b, h, n, n)
    mask = (torch.rand(b, rows, n, generator=g, device="cuda") > 0.1).float()
    if n > 1:
        mask[:, rows // 2] = 0  # a fully masked row: uniform softmax
        mask[:, :, n - 1] = 0  # the last key masked everywhere
    n_pad = tk_attention.padded_keys(n)
    bias_p = torch.nn.functional.pad(bias, (0, n_pad - n)).contiguous()
    kb = tk_attention.key_bias(mask, (b, rows, n), n_pad, 1e9, torch.float32, q.device)
    return q, k, v, dout, bias, mask, bias_p, kb, 1 / math.sqrt(d)


@pytest.mark.parametrize("d", tk_attention.HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize(("n", "rows"), ATT_SHAPES, ids=ATT_IDS)
def test_attention_forward(n, rows, dt, d):
    dtype = DTYPES[dt]
    q, k, v, _, bias, mask, bias_p, kb, scale = _attention_inputs(n, rows, d, dtype, seed=n + d)
    b, _, h, _, _ = q.shape
    o = torch.full_like(q, NAN)
    stats = torch.full((b, rows, h, n, 2), NAN, device="cuda")
    _backend._C.triangle_attention_fwd(o, stats, q, k, v, bias_p, kb, scale, _stream())
    o_e, stats_e = tk_attention.emulate_forward(q, k, v, bias, mask, scale, 1e9)
    _check("o", o, o_e, TOL[dtype])
    # Row max: the same fp32 logits up to accumulation order (|max| reaches 1.4e9
    # on the fully masked row); log2 row sum: absolute.
    torch.testing.assert_close(stats[..., 0], stats_e[..., 0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(stats[..., 1], stats_e[..., 1], rtol=0, atol=2e-3)
    full = (mask == 0).all(-1)  # [B, I]: uniform rows, log2-sum = log2(N)
    torch.testing.assert_close(stats[..., 1][full], torch.full_like(stats[..., 1][full], math.log2(n)),
                               rtol=0, atol=1e-3)


@pytest.mark.parametrize("d", tk_attention.HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize(("n", "rows"), ATT_SHAPES, ids=ATT_IDS)
def test_attention_backward(n, rows, dt, d):
    dtype = DTYPES[dt]
    ext = _backend._C
    q, k, v, dout, bias, mask, bias_p, kb, scale = _attention_inputs(n, rows, d, dtype, seed=3 * n + d)
    b, _, h, _, _ = q.shape
    o, stats = tk_attention.emulate_forward(q, k, v, bias, mask, scale, 1e9)  # the backward's inputs
    dq_e, dk_e, dv_e, dbias_e = tk_attention.emulate_backward(dout, q, k, v, bias, mask, o, stats, scale, 1e9)

    delta = torch.full((b, rows, h, n), NAN, device="cuda")
    ext.triangle_attention_bwd_delta(delta, dout, o, _stream())
    # Rows (b, i, h) over the queries: an element near zero by cancellation is
    # measured against its row's scale, not its own.
    _check("delta", delta, (dout.float() * o.float()).sum(-1), 1e-5)

    dq = torch.zeros(q.shape, device="cuda")  # the kernel adds into it
    dk, dv = torch.full_like(k, NAN), torch.full_like(v, NAN)
    ext.triangle_attention_bwd_dqkv(dq, dk, dv, dout, q, k, v, bias_p, kb, stats, delta, scale, _stream())
    _check("dv", dv, dv_e, TOL[dtype])
    _check("dk", dk, dk_e, TOL[dtype])
    _check("dq", dq.to(dtype), dq_e, TOL[dtype])

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = ext.triangle_attention_dbias_splits(b, rows, h, n, sms)
    assert 1 <= splits <= min(rows, 16)
    partial = torch.full((splits, b, h, n, bias_p.shape[-1]), NAN, device="cuda")
    ext.triangle_attention_bwd_dbias(partial, dout, q, k, v, bias_p, kb, stats, delta, scale, _stream())
    torch.cuda.synchronize()
    assert (partial[..., n:] == 0).all(), "keys past N must carry zero gradient"
    _check("dbias", partial.sum(0)[..., :n].to(dtype), dbias_e, TOL[dtype])


# ---------------------------------------------------------------- tri-mul

TRIMUL_N = [17, 100]


def _channel_first(b, c, n, dtype, seed, scale=1.0):
    """Random ``[b, c, n, Np]`` with zero padding columns."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.zeros(b, c, n, tk_trimul.padded(n), device="cuda", dtype=dtype)
    t[..., :n] = (scale * torch.randn(b, c, n, n, generator=g, device="cuda")).to(dtype)
    return t


@pytest.mark.parametrize("mode", ["ABt", "AtB", "AB"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", TRIMUL_N, ids=lambda n: f"N{n}")
def test_trimul_contract(n, dt, mode):
    dtype = DTYPES[dt]
    a, b = _channel_first(2, 3, n, dtype, 1), _channel_first(2, 3, n, dtype, 2)
    scale = torch.tensor([0.37], device="cuda")
    want = torch.empty_like(a)
    tk_trimul.Emulation.trimul_contract(want, a, b, scale, mode)
    got = torch.full_like(a, NAN)
    _backend._C.trimul_contract(got, a, b, scale, mode, _stream())
    _check(f"contract {mode}", got, want, TOL[dtype])
    assert torch.all(got[..., n:] == 0), "padding columns must be written as zero"


def _trimul_module(cls, c, hidden, n):
    return build(cls, c, hidden, 0, seed=n, dtype=torch.float32).cuda()


@pytest.mark.parametrize(("c", "hidden"), [(64, 128), (128, 64)], ids=["c64-h128", "c128-h64"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", TRIMUL_N, ids=lambda n: f"N{n}")
def test_trimul_input(n, dt, c, hidden):
    dtype = DTYPES[dt]
    m = _trimul_module(genie_tk.FusedTriangleMultiplicationOutgoing, c, hidden, n)
    b = 2
    z = torch.randn(b, n, n, c, device="cuda").to(dtype)
    mask = (torch.rand(b, n, n, device="cuda") > 0.1).float()
    args = (z, mask, m.layer_norm_in.weight.detach(), m.layer_norm_in.bias.detach(),
            m.linear_ab_p.weight.detach().to(dtype), m.linear_ab_p.bias.detach(),
            m.linear_ab_g.weight.detach().to(dtype), m.linear_ab_g.bias.detach(), 1e-5)
    shape = (2, b, hidden, n, tk_trimul.padded(n))
    want = torch.empty(shape, device="cuda", dtype=dtype)
    want_moments = torch.zeros(4, device="cuda", dtype=torch.float64)
    tk_trimul.Emulation.trimul_input(want, want_moments, *args)
    got = torch.full(shape, NAN, device="cuda", dtype=dtype)
    moments = torch.zeros(4, device="cuda", dtype=torch.float64)  # the kernel adds into it
    _backend._C.trimul_input(got, moments, *args, _stream())
    _check("ab", got, want, TOL_LN[dtype])
    assert torch.all(got[..., n:] == 0), "padding columns must be written as zero"
    print("moments", moments.tolist(), want_moments.tolist())
    torch.testing.assert_close(moments, want_moments, rtol=1e-2, atol=1e-3 * want_moments.abs().max().item())


@pytest.mark.parametrize(("c", "hidden"), [(64, 128), (128, 64)], ids=["c64-h128", "c128-h64"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("n", TRIMUL_N, ids=lambda n: f"N{n}")
def test_trimul_output(n, dt, c, hidden):
    dtype = DTYPES[dt]
    m = _trimul_module(genie_tk.TriangleMultiplicationIncoming, c, hidden, n)
    b = 2
    z = torch.randn(b, n, n, c, device="cuda").to(dtype)
    x = _channel_first(b, hidden, n, dtype, 7, scale=3.0)
    args = (x, z, m.layer_norm_in.weight.detach(), m.layer_norm_in.bias.detach(),
            m.layer_norm_out.weight.detach(), m.layer_norm_out.bias.detach(),
            m.linear_z.weight.detach().to(dtype), m.linear_z.bias.detach(),
            m.linear_g.weight.detach().to(dtype), m.linear_g.bias.detach(), 1e-5)
    want = torch.empty_like(z)
    tk_trimul.Emulation.trimul_output(want, *args)
    got = torch.full_like(z, NAN)
    _backend._C.trimul_output(got, *args, _stream())
    _check("out", got, want, TOL_LN[dtype])
