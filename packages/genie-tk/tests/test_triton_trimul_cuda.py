"""The triton backend of the triangle multiplicative update on a GPU (Ampere or newer).

What the GPU visit runs (``pytest -m cuda``; every test here is marked ``cuda`` by
the conftest hook from this file's name), the matrix of ``test_tk_trimul_cuda.py``:

* outgoing and incoming, plain and fused layouts, padding masks, N in {1, 17, 100,
  130, 255, 300, 1000, 1024, 2048}, output and every gradient (dz and each
  parameter) within 2x the torch backend's error in the same precision (bf16, and
  fp16 at the small sizes) against the fp64 oracle, globally and as the worst row
  of the output and of dz (a single bad tile cannot hide in a norm); the kernels'
  output buffers and the caching allocator filled with NaN first;
* float16 with inputs that overflow without OpenFold's normalisation;
* opcheck, ``torch.compile(fullgraph=True)`` of a module (inductor), a non-default
  stream, leading batch axes, float32 under autocast, the autotuner's pruning on
  this device.

When all of it passes, set ``verified=True`` for the op in ``genie_tk/triton/__init__.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import genie_tk
from genie_tk import _backend
from genie_tk.testing import TRI_MUL, build, pair_mask, rel

OP = "triangle_multiplicative_update"


@pytest.fixture(scope="module", autouse=True)
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if _backend.triton_interpreted():
        pytest.skip("TRITON_INTERPRET is set: the kernels would run interpreted, on CPU tensors only")
    if OP not in _backend.TRITON_KERNELS:
        pytest.skip("triton is not installed")
    assert _backend._triton_unavailable_reason() == ""


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    from genie_tk.triton import triangle_multiplication as tm

    def nan_empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(tm, "_empty", nan_empty)


def poison_allocator(nbytes: int = 1 << 30) -> None:
    """Fill the caching allocator's free memory with NaN so an unwritten output shows."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def _run(module, z, mask, cot, backend):
    module.backend = backend
    module.zero_grad(set_to_none=True)
    z = z.detach().clone().requires_grad_(True)
    out = module(z, mask=mask)
    (out.float() * cot).sum().backward()
    return out.detach(), z.grad, {k: p.grad for k, p in module.named_parameters()}


def _row_error(got, want):
    """Worst row ``(b, i)`` of ``|got - want|`` (max over j and channels), relative to ``max |want|``."""
    err = (got.double() - want.double()).abs().amax(dim=(-2, -1))
    return (err.max() / want.double().abs().max().clamp_min(1e-30)).item()


def _errors(out, dz, dw, ref):
    ref_out, ref_dz, ref_dw = ref
    errs = {"out": rel(out, ref_out), "dz": rel(dz, ref_dz),
            "out worst row": _row_error(out, ref_out), "dz worst row": _row_error(dz, ref_dz)}
    errs.update({k: rel(dw[k], ref_dw[k]) for k in ref_dw})
    return errs


def _modules(cls, c, hidden, seed, dtype):
    """A module in ``dtype`` and its fp64 copy (the same rounded weights)."""
    module = build(cls, c, hidden, 0, seed=seed, dtype=torch.float32).to(dtype).cuda()
    return module, copy.deepcopy(module).double()


# (N, c_z, c_hidden, fp64 oracle backend): the oracle of the large sizes is the
# torch backend (equal to the reference to 1e-15, with less memory).
SIZES = [(1, 128, 128, "reference"), (17, 128, 128, "reference"), (100, 128, 128, "reference"),
         (130, 64, 128, "reference"), (255, 128, 128, "reference"), (300, 128, 64, "reference"),
         (1000, 128, 128, "reference"), (1024, 64, 64, "torch"), (2048, 64, 64, "torch")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n", "c", "hidden", "oracle"), SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("cls", TRI_MUL, ids=lambda c: c.__name__)
def test_within_twice_pytorch_error(cls, n, c, hidden, oracle, dtype):
    if n >= 1000 and dtype == torch.float16 and cls not in TRI_MUL[2:]:
        pytest.skip("the large sizes run float16 on the fused layouts only (time)")
    seed = n
    g = torch.Generator(device="cuda").manual_seed(seed)
    z = torch.randn(1, n, n, c, generator=g, device="cuda")
    mask = pair_mask(1, n, min(4, n - 1), 0.1, seed, dtype=torch.float32).cuda()
    cot = torch.randn(1, n, n, c, generator=g, device="cuda")
    z = z.to(dtype)
    module, m64 = _modules(cls, c, hidden, seed, dtype)
    ref = _run(m64, z.double(), mask.double(), cot.double(), oracle)
    torch_errs = _errors(*_run(module, z, mask, cot, "torch"), ref)
    poison_allocator()
    out, dz, dw = _run(module, z, mask, cot, "triton")
    assert genie_tk.last_backend(OP) == "triton"
    assert torch.isfinite(out).all() and torch.isfinite(dz).all()
    errs = _errors(out, dz, dw, ref)
    for k in errs:
        print(f"{k:>24}: triton {errs[k]:.2e}  torch {torch_errs[k]:.2e}")
    bad = {k: (errs[k], torch_errs[k]) for k in errs if not errs[k] <= 2 * torch_errs[k] + 1e-6}
    assert not bad, f"over 2x the torch backend's error: {bad}"


@pytest.mark.parametrize("n", [64, 333])
def test_float32_matches_reference(n):
    module, m64 = _modules(TRI_MUL[1], 128, 128, n, torch.float32)
    z = torch.randn(1, n, n, 128, device="cuda")
    mask = pair_mask(1, n, 3, 0.1, n, dtype=torch.float32).cuda()
    cot = torch.randn(1, n, n, 128, device="cuda")
    ref = _run(m64, z.double(), mask.double(), cot.double(), "reference")
    errs = _errors(*_run(module, z, mask, cot, "triton"), ref)
    print(errs)
    assert max(errs.values()) < 1e-4  # fp32 operands in full precision (no TF32)


def test_float16_does_not_overflow():
    """Large a, b: the product overflows float16 unless normalised, as OpenFold does."""
    n, c = 256, 128
    module, m64 = _modules(TRI_MUL[2], c, c, 11, torch.float16)
    for m in (module, m64):
        with torch.no_grad():
            m.linear_ab_p.weight.mul_(30)
    z = torch.randn(1, n, n, c, device="cuda", dtype=torch.float16)
    module.backend, m64.backend = "triton", "reference"
    out = module(z)
    ref = m64(z.double())
    assert torch.isfinite(out).all()
    print("rel", rel(out, ref))
    assert rel(out, ref) < 2e-2


def test_leading_batch_axes_and_side_stream():
    module = build(genie_tk.TriangleMultiplicationIncoming, 64, 64, 0, seed=5, dtype=torch.bfloat16).cuda()
    module.backend = "triton"
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


def test_float32_under_autocast_runs_the_kernels():
    module = build(genie_tk.TriangleMultiplicationOutgoing, 128, 128, 0, seed=6, dtype=torch.float32).cuda()
    module.backend = "triton"
    z = torch.randn(1, 40, 40, 128, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(z)
    assert out.dtype == torch.bfloat16 and genie_tk.last_backend(OP) == "triton"
    out.float().sum().backward()
    assert z.grad.dtype == torch.float32 and module.linear_a_p.weight.grad.dtype == torch.float32
    module.backend = "reference"
    ref = module(z.detach())
    assert rel(out, ref) < 2e-2


def test_opcheck():
    module = build(genie_tk.TriangleMultiplicationIncoming, 64, 64, 0, seed=8, dtype=torch.bfloat16).cuda()
    p_w, p_b, g_w, g_b = module._input_projections()
    gemm = {2, 4, 8, 10}
    weights = [module.layer_norm_in.weight, module.layer_norm_in.bias, p_w, p_b, g_w, g_b,
               module.layer_norm_out.weight, module.layer_norm_out.bias, module.linear_z.weight,
               module.linear_z.bias, module.linear_g.weight, module.linear_g.bias]
    weights = [w.detach().to(torch.bfloat16 if i in gemm else torch.float32).requires_grad_()
               for i, w in enumerate(weights)]
    z = torch.randn(1, 20, 20, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = pair_mask(1, 20, 2, 0.1, 8, dtype=torch.float32).cuda()
    torch.library.opcheck(torch.ops.genie_tk.triton_trimul_fwd.default, (z, mask, *weights, False, 1e-5))
    out, x, stats = torch.ops.genie_tk.triton_trimul_fwd(z, mask, *weights, False, 1e-5)
    args = (torch.randn_like(out), z.detach(), mask, *[w.detach() for w in weights], x.detach(), stats.detach(),
            False, 1e-5)
    torch.library.opcheck(torch.ops.genie_tk.triton_trimul_bwd.default, args)


@pytest.mark.parametrize("cls", TRI_MUL[:2], ids=lambda c: c.__name__)
def test_compiled_module_fullgraph(cls):
    module = build(cls, 128, 128, 0, seed=9, dtype=torch.bfloat16).cuda()
    module.backend = "triton"
    z = torch.randn(1, 70, 70, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = pair_mask(1, 70, 3, 0.1, 9, dtype=torch.float32).cuda()
    want = module(z, mask=mask)
    (want_dz,) = torch.autograd.grad(want.float().sum(), z)
    compiled = torch.compile(module, fullgraph=True)
    got = compiled(z, mask=mask)
    (got_dz,) = torch.autograd.grad(got.float().sum(), z)
    assert torch.equal(got, want)
    assert rel(got_dz, want_dz) < 1e-6


def test_pruning_keeps_configs_this_gpu_holds():
    import triton.language as tl

    from genie_tk.triton import triangle_multiplication as tm

    configs = tm._configs("BLOCK_H")
    args = {"BLOCK_C": 128, "DTYPE": tl.bfloat16, "BLOCK_M": tm.GPU_BLOCK_M}
    kept = tm._pruner(0.5)(configs, {}, **args)
    shared, registers = tm._device_limits()
    print(f"{len(kept)} of {len(configs)} configs kept; shared memory {shared} B")
    assert kept and all(tm.fits(c, args, shared, registers, 0.5) for c in kept)
