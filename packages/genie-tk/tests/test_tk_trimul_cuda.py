"""The tk backend of the triangle multiplicative update on a Hopper GPU.

What the first GPU session runs (``pytest -m cuda``; every test here is marked
``cuda`` by the conftest hook from this file's name):

* each kernel of ``genie_tk._C`` against its PyTorch transcription
  (``tk_trimul.Emulation``) on NaN-filled outputs (relative Frobenius and worst
  per-row error): the contraction in its three
  modes, the input pass (with the float16 moments), the output pass; sizes that
  are not multiples of the tiles; the padding written as zeros;
* the issue's correctness matrix: outgoing and incoming, plain and fused
  layouts, padding masks, N in {1, 17, 128, 130, 255, 300, 1000, 1024, 2048}, output and
  every gradient (dz and each parameter) within 2x PyTorch's own error in the
  same precision against the fp64 oracle; float16 with inputs that overflow
  without OpenFold's normalisation;
* opcheck, ``torch.compile(fullgraph=True)`` of a module on tk, a non-default
  stream, leading batch axes, strided and unaligned views, float32 under
  autocast, argument errors.

When all of it passes, set ``VERIFIED = True`` in ``tk_trimul.py`` (and update the READMEs,
which tests/test_dispatch.py holds to that flag).
"""

from __future__ import annotations

import copy

import pytest
import torch

import genie_tk
from genie_tk import _backend, tk_trimul
from genie_tk.testing import TRI_MUL, build, pair_mask, rel, row_error

OP = tk_trimul.OP
MODES = ("ABt", "AtB", "AB")
DTYPES = (torch.bfloat16, torch.float16)


@pytest.fixture(scope="module", autouse=True)
def hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the tk kernels are built for sm_90a (Hopper)")
    if OP not in _backend.TK_KERNELS:
        pytest.skip("genie_tk._C has no tri-mul kernels in this install")
    assert _backend._C.driver_status() == ""


def poison_allocator(nbytes: int = 1 << 30) -> None:
    """Fill the caching allocator's free memory with NaN so an unwritten output shows.

    Both pools: one large block (requests over 1 MiB) and 1 MiB blocks from
    PyTorch's small pool, which serves every request of 1 MiB or less from 2 MiB
    segments that a large fill never touches. Kernel-level tests allocate their
    outputs with ``torch.full(..., nan)`` instead; this is for outputs that the
    ops allocate themselves."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    small = [torch.empty((1 << 20) // 4, device="cuda").fill_(float("nan")) for _ in range(64)]
    torch.cuda.synchronize()
    del small


def channel_first(b, c, n, dtype, seed, scale=1.0):
    """A random ``[b, c, n, Np]`` tensor with zero padding columns."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = torch.zeros(b, c, n, tk_trimul.padded(n), device="cuda", dtype=dtype)
    t[..., :n] = (scale * torch.randn(b, c, n, n, generator=g, device="cuda")).to(dtype)
    return t


def assert_kernel_close(name, got, want, dtype):
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten or overflow)"
    err = rel(got, want)
    tol = 8e-3 if dtype == torch.bfloat16 else 2e-3  # one rounding of the output, plus operand roundings
    row, where = row_error(got, want)
    row_tol = 3e-2 if dtype == torch.bfloat16 else 1e-2  # a few roundings of the row's largest value
    print(f"{name}: rel {err:.2e} (tol {tol:.0e}); worst row {where} {row:.2e} (tol {row_tol:.0e})")
    assert err <= tol
    assert row <= row_tol, f"{name}: row {where} has relative error {row:.2e}"


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 17, 64, 100, 130, 255, 256, 300, 1000])
def test_contract_matches_emulation(dtype, mode, n):
    a, b = channel_first(2, 3, n, dtype, 1), channel_first(2, 3, n, dtype, 2)
    scale = torch.tensor([0.37], device="cuda")
    want = torch.empty_like(a)
    tk_trimul.Emulation.trimul_contract(want, a, b, scale, mode)
    got = torch.full_like(a, float("nan"))
    genie_tk._backend._C.trimul_contract(got, a, b, scale, mode, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.all(got[..., n:] == 0), "padding columns must be written as zero"
    assert_kernel_close(f"contract {mode} n={n}", got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("c", "hidden"), [(64, 64), (64, 128), (128, 64), (128, 128)])
@pytest.mark.parametrize(("b", "n", "masked"), [(1, 1, False), (2, 17, True), (1, 100, True), (1, 130, True), (1, 255, False),
                                               (1, 300, True)])
def test_input_matches_emulation(dtype, c, hidden, b, n, masked):
    m = build(genie_tk.FusedTriangleMultiplicationOutgoing, c, hidden, 0, seed=n, dtype=torch.float32).cuda()
    z = torch.randn(b, n, n, c, device="cuda").to(dtype)
    mask = pair_mask(b, n, min(3, n - 1), 0.1, n, dtype=torch.float32).cuda() if masked else None
    args = (z, mask, m.layer_norm_in.weight.detach(), m.layer_norm_in.bias.detach(),
            m.linear_ab_p.weight.detach().to(dtype), m.linear_ab_p.bias.detach(),
            m.linear_ab_g.weight.detach().to(dtype), m.linear_ab_g.bias.detach(), 1e-5)
    shape = (2, b, hidden, n, tk_trimul.padded(n))
    want, want_moments = torch.empty(shape, device="cuda", dtype=dtype), torch.zeros(4, device="cuda", dtype=torch.float64)
    tk_trimul.Emulation.trimul_input(want, want_moments, *args)
    got = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
    moments = torch.zeros(4, device="cuda", dtype=torch.float64)
    genie_tk._backend._C.trimul_input(got, moments, *args, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.all(got[..., n:] == 0), "padding columns must be written as zero"
    assert_kernel_close("ab", got, want, dtype)
    print("moments", moments.tolist(), want_moments.tolist())
    assert torch.allclose(moments, want_moments, rtol=1e-2, atol=1e-3 * want_moments.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("c", "hidden"), [(64, 64), (64, 128), (128, 64), (128, 128)])
@pytest.mark.parametrize(("b", "n"), [(1, 1), (2, 17), (1, 100), (1, 130), (1, 255), (1, 300)])
def test_output_matches_emulation(dtype, c, hidden, b, n):
    m = build(genie_tk.TriangleMultiplicationIncoming, c, hidden, 0, seed=n, dtype=torch.float32).cuda()
    z = torch.randn(b, n, n, c, device="cuda").to(dtype)
    x = channel_first(b, hidden, n, dtype, 7, scale=3.0)
    args = (x, z, m.layer_norm_in.weight.detach(), m.layer_norm_in.bias.detach(),
            m.layer_norm_out.weight.detach(), m.layer_norm_out.bias.detach(),
            m.linear_z.weight.detach().to(dtype), m.linear_z.bias.detach(),
            m.linear_g.weight.detach().to(dtype), m.linear_g.bias.detach(), 1e-5)
    want = torch.empty_like(z)
    tk_trimul.Emulation.trimul_output(want, *args)
    got = torch.full_like(z, float("nan"))
    genie_tk._backend._C.trimul_output(got, *args, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert_kernel_close("out", got, want, dtype)


def _half(*shape, dtype=torch.bfloat16):
    return torch.zeros(shape, device="cuda", dtype=dtype)


def _float(*shape):
    return torch.zeros(shape, device="cuda")


# id -> (call, error, message); the tensors are made inside the test.
BAD_ARGUMENTS = {
    "unpadded": (lambda ext: ext.trimul_contract(_half(1, 2, 17, 17), _half(1, 2, 17, 17), _half(1, 2, 17, 17),
                                                 None, "ABt", 0), ValueError, r"^a must have shape \[B, C, N, Np\]"),
    "mode": (lambda ext: ext.trimul_contract(_half(1, 2, 5, 64), _half(1, 2, 5, 64), _half(1, 2, 5, 64), None,
                                             "AtBt", 0), ValueError, r"^mode must be"),
    "dtype-mismatch": (lambda ext: ext.trimul_contract(_half(1, 2, 5, 64), _half(1, 2, 5, 64),
                                                       _half(1, 2, 5, 64, dtype=torch.float16), None, "AB", 0),
                       TypeError, r"^b must have dtype bfloat16, got float16"),
    "float32": (lambda ext: ext.trimul_contract(_half(1, 2, 5, 64), _half(1, 2, 5, 64, dtype=torch.float32),
                                                _half(1, 2, 5, 64), None, "AB", 0),
                TypeError, r"^a must have dtype bfloat16 or float16, got float32"),
    "non-contiguous": (lambda ext: ext.trimul_contract(_half(1, 2, 5, 64), _half(1, 2, 64, 5).transpose(2, 3),
                                                       _half(1, 2, 5, 64), None, "AB", 0),
                       ValueError, r"^a must be C-contiguous"),
    "c_z": (lambda ext: ext.trimul_output(_half(1, 5, 5, 32), _half(1, 64, 5, 64), _half(1, 5, 5, 32),
                                          *([_half(1)] * 10), 1e-5, 0), ValueError, r"^c_z must be 64 or 128"),
    "hidden": (lambda ext: ext.trimul_input(_half(2, 1, 32, 5, 64), None, _half(1, 5, 5, 64), None, _half(64),
                                            _half(64), _half(64, 64), _half(64), _half(64, 64), _half(64), 1e-5, 0),
               ValueError, r"^c_hidden must be 64 or 128"),
    "mask-dtype": (lambda ext: ext.trimul_input(_half(2, 1, 64, 5, 64), None, _half(1, 5, 5, 64), _half(1, 5, 5),
                                                _float(64), _float(64), _half(128, 64), _float(128), _half(128, 64),
                                                _float(128), 1e-5, 0),
                   TypeError, r"^mask must have dtype float32, got bfloat16"),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bindings_reject_bad_arguments(case):
    call, error, message = BAD_ARGUMENTS[case]
    with pytest.raises(error, match=message):
        call(_backend._C)


# ---------------------------------------------------------------- end to end


def _run(module, z, mask, cot, backend):
    module.backend = backend
    module.zero_grad(set_to_none=True)
    z = z.detach().clone().requires_grad_(True)
    out = module(z, mask=mask)
    (out.float() * cot).sum().backward()
    return out.detach(), z.grad, {k: p.grad for k, p in module.named_parameters()}


def _errors(out, dz, dw, ref):
    ref_out, ref_dz, ref_dw = ref
    errs = {"out": rel(out, ref_out), "dz": rel(dz, ref_dz)}
    errs.update({k: rel(dw[k], ref_dw[k]) for k in ref_dw})
    return errs


def _modules(cls, c, hidden, seed, dtype):
    """A module in ``dtype`` and its fp64 copy (the same rounded weights)."""
    module = build(cls, c, hidden, 0, seed=seed, dtype=torch.float32).to(dtype).cuda()
    return module, copy.deepcopy(module).double()


# (N, c_z, c_hidden, fp64 oracle backend): the oracle of the large sizes is the
# torch backend (equal to the reference to 1e-15, with less memory).
SIZES = [(1, 128, 128, "reference"), (17, 128, 128, "reference"), (128, 128, 128, "reference"),
         (130, 128, 128, "reference"), (255, 128, 128, "reference"), (300, 64, 128, "reference"), (1000, 128, 128, "reference"), (1024, 64, 64, "torch"),
         (2048, 64, 64, "torch")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "c", "hidden", "oracle"), SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("cls", TRI_MUL, ids=lambda c: c.__name__)
def test_within_twice_pytorch_error(cls, n, c, hidden, oracle, dtype):
    if n >= 1024 and dtype == torch.float16 and cls not in TRI_MUL[2:]:
        pytest.skip("the large sizes run float16 on the fused layouts only (time)")
    seed = n
    g = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(1, n, n, c, generator=g, device="cuda")
    mask = pair_mask(1, n, min(4, n - 1), 0.1, seed, dtype=torch.float32).cuda()
    cot = torch.randn(1, n, n, c, generator=g, device="cuda")
    z = z.to(dtype)
    module, m64 = _modules(cls, c, hidden, seed, dtype)
    ref = _run(m64, z.double(), mask.double(), cot.double(), oracle)
    torch_errs = _errors(*_run(module, z, mask, cot, "reference"), ref)
    poison_allocator()
    out, dz, dw = _run(module, z, mask, cot, "tk")
    assert genie_tk.last_backend(OP) == "tk"
    assert torch.isfinite(out).all() and torch.isfinite(dz).all()
    tk_errs = _errors(out, dz, dw, ref)
    for k in tk_errs:
        print(f"{k:>24}: tk {tk_errs[k]:.2e}  pytorch {torch_errs[k]:.2e}")
    bad = {k: (tk_errs[k], torch_errs[k]) for k in tk_errs if not tk_errs[k] <= 2 * torch_errs[k] + 1e-6}
    assert not bad, f"over 2x PyTorch's error: {bad}"


def test_float16_does_not_overflow():
    """Large a, b: the product overflows float16 unless normalised, as OpenFold does."""
    n, c = 256, 128
    module, m64 = _modules(genie_tk.FusedTriangleMultiplicationOutgoing, c, c, 11, torch.float16)
    for m in (module, m64):
        with torch.no_grad():
            m.linear_ab_p.weight.mul_(30)
    z = torch.randn(1, n, n, c, device="cuda", dtype=torch.float16)
    module.backend, m64.backend = "tk", "reference"
    out = module(z)
    ref = m64(z.double())
    assert torch.isfinite(out).all()
    print("rel", rel(out, ref))
    assert rel(out, ref) < 2e-2


def test_leading_batch_axes_and_side_stream():
    module = build(genie_tk.TriangleMultiplicationIncoming, 64, 64, 0, seed=5, dtype=torch.bfloat16).cuda()
    module.backend = "tk"
    z = torch.randn(2, 3, 33, 33, 64, device="cuda", dtype=torch.bfloat16)
    mask = pair_mask(6, 33, 2, 0.1, 5, dtype=torch.float32).cuda().reshape(2, 3, 33, 33)
    want = module(z, mask=mask)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        poison_allocator(1 << 28)
        got = module(z, mask=mask)
    stream.synchronize()
    assert got.shape == z.shape
    assert torch.equal(got, want)
    flat = module(z.reshape(6, 33, 33, 64), mask=mask.reshape(6, 33, 33))
    assert torch.equal(flat.reshape(z.shape), want)


def test_strided_and_unaligned_views():
    """Views that are not contiguous or do not start on a 16-byte boundary are copied, not refused."""
    n, c = 37, 64
    module = build(genie_tk.TriangleMultiplicationOutgoing, c, c, 0, seed=12, dtype=torch.bfloat16).cuda()
    module.backend = "tk"
    z = torch.randn(1, n, n, c, device="cuda", dtype=torch.bfloat16)
    want = module(z)
    wide = torch.zeros(1, n, n, c + 8, device="cuda", dtype=torch.bfloat16)
    wide[..., :c] = z
    shifted = torch.zeros(z.numel() + 1, device="cuda", dtype=torch.bfloat16)
    shifted[1:] = z.flatten()
    for view in (wide[..., :c], shifted[1:].view(z.shape)):
        assert torch.equal(module(view), want)


def test_float32_under_autocast_runs_the_kernels():
    module = build(genie_tk.TriangleMultiplicationOutgoing, 128, 128, 0, seed=6, dtype=torch.float32).cuda()
    module.backend = "tk"
    z = torch.randn(1, 40, 40, 128, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(z)
    assert out.dtype == torch.bfloat16 and genie_tk.last_backend(OP) == "tk"
    out.float().sum().backward()
    assert z.grad.dtype == torch.float32 and module.linear_a_p.weight.grad.dtype == torch.float32
    module.backend = "reference"
    ref = module(z.detach())
    assert rel(out, ref) < 2e-2


def test_opcheck():
    module = build(genie_tk.TriangleMultiplicationIncoming, 64, 64, 0, seed=8, dtype=torch.bfloat16).cuda()
    p_w, p_b, g_w, g_b = module._input_projections()
    f32 = [w.detach().float().requires_grad_() for w in (module.layer_norm_in.weight, module.layer_norm_in.bias)]
    weights = [*f32, p_w.detach().requires_grad_(), p_b.detach().float().requires_grad_(),
               g_w.detach().requires_grad_(), g_b.detach().float().requires_grad_(),
               module.layer_norm_out.weight.detach().float().requires_grad_(),
               module.layer_norm_out.bias.detach().float().requires_grad_(),
               module.linear_z.weight.detach().requires_grad_(), module.linear_z.bias.detach().float().requires_grad_(),
               module.linear_g.weight.detach().requires_grad_(), module.linear_g.bias.detach().float().requires_grad_()]
    z = torch.randn(1, 20, 20, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = pair_mask(1, 20, 2, 0.1, 8, dtype=torch.float32).cuda()
    torch.library.opcheck(torch.ops.genie_tk.trimul_fwd.default, (z, mask, *weights, False, 1e-5))
    out, x, stats = torch.ops.genie_tk.trimul_fwd(z, mask, *weights, False, 1e-5)
    args = (torch.randn_like(out), z.detach(), mask, *[w.detach() for w in weights], x.detach(), stats.detach(),
            False, 1e-5)
    torch.library.opcheck(torch.ops.genie_tk.trimul_bwd.default, args)


@pytest.mark.parametrize("cls", TRI_MUL[:2], ids=lambda c: c.__name__)
def test_compiled_module_fullgraph(cls):
    module = build(cls, 128, 128, 0, seed=9, dtype=torch.bfloat16).cuda()
    module.backend = "tk"
    z = torch.randn(1, 70, 70, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = pair_mask(1, 70, 3, 0.1, 9, dtype=torch.float32).cuda()
    want = module(z, mask=mask)
    (want_dz,) = torch.autograd.grad(want.float().sum(), z)
    compiled = torch.compile(module, fullgraph=True)
    got = compiled(z, mask=mask)
    (got_dz,) = torch.autograd.grad(got.float().sum(), z)
    assert torch.equal(got, want)
    assert rel(got_dz, want_dz) < 1e-6
