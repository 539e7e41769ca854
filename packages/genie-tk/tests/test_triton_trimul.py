"""The triton backend of the triangle multiplicative update, under Triton's interpreter.

Without a GPU the root conftest sets ``TRITON_INTERPRET=1`` before genie_tk is
imported, so the kernels of ``genie_tk.triton.triangle_multiplication`` run as
they are written, on CPU tensors. Checked here:

* registration (``verified=False``) and eligibility reasons;
* the four modules and the functional op on ``backend="triton"`` against the fp64
  reference, output and every gradient (dz and each parameter, perturbed so that
  no zero-initialised layer hides anything), with padding masks (fully masked rows
  and columns) and random holes, N in {1, 5, 17, 33, 65}, B in {1, 3}, float32,
  bfloat16 and float16 (OpenFold's normalisation of a and b, and its gradient):
  error at most twice the torch backend's in the same precision; every output
  buffer of the kernels starts filled with NaN;
* Hypothesis over shapes and masks (float32);
* opcheck of both custom ops and ``torch.compile(fullgraph=True)`` of a module;
* that the comparison fails when a kernel writes nothing;
* the autotuner's pruning of configurations a GPU cannot hold.

The same matrix at full sizes on a GPU: ``test_triton_trimul_cuda.py``.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import genie_tk
from genie_tk import _backend
from genie_tk.testing import TRI_MUL, build, pair_mask, rel

if not _backend.HAS_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)
if not _backend.triton_interpreted():
    pytest.skip("these tests run the kernels under TRITON_INTERPRET=1 (the GPU tests are *_cuda.py)",
                allow_module_level=True)

import triton

from genie_tk.triton import triangle_multiplication as tm

OP = tm.OP


def nan_empty(*args, **kwargs):
    """``torch.empty`` filled with NaN: whatever a kernel leaves unwritten shows."""
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(tm, "_empty", nan_empty)


# ------------------------------------------------------------ registration, eligibility


def test_registered_unverified():
    kernel = _backend.TRITON_KERNELS[OP]
    assert kernel.check is tm.check and kernel.run is tm.run
    assert kernel.verified is False  # until the GPU tests pass
    assert hasattr(torch.ops.genie_tk, "triton_trimul_fwd") and hasattr(torch.ops.genie_tk, "triton_trimul_bwd")


@pytest.mark.parametrize(
    ("dtype", "shape", "hidden", "reason"),
    [
        (torch.float32, (1, 4, 4, 16), 16, ""),
        (torch.bfloat16, (2, 3, 3, 256), 256, ""),
        (torch.float16, (1, 4, 4, 24), 20, ""),
        (torch.float64, (1, 4, 4, 16), 16, "float16, bfloat16 or float32 inputs, got torch.float64"),
        (torch.float32, (1, 4, 4, 320), 16, "c_z = 320"),
        (torch.float32, (1, 4, 4, 16), 512, "c_hidden = 512"),
        (torch.float32, (0, 4, 4, 16), 16, "the input is empty"),
    ],
)
def test_check(dtype, shape, hidden, reason):
    got = tm.check(torch.zeros(shape, dtype=dtype), None, hidden=hidden)
    assert (reason in got) if reason else got == ""


def test_auto_does_not_pick_the_unverified_kernel():
    m = build(genie_tk.TriangleMultiplicationOutgoing, 16, 16, 0, seed=0, dtype=torch.float32, backend="auto")
    m(torch.randn(1, 4, 4, 16))
    assert genie_tk.last_backend(OP) == "torch"


# ------------------------------------------------------------ accuracy


def run_module(module, z, mask, cot, backend):
    """Output, dz and the parameter gradients of ``sum(module(z, mask) · cot)``."""
    module.backend = backend
    module.zero_grad(set_to_none=True)
    z = z.detach().clone().requires_grad_(True)
    out = module(z, mask=mask)
    (out.double() * cot).sum().backward()
    return out.detach(), z.grad, {k: p.grad for k, p in module.named_parameters()}


def errors(result, ref):
    out, dz, dw = result
    errs = {"out": rel(out, ref[0]), "dz": rel(dz, ref[1])}
    errs.update({k: rel(dw[k], ref[2][k]) for k in ref[2]})
    return errs


# Slack at rounding level: four float32 ulps (relative). The kernels accumulate in float32, so
# no result comes closer than that to float64; the torch backend's plain path at these small N
# can (its reductions sum pairwise).
ROUNDING = 4 * torch.finfo(torch.float32).eps


def assert_within_twice_torch(result, torch_result, ref):
    """The flash-attention rule for the output and every gradient (NaN fails it)."""
    got, base = errors(result, ref), errors(torch_result, ref)
    for k in got:
        print(f"{k:>24}: triton {got[k]:.2e}  torch {base[k]:.2e}")
    bad = {k: (got[k], base[k]) for k in got if not got[k] <= 2 * base[k] + ROUNDING}
    assert not bad, f"over 2x the torch backend's error: {bad}"


def case(cls, b, n, c, hidden, dtype, masked, seed, eps=1e-5):
    """The module in ``dtype``, its fp64 twin (the same rounded weights), inputs, cotangent."""
    module = build(cls, c, hidden, 0, seed=seed, dtype=torch.float32).to(dtype)
    module.layer_norm_in.eps = module.layer_norm_out.eps = eps
    m64 = copy.deepcopy(module).double()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, n, n, c, generator=g).to(dtype)
    mask = pair_mask(b, n, min(2, n - 1), 0.15, seed) if masked else None
    cot = torch.randn(b, n, n, c, generator=g, dtype=torch.float64)
    return module, m64, z, mask, cot


def compare(cls, b, n, c, hidden, dtype, masked, seed, eps=1e-5):
    module, m64, z, mask, cot = case(cls, b, n, c, hidden, dtype, masked, seed, eps)
    ref = run_module(m64, z.double(), mask, cot, "reference")
    low = None if mask is None else mask.to(dtype)
    torch_result = run_module(module, z, low, cot, "torch")
    result = run_module(module, z, low, cot, "triton")
    assert genie_tk.last_backend(OP) == "triton"
    assert result[0].dtype == dtype and result[1].dtype == dtype
    return result, torch_result, ref


OUT, IN, FOUT, FIN = TRI_MUL
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (module, B, N, c_z, c_hidden, dtype, masked): every value of every axis at least
# once, chosen for the interpreter's time (it costs per tile of 256 pairs).
CASES = [
    (OUT, 1, 1, 16, 32, F32, True),
    (IN, 3, 5, 16, 32, BF16, True),
    (FOUT, 1, 17, 16, 32, BF16, True),
    (FIN, 1, 33, 16, 32, F32, True),
    (OUT, 1, 65, 16, 16, BF16, True),
    (IN, 1, 65, 16, 16, F32, False),
    (FOUT, 3, 17, 24, 20, F32, True),
    (FIN, 3, 5, 16, 32, F16, True),
    (OUT, 1, 33, 16, 32, F16, False),
    (IN, 1, 17, 24, 20, BF16, False),
]


@pytest.mark.parametrize(("cls", "b", "n", "c", "hidden", "dtype", "masked"), CASES,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_module_within_twice_torch_error(cls, b, n, c, hidden, dtype, masked):
    result, torch_result, ref = compare(cls, b, n, c, hidden, dtype, masked, seed=n + b)
    assert_within_twice_torch(result, torch_result, ref)


def test_float32_matches_reference_tightly():
    result, _, ref = compare(FOUT, 2, 9, 16, 32, F32, True, seed=3)
    errs = errors(result, ref)
    print(errs)
    assert max(errs.values()) < 1e-5


@pytest.mark.parametrize("cls", [FOUT, IN], ids=lambda c: c.__name__)
def test_float16_normalisation_gradient(cls):
    """LayerNorm_out's eps made large so the gradient through std(a), std(b) matters."""
    result, torch_result, ref = compare(cls, 1, 12, 16, 32, F16, True, seed=5, eps=10.0)
    assert_within_twice_torch(result, torch_result, ref)


def test_float16_does_not_overflow():
    module, m64, z, _, _ = case(FOUT, 1, 24, 16, 32, F16, False, seed=11)
    for m in (module, m64):
        with torch.no_grad():
            m.linear_ab_p.weight.mul_(300)
    module.backend, m64.backend = "triton", "reference"
    out, ref = module(z), m64(z.double())
    print("rel", rel(out, ref))
    assert torch.isfinite(out).all() and rel(out, ref) < 2e-2


def test_functional_op_leading_axes():
    module, m64, z, _, cot = case(IN, 6, 9, 16, 32, F32, False, seed=2)
    mask = pair_mask(6, 9, 2, 0.1, 2, dtype=torch.float32).reshape(2, 3, 9, 9)
    z, cot = z.reshape(2, 3, 9, 9, 16), cot.reshape(2, 3, 9, 9, 16)

    def grads(m, z, backend):
        p_w, p_b, g_w, g_b = m._input_projections()
        weights = dict(norm_in_weight=m.layer_norm_in.weight, norm_in_bias=m.layer_norm_in.bias,
                       p_in_weight=p_w, p_in_bias=p_b, g_in_weight=g_w, g_in_bias=g_b,
                       norm_out_weight=m.layer_norm_out.weight, norm_out_bias=m.layer_norm_out.bias,
                       p_out_weight=m.linear_z.weight, p_out_bias=m.linear_z.bias,
                       g_out_weight=m.linear_g.weight, g_out_bias=m.linear_g.bias)
        z = z.detach().clone().requires_grad_(True)
        out = genie_tk.triangle_multiplicative_update(z, mask.to(z.dtype), "incoming", **weights, backend=backend)
        params = list(m.parameters())
        return out, torch.autograd.grad((out.double() * cot).sum(), (z, *params))

    out, g = grads(module, z, "triton")
    ref, g64 = grads(m64, z.double(), "reference")
    assert out.shape == z.shape
    errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(g, g64)]
    print(errs)
    assert max(errs) < 1e-5


def test_float32_under_bfloat16_autocast():
    module = build(OUT, 16, 32, 0, seed=6, dtype=torch.float32, backend="triton")
    z = torch.randn(1, 10, 10, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(z)
    assert out.dtype == torch.bfloat16 and genie_tk.last_backend(OP) == "triton"
    out.float().sum().backward()
    assert z.grad.dtype == torch.float32 and module.linear_a_p.weight.grad.dtype == torch.float32
    module.backend = "reference"
    assert rel(out, module(z.detach())) < 2e-2


@settings(max_examples=6, deadline=None, derandomize=True)
@given(n=st.integers(1, 20), b=st.integers(1, 2), cls=st.sampled_from(TRI_MUL), drop=st.floats(0.0, 0.5),
       n_pad=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_hypothesis_float32(n, b, cls, drop, n_pad, seed):
    module, m64, z, _, cot = case(cls, b, n, 16, 16, F32, False, seed)
    mask = pair_mask(b, n, min(n_pad, n - 1), drop, seed)
    ref = run_module(m64, z.double(), mask, cot, "reference")
    result = run_module(module, z, mask.float(), cot, "triton")
    errs = errors(result, ref)
    assert max(errs.values()) < 1e-5, errs


# ------------------------------------------------------------ custom ops


def op_args(dtype=torch.float32, n=6, masked=True):
    module = build(FIN, 16, 16, 0, seed=8, dtype=torch.float32)
    p_w, p_b, g_w, g_b = module._input_projections()
    weights = [module.layer_norm_in.weight, module.layer_norm_in.bias, p_w, p_b, g_w, g_b,
               module.layer_norm_out.weight, module.layer_norm_out.bias, module.linear_z.weight,
               module.linear_z.bias, module.linear_g.weight, module.linear_g.bias]
    gemm = {2, 4, 8, 10}
    weights = [w.detach().to(dtype if i in gemm else torch.float32).requires_grad_() for i, w in enumerate(weights)]
    z = torch.randn(1, n, n, 16, dtype=dtype, requires_grad=True)
    mask = pair_mask(1, n, 1, 0.1, 8, dtype=torch.float32) if masked else None
    return z, mask, weights


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_opcheck(dtype):
    z, mask, weights = op_args(dtype)
    torch.library.opcheck(torch.ops.genie_tk.triton_trimul_fwd.default, (z, mask, *weights, True, 1e-5))
    out, x, stats = torch.ops.genie_tk.triton_trimul_fwd(z, mask, *weights, True, 1e-5)
    args = (torch.randn_like(out), z.detach(), mask, *[w.detach() for w in weights], x.detach(), stats.detach(),
            True, 1e-5)
    torch.library.opcheck(torch.ops.genie_tk.triton_trimul_bwd.default, args)


def test_compiled_module_fullgraph():
    """Dynamo + AOTAutograd trace the module through the custom ops (fake tensors, the
    registered autograd). The CPU run uses ``aot_eager``: inductor's C++ compilation of
    the surrounding casts took 137 s here (2 shared cores) and tests torch, not this
    backend; the GPU file compiles with inductor."""
    module = build(OUT, 16, 16, 0, seed=9, dtype=torch.float32, backend="triton")
    z = torch.randn(1, 7, 7, 16, requires_grad=True)
    mask = pair_mask(1, 7, 1, 0.1, 9, dtype=torch.float32)
    want = module(z, mask=mask)
    (want_dz,) = torch.autograd.grad(want.sum(), z)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got = compiled(z, mask=mask)
    (got_dz,) = torch.autograd.grad(got.sum(), z)
    assert genie_tk.last_backend(OP) == "triton"
    assert torch.equal(got, want)
    assert torch.equal(got_dz, want_dz)


# ------------------------------------------------------------ the tests can fail


class _NoLaunch:
    """A kernel handle whose launches write nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("kernel", ["_OUTPUT", "_INPUT_BWD", "_OUTPUT_BWD"])
def test_a_kernel_that_writes_nothing_fails(monkeypatch, kernel):
    monkeypatch.setattr(tm, kernel, _NoLaunch())
    result, torch_result, ref = compare(OUT, 1, 5, 16, 16, F32, True, seed=1)
    with pytest.raises(AssertionError, match="over 2x"):
        assert_within_twice_torch(result, torch_result, ref)


# ------------------------------------------------------------ the real compiler


def test_kernels_compile_for_a_gpu_target():
    """Triton's compiler and ptxas lower every kernel for sm_80 without a GPU (the
    interpreter runs Python and would not catch, say, a loop-carried type change)."""
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "triton_trimul_compile.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script), "--arch", "80", "--widths", "32", "--warps", "4",
                          "--stages", "1", "--dtypes", "fp16"], capture_output=True, text=True, env=env,
                         timeout=600)
    print(run.stdout, run.stderr[-4000:])
    assert run.returncode == 0
    lines = [line for line in run.stdout.splitlines() if line.startswith("sm_80 ")]
    assert sorted(line.split()[1] for line in lines) == sorted(
        ["_input_kernel", "_output_kernel", "_output_bwd_kernel", "_input_bwd_kernel"])


# ------------------------------------------------------------ autotuning


def test_pruning_drops_configs_the_gpu_cannot_hold():
    configs = tm._configs("BLOCK_H")
    args = {"BLOCK_C": 128, "DTYPE": triton.language.bfloat16}
    small = [c for c in configs if tm.fits(c, args, shared_bytes=80 * 1024, registers=255)]
    large = [c for c in configs if tm.fits(c, args, shared_bytes=228 * 1024, registers=255)]
    assert 0 < len(small) < len(large) <= len(configs)
    assert all(c.kwargs["BLOCK_H"] == 32 for c in small)
    # One warp cannot hold a 64-pair tile of 128 channels in registers.
    one_warp = triton.Config({"BLOCK_H": 32}, num_warps=1, num_stages=1)
    assert not tm.fits(one_warp, args, shared_bytes=228 * 1024, registers=255)
