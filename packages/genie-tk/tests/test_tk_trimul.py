"""The tk backend of the triangle multiplicative update, without a GPU.

* Registration: only with an extension that has the kernels; the module
  imports and registers nothing without one.
* Eligibility (``tk_trimul.check``) and dispatch: ``backend="tk"`` raises with
  the reason, ``auto`` falls back to ``torch`` with one warning per reason.
* The glue's arithmetic: :func:`genie_tk.tk_trimul.forward` / ``backward``
  run on ``Emulation`` (PyTorch transcriptions of the three kernels) in fp64
  and match the reference's outputs and every gradient, outgoing and
  incoming, plain and fused layouts, with masks; the float16 normalisation,
  including the gradient through ``std(a)`` and ``std(b)``.
* The custom ops (when registered): opcheck, fake tensors on CUDA,
  ``torch.compile(fullgraph=True)``, on CPU tensors through the emulation.

The kernels themselves are checked in ``test_tk_trimul_cuda.py``.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import genie_tk
from genie_tk import _backend, reference, tk_trimul
from genie_tk.testing import TRI_MUL, build, pair_mask, rel

OP = tk_trimul.OP
REGISTERED = OP in _backend.TK_KERNELS
needs_ops = pytest.mark.skipif(not REGISTERED, reason="genie_tk._C has no tri-mul kernels in this install")


def weights_of(module) -> tuple[torch.Tensor, ...]:
    """The twelve weights in ``triangle_multiplicative_update``'s order."""
    p_w, p_b, g_w, g_b = module._input_projections()
    return (module.layer_norm_in.weight, module.layer_norm_in.bias, p_w, p_b, g_w, g_b,
            module.layer_norm_out.weight, module.layer_norm_out.bias, module.linear_z.weight,
            module.linear_z.bias, module.linear_g.weight, module.linear_g.bias)


def grads_by_weight(module, grads: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """A module's parameter gradients in ``weights_of`` order (a and b stacked)."""
    if "linear_ab_p.weight" in grads:
        proj = [grads[f"linear_ab_{k}"] for k in ("p.weight", "p.bias", "g.weight", "g.bias")]
    else:
        proj = [torch.cat([grads[f"linear_a_{k}"], grads[f"linear_b_{k}"]])
                for k in ("p.weight", "p.bias", "g.weight", "g.bias")]
    return [grads["layer_norm_in.weight"], grads["layer_norm_in.bias"], *proj,
            grads["layer_norm_out.weight"], grads["layer_norm_out.bias"], grads["linear_z.weight"],
            grads["linear_z.bias"], grads["linear_g.weight"], grads["linear_g.bias"]]


def reference_case(cls, b, n, c, hidden, seed, masked=True, eps=1e-5):
    """Module, z, mask, cotangent, and the reference's output and gradients (fp64)."""
    m = build(cls, c, hidden, 0, seed=seed, backend="reference")
    m.layer_norm_in.eps = m.layer_norm_out.eps = eps
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, n, n, c, generator=g, dtype=torch.float64, requires_grad=True)
    mask = pair_mask(b, n, min(2, n - 1), 0.1, seed) if masked else None
    out = m(z, mask=mask)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64)
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(out, (z, *params.values()), cot)
    return m, z.detach(), mask, cot, out.detach(), grads[0], grads_by_weight(m, dict(zip(params, grads[1:])))


def assert_close(name, got, want, tol):
    err = rel(got, want)
    print(f"{name}: rel {err:.2e}")
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# ------------------------------------------------------------ registration


def test_registration_follows_the_extension():
    if REGISTERED:
        kernel = _backend.TK_KERNELS[OP]
        assert kernel.verified is False  # until the GPU tests pass
        assert kernel.check is tk_trimul.check and kernel.run is tk_trimul.run
        assert hasattr(torch.ops.genie_tk, "trimul_fwd") and hasattr(torch.ops.genie_tk, "trimul_bwd")
    else:
        assert not hasattr(torch.ops.genie_tk, "trimul_fwd")


def test_import_without_extension_registers_nothing():
    code = """
import importlib.abc, sys
class NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "genie_tk._C":
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoExtension())
import torch, genie_tk
assert not genie_tk._backend.HAS_EXTENSION
assert "triangle_multiplicative_update" not in genie_tk._backend.TK_KERNELS
assert not hasattr(torch.ops.genie_tk, "trimul_fwd")
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ------------------------------------------------------------ eligibility


@pytest.mark.parametrize(
    ("dtype", "c", "hidden", "reason"),
    [
        (torch.bfloat16, 128, 128, ""),
        (torch.float16, 64, 128, ""),
        (torch.bfloat16, 64, 64, ""),
        (torch.float32, 128, 128, "bfloat16 or float16 inputs"),
        (torch.float64, 64, 64, "bfloat16 or float16 inputs"),
        (torch.bfloat16, 32, 64, "c_z = 32"),
        (torch.bfloat16, 64, 32, "c_hidden = 32"),
        (torch.float16, 96, 64, "c_z = 96"),
    ],
)
def test_check_names_the_reason(dtype, c, hidden, reason):
    got = tk_trimul.check(torch.empty(1, 3, 3, c, dtype=dtype), None, hidden=hidden)
    assert (got == "") if not reason else (reason in got), got


def test_check_rejects_empty_input():
    assert "empty" in tk_trimul.check(torch.empty(0, 3, 3, 64, dtype=torch.bfloat16), None, hidden=64)


@pytest.mark.parametrize(
    ("dtype", "autocast", "want", "reason"),
    [
        (torch.float32, torch.bfloat16, torch.bfloat16, ""),
        (torch.float32, torch.float16, torch.float16, ""),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16, ""),
        (torch.bfloat16, torch.float16, None, "autocast"),
        (torch.float64, torch.bfloat16, None, "bfloat16 or float16"),
    ],
)
def test_compute_dtype_under_cuda_autocast(monkeypatch, dtype, autocast, want, reason):
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device="cuda": device == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device: autocast)
    got, why = tk_trimul.compute_dtype(torch.empty(1, dtype=dtype))
    assert got == want
    assert (why == "") if not reason else (reason in why), why


# ------------------------------------------------------------ dispatch


@pytest.fixture
def module():
    return build(genie_tk.TriangleMultiplicationOutgoing, 64, 64, 0, seed=0, dtype=torch.bfloat16)


def test_forced_tk_on_cpu_raises_with_reason(module):
    module.backend = "tk"
    with pytest.raises(RuntimeError, match=r"^genie_tk: backend='tk' cannot run triangle_multiplicative_update: .+"):
        module(torch.randn(1, 5, 5, 64, dtype=torch.bfloat16))


def test_forced_tk_names_the_ineligibility(monkeypatch, module):
    """With a usable tk backend, the op's own check decides (devices first)."""
    monkeypatch.setattr(_backend, "_tk_unavailable_reason", lambda: "")
    monkeypatch.setitem(_backend.TK_KERNELS, OP, _backend.Kernel(tk_trimul.check, tk_trimul.run, True))
    module.backend = "tk"
    with pytest.raises(RuntimeError, match="inputs are on cpu"):
        module(torch.randn(1, 5, 5, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("verified", [False, True])
def test_auto_falls_back_once_per_reason(monkeypatch, module, verified):
    monkeypatch.setattr(_backend, "HAS_EXTENSION", True)  # a CPU-only install does not warn at all
    monkeypatch.setattr(_backend, "_tk_unavailable_reason", lambda: "")
    monkeypatch.setattr(_backend, "_WARNED", set())
    monkeypatch.setitem(_backend.TK_KERNELS, OP, _backend.Kernel(tk_trimul.check, tk_trimul.run, verified))
    z = torch.randn(1, 5, 5, 64, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = module(z)
        second = module(z)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, genie_tk.BackendFallbackWarning)]
    print(fallbacks)
    assert len(fallbacks) == 1
    assert ("not been verified" if not verified else "inputs are on cpu") in fallbacks[0]
    assert genie_tk.last_backend(OP) == "torch"
    assert torch.equal(first, second)


# ------------------------------------------------------------ arithmetic of the glue


@pytest.mark.parametrize("cls", TRI_MUL, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("b", "n", "masked"), [(2, 9, True), (1, 1, False), (1, 17, True)])
def test_glue_matches_reference_fp64(cls, b, n, masked):
    m, z, mask, cot, ref_out, ref_dz, ref_dw = reference_case(cls, b, n, 64, 64, seed=n, masked=masked)
    weights = [w.detach() for w in weights_of(m)]
    out, x, stats = tk_trimul.forward(tk_trimul.Emulation, z, mask, *weights, m._outgoing, 1e-5)
    assert_close("out", out, ref_out, 1e-12)
    assert torch.all(x[..., n:] == 0), "x keeps its padding zero"
    assert stats.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    grads = tk_trimul.backward(tk_trimul.Emulation, cot, z, mask, *weights, x, stats, m._outgoing, 1e-5)
    assert_close("dz", grads[0], ref_dz, 1e-12)
    for k, (got, want) in enumerate(zip(grads[1:], ref_dw)):
        assert_close(f"weight {k}", got, want, 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_glue_in_half_precision(dtype):
    """The kernels' dtypes as ``run`` passes them (GEMM weights in the compute dtype,
    the rest fp32): the backward's half-precision GEMMs stay within rounding."""
    cls = genie_tk.FusedTriangleMultiplicationIncoming
    m, z, mask, cot, ref_out, ref_dz, ref_dw = reference_case(cls, 1, 9, 64, 64, seed=5)
    gemm = {2, 4, 8, 10}  # p_w, g_w, linear_z, linear_g
    weights = [w.detach().to(dtype if k in gemm else torch.float32) for k, w in enumerate(weights_of(m))]
    zh, mask32 = z.to(dtype), mask.float()
    out, x, stats = tk_trimul.forward(tk_trimul.Emulation, zh, mask32, *weights, False, 1e-5)
    assert out.dtype == dtype and bool(stats[0] != 1) == (dtype == torch.float16)
    assert_close("out", out, ref_out, 3e-2)
    grads = tk_trimul.backward(tk_trimul.Emulation, cot.to(dtype), zh, mask32, *weights, x, stats, False, 1e-5)
    assert grads[0].dtype == dtype
    assert_close("dz", grads[0], ref_dz, 3e-2)
    for k, (got, want) in enumerate(zip(grads[1:], ref_dw)):
        assert got.dtype == weights[k].dtype
        assert_close(f"weight {k}", got, want, 3e-2)


@pytest.mark.parametrize("cls", TRI_MUL[2:], ids=lambda c: c.__name__)
def test_float16_normalisation_and_its_gradient(monkeypatch, cls):
    """OpenFold's float16 branch (a / std(a), b / std(b)) in fp64: the contraction's
    scale and the backward's term through the two stds. A large LayerNorm eps makes
    LayerNorm_out far from scale invariant, so both are visible; the reference
    contracts in fp32 there, hence the tolerance."""
    monkeypatch.setattr(reference, "fp16_enabled", lambda z: True)
    m, z, mask, cot, ref_out, ref_dz, ref_dw = reference_case(cls, 2, 7, 64, 64, seed=3, eps=10.0)
    weights = [w.detach() for w in weights_of(m)]
    out, x, stats = tk_trimul.forward(tk_trimul.Emulation, z, mask, *weights, m._outgoing, 10.0, normalise=True)
    assert stats[0] != 1 and torch.all(stats[1:3] > 0)
    assert_close("out", out, ref_out, 1e-5)
    grads = tk_trimul.backward(tk_trimul.Emulation, cot, z, mask, *weights, x, stats, m._outgoing, 10.0)
    assert_close("dz", grads[0], ref_dz, 1e-5)
    for k, (got, want) in enumerate(zip(grads[1:], ref_dw)):
        assert_close(f"weight {k}", got, want, 1e-5)


def test_normalisation_matches_tensor_std():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 40, generator=g, dtype=torch.float64), 2 + 3 * torch.randn(3, 40, generator=g, dtype=torch.float64)
    moments = torch.stack([a.sum(), (a * a).sum(), b.sum(), (b * b).sum()])
    scale, std_a, std_b, mean_a, mean_b = tk_trimul.normalisation(moments, a.numel(), a.device).tolist()
    assert std_a == pytest.approx(a.std().item(), rel=1e-6)
    assert std_b == pytest.approx(b.std().item(), rel=1e-6)
    assert scale == pytest.approx(1 / (a.std() * b.std()).item(), rel=1e-6)
    assert (mean_a, mean_b) == pytest.approx((a.mean().item(), b.mean().item()), rel=1e-6)


def test_normalisation_skips_a_zero_std():
    """OpenFold normalises only when both stds are non-zero (e.g. a fully masked input)."""
    zero = torch.zeros(4, dtype=torch.float64)
    zero[2:] = torch.tensor([5.0, 7.0])
    assert tk_trimul.normalisation(zero, 10, zero.device)[:3].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("mode", ["ABt", "AtB", "AB"])
def test_emulated_contraction_keeps_padding_zero(mode):
    g = torch.Generator().manual_seed(1)
    n = 5
    a, b = (torch.zeros(1, 2, n, tk_trimul.padded(n), dtype=torch.float64) for _ in range(2))
    a[..., :n] = torch.randn(1, 2, n, n, generator=g, dtype=torch.float64)
    b[..., :n] = torch.randn(1, 2, n, n, generator=g, dtype=torch.float64)
    out = torch.full_like(a, float("nan"))
    tk_trimul.Emulation.trimul_contract(out, a, b, None, mode)
    want = {"ABt": a[..., :n] @ b[..., :n].mT, "AtB": a[..., :n].mT @ b[..., :n], "AB": a[..., :n] @ b[..., :n]}[mode]
    assert torch.allclose(out[..., :n], want) and torch.all(out[..., n:] == 0)


# ------------------------------------------------------------ custom ops (CPU emulation)


def op_inputs(dtype=torch.float64, n=5, b=1, requires_grad=True):
    m = build(genie_tk.TriangleMultiplicationIncoming, 64, 64, 0, seed=3)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(b, n, n, 64, generator=g, dtype=dtype).requires_grad_(requires_grad)
    mask = pair_mask(b, n, 1, 0.2, 5)
    weights = [w.detach().to(dtype).clone().requires_grad_(requires_grad) for w in weights_of(m)]
    return z, mask, weights


@needs_ops
@pytest.mark.parametrize("masked", [True, False])
def test_forward_op_passes_opcheck(masked):
    z, mask, weights = op_inputs()
    torch.library.opcheck(torch.ops.genie_tk.trimul_fwd.default, (z, mask if masked else None, *weights, False, 1e-5))


@needs_ops
def test_backward_op_passes_opcheck():
    z, mask, weights = op_inputs()
    out, x, stats = torch.ops.genie_tk.trimul_fwd(z, mask, *weights, True, 1e-5)
    args = (torch.randn_like(out), z.detach(), mask, *[w.detach() for w in weights], x.detach(), stats.detach(),
            True, 1e-5)
    torch.library.opcheck(torch.ops.genie_tk.trimul_bwd.default, args)


@needs_ops
def test_fake_tensors_give_the_kernel_shapes():
    """c_z = 128, c_hidden = 64, N = 17: x is channel-first with its rows padded to 64."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    c, h, bf16 = 128, 64, torch.bfloat16
    shapes = [((c,), None), ((c,), None), ((2 * h, c), bf16), ((2 * h,), None), ((2 * h, c), bf16),
              ((2 * h,), None), ((h,), None), ((h,), None), ((c, h), bf16), ((c,), None), ((c, c), bf16),
              ((c,), None)]
    with FakeTensorMode():
        z = torch.empty(2, 17, 17, c, dtype=bf16, device="cuda")
        weights = [torch.empty(s, dtype=d or torch.float32, device="cuda") for s, d in shapes]
        out, x, stats = torch.ops.genie_tk.trimul_fwd(z, None, *weights, True, 1e-5)
    assert out.shape == z.shape and out.dtype == bf16 and out.device.type == "cuda"
    assert x.shape == (2, h, 17, 64) and stats.shape == (5,) and stats.dtype == torch.float32


@needs_ops
def test_compiled_op_matches_eager():
    z, mask, weights = op_inputs()

    def f(z, *weights):
        return torch.ops.genie_tk.trimul_fwd(z, mask, *weights, False, 1e-5)[0]

    cot = torch.randn(z.shape, dtype=z.dtype)
    want_out = f(z, *weights)
    want = torch.autograd.grad(want_out, (z, *weights), cot)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got_out = compiled(z, *weights)
    got = torch.autograd.grad(got_out, (z, *weights), cot)
    assert torch.equal(got_out, want_out)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_ops
@pytest.mark.parametrize("kernel", ["trimul_contract", "trimul_input", "trimul_output"])
def test_bindings_reject_cpu_tensors_naming_the_argument(kernel):
    """The argument checks run before anything touches CUDA."""
    h, f = torch.zeros(1, 2, 5, 64, dtype=torch.bfloat16), torch.zeros(64)
    calls = {
        "trimul_contract": (lambda ext: ext.trimul_contract(h, h, h, None, "AB", 0), "a"),
        "trimul_input": (lambda ext: ext.trimul_input(h, None, h, None, f, f, h, f, h, f, 1e-5, 0), "z"),
        "trimul_output": (lambda ext: ext.trimul_output(h, h, h, f, f, f, f, h, f, h, f, 1e-5, 0), "z"),
    }
    call, name = calls[kernel]
    with pytest.raises(ValueError, match=rf"^{name} must be a CUDA tensor, got a tensor on cpu"):
        call(_backend._C)
