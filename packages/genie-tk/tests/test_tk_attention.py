"""The tk backend of triangle attention, without a GPU.

* eligibility reasons, registration, dispatch (fallback warning, forced tk raising);
* the PyTorch transcription of the kernels' arithmetic (``emulate_*``, the CPU
  implementation of the custom ops) against the fp64 reference and autograd;
* where ``genie_tk._C`` is built with the kernels: the custom ops on the CPU
  (opcheck, gradcheck, torch.compile, the layer glue) and the bindings'
  argument checks, which run before anything touches CUDA.

The kernels themselves are tested in ``test_tk_attention_cuda.py``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import genie_tk
from genie_tk import _backend, reference, tk_attention
from genie_tk.testing import build, forward_backward, pair_mask, rel

needs_ops = pytest.mark.skipif(
    not tk_attention.REGISTERED, reason="genie_tk._C is not built with the triangle attention kernels"
)


def _inputs(b, n, h, d, dtype=torch.float64, seed=0, n_pad=2, drop=0.2):
    """q, k, v ``[b, n, h, n, d]``, bias ``[b, h, n, n]``, mask ``[b, n, n]`` with
    padded (fully masked) rows and columns and random holes."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, n, d, generator=g, dtype=dtype) for _ in range(3))
    bias = torch.randn(b, h, n, n, generator=g, dtype=dtype)
    mask = pair_mask(b, n, min(n_pad, n - 1), drop, seed, dtype=dtype)
    return q, k, v, bias, mask


# ------------------------------------------------------------ eligibility


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_check_accepts_half_types_and_kernel_head_dims(dtype, head_dim):
    q = torch.empty(1, 2, 1, 2, head_dim, dtype=dtype)
    assert tk_attention.check(q, q, q, None, None, head_dim=head_dim) == ""
    assert tk_attention.check_layer(torch.empty(1, 2, 2, 4, dtype=dtype), None, head_dim=head_dim) == ""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_check_names_the_dtype(dtype):
    q = torch.empty(1, 2, 1, 2, 32, dtype=dtype)
    reason = tk_attention.check(q, q, q, None, None, head_dim=32)
    assert "bfloat16 or float16" in reason and str(dtype) in reason


@pytest.mark.parametrize("head_dim", [8, 24, 128])
def test_check_names_the_head_dim(head_dim):
    z = torch.empty(1, 2, 2, 4, dtype=torch.bfloat16)
    reason = tk_attention.check_layer(z, None, head_dim=head_dim)
    assert "head dims (16, 32, 64)" in reason and str(head_dim) in reason


@pytest.mark.parametrize(("n", "padded"), [(1, 64), (63, 64), (64, 64), (65, 128), (1000, 1024)])
def test_padded_keys(n, padded):
    assert tk_attention.padded_keys(n) == padded


def test_key_bias_is_base2_finite_and_zero_padded():
    mask = torch.tensor([[[1.0, 0.0, 1.0]]])
    kb = tk_attention.key_bias(mask, (1, 1, 3), 64, 1e9, torch.float32, "cpu")
    assert kb.shape == (1, 1, 64)
    assert kb[0, 0, 0] == 0 and kb[0, 0, 2] == 0
    assert kb[0, 0, 1] == torch.tensor(-1e9 * tk_attention.LOG2E, dtype=torch.float32)
    assert torch.isfinite(kb).all() and (kb[..., 3:] == 0).all()
    assert (tk_attention.key_bias(None, (2, 3, 5), 64, 1e9, torch.float32, "cpu") == 0).all()


# ------------------------------------------------------------ registration and dispatch


def test_registration_follows_the_extension():
    has_kernels = _backend.HAS_EXTENSION and hasattr(_backend._C, "triangle_attention_fwd")
    assert tk_attention.REGISTERED == has_kernels
    for op, check in (("triangle_attention", tk_attention.check),
                      ("triangle_attention_layer", tk_attention.check_layer)):
        if has_kernels:
            kernel = _backend.TK_KERNELS[op]
            assert kernel.check is check and kernel.verified is False
        else:
            assert op not in _backend.TK_KERNELS


def test_extension_without_the_kernels_is_ignored(monkeypatch):
    monkeypatch.setattr(_backend, "HAS_EXTENSION", True)
    monkeypatch.setattr(_backend, "_C", object())  # an older build: no triangle attention symbols
    assert tk_attention._extension() is None
    monkeypatch.setattr(_backend, "HAS_EXTENSION", False)
    monkeypatch.setattr(_backend, "_C", None)
    assert tk_attention._extension() is None


def test_forced_tk_on_cpu_raises_with_the_reason():
    q, k, v, bias, mask = _inputs(1, 5, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"backend='tk' cannot run triangle_attention: .+"):
        genie_tk.triangle_attention(q, k, v, bias, mask, backend="tk")
    module = build(genie_tk.TriangleAttentionEndingNode, 8, 16, 2, seed=0, dtype=torch.bfloat16, backend="tk")
    with pytest.raises(RuntimeError, match=r"backend='tk' cannot run triangle_attention_layer: .+"):
        module(torch.randn(1, 5, 5, 8, dtype=torch.bfloat16))


def test_auto_falls_back_with_one_warning_naming_the_reason(monkeypatch):
    """With the kernels available and verified, CPU inputs still go to torch, with one warning."""
    monkeypatch.setattr(_backend, "_WARNED", set())
    monkeypatch.setattr(_backend, "HAS_EXTENSION", True)
    monkeypatch.setattr(_backend, "_tk_unavailable_reason", lambda: "")
    verified = _backend.Kernel(tk_attention.check, tk_attention.run, verified=True)
    monkeypatch.setitem(_backend.TK_KERNELS, "triangle_attention", verified)
    q, k, v, bias, mask = _inputs(1, 5, 2, 16, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            genie_tk.triangle_attention(q, k, v, bias, mask)
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, genie_tk.BackendFallbackWarning)]
    assert len(fallbacks) == 1
    assert fallbacks[0].startswith("genie_tk.triangle_attention: using the torch backend because tk: inputs are on cpu, "
                                   "the tk kernels need CUDA tensors; triton: ")
    assert genie_tk.last_backend("triangle_attention") == "torch"


# ------------------------------------------------------------ the kernels' arithmetic


# float64 resolves the triangle bias even at the -1e9 of a fully masked row, so
# exactness in float64 is checked on masks with holes only (n_pad=0); fully masked
# rows are checked in float32, where they are uniform.


@pytest.mark.parametrize(("b", "n", "h", "d"), [(1, 1, 1, 16), (2, 7, 3, 16), (1, 17, 2, 32)])
def test_emulated_forward_is_the_reference_in_float64(b, n, h, d):
    q, k, v, bias, mask = _inputs(b, n, h, d, n_pad=0)
    scale = 1 / math.sqrt(d)
    o, stats = tk_attention.emulate_forward(q, k, v, bias, mask, scale, 1e9)
    expected = reference.triangle_attention(q, k, v, bias, mask)
    print(f"max abs err {(o - expected).abs().max().item():.2e}")
    assert rel(o, expected) < 1e-12
    assert stats.shape == (b, n, h, n, 2) and stats.dtype == torch.float64


def test_stats_keep_fully_masked_rows_uniform():
    n = 9
    q, k, v, bias, _ = _inputs(1, n, 2, 16, dtype=torch.float32)
    mask = torch.ones(1, n, n)
    mask[:, 3] = 0  # row i = 3 masks every key
    o, stats = tk_attention.emulate_forward(q, k, v, bias, mask, 0.25, 1e9)
    assert torch.equal(stats[0, 3, :, :, 1], torch.full((2, n), math.log2(n)))
    assert (stats[0, 3, :, :, 0] < -1e9).all()
    torch.testing.assert_close(o[0, 3], v[0, 3].mean(-2, keepdim=True).expand(2, n, 16))


@pytest.mark.parametrize(("b", "n", "h", "d"), [(1, 1, 1, 16), (2, 6, 2, 16), (1, 11, 3, 32)])
def test_emulated_backward_is_the_gradient_of_the_reference(b, n, h, d):
    q, k, v, bias, mask = _inputs(b, n, h, d, seed=1, n_pad=0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    out = reference.triangle_attention(*leaves, mask)
    dout = torch.randn_like(out)
    expected = torch.autograd.grad(out, leaves, dout)
    scale = 1 / math.sqrt(d)
    o, stats = tk_attention.emulate_forward(q, k, v, bias, mask, scale, 1e9)
    grads = tk_attention.emulate_backward(dout, q, k, v, bias, mask, o, stats, scale, 1e9)
    for name, got, want in zip(("dq", "dk", "dv", "dbias"), grads, expected):
        print(f"{name}: rel {rel(got, want):.2e}")
        assert rel(got, want) < 1e-10, name


def test_emulated_bfloat16_is_as_accurate_as_pytorch():
    """The kernels' rounding points (bf16 P and dS operands, fp32 statistics) cost
    no more accuracy than the torch backend's: the bar the GPU tests set."""
    q, k, v, bias, mask = _inputs(1, 24, 2, 32, seed=2)
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    out = reference.triangle_attention(*leaves, mask)
    want = (out, *torch.autograd.grad(out, leaves, dout))
    low = [t.to(torch.bfloat16) for t in (q, k, v, bias)]
    o, stats = tk_attention.emulate_forward(*low, mask, 1 / math.sqrt(32), 1e9)
    emulated = (o, *tk_attention.emulate_backward(dout.bfloat16(), *low, mask, o, stats, 1 / math.sqrt(32), 1e9))
    torch_leaves = [t.clone().requires_grad_(True) for t in low]
    o_t = genie_tk.triangle_attention(*torch_leaves, mask, backend="torch")
    pytorch = (o_t, *torch.autograd.grad(o_t, torch_leaves, dout.bfloat16()))
    for name, e, p, w in zip(("o", "dq", "dk", "dv", "dbias"), emulated, pytorch, want):
        print(f"{name}: emulated {rel(e, w):.2e}, torch bf16 {rel(p, w):.2e}")
        assert rel(e, w) <= 2 * rel(p, w) + 1e-5, name


# ------------------------------------------------------------ custom ops (CPU emulation)


def _op_inputs(b=1, n=6, h=2, d=16, dtype=torch.float64, seed=3):
    q, k, v, bias, mask = _inputs(b, n, h, d, dtype=dtype, seed=seed, n_pad=0)
    return [t.requires_grad_(True) for t in (q, k, v, bias)] + [mask.bool()]


@needs_ops
def test_forward_op_passes_opcheck():
    q, k, v, bias, mask = _op_inputs()
    torch.library.opcheck(torch.ops.genie_tk.triangle_attention_fwd.default, (q, k, v, bias, mask, 0.25, 1e9))
    torch.library.opcheck(torch.ops.genie_tk.triangle_attention_fwd.default, (q, k, v, bias, None, 0.25, 1e9))


@needs_ops
def test_backward_op_passes_opcheck():
    q, k, v, bias, mask = (t.detach() if t.is_floating_point() else t for t in _op_inputs())
    o, stats = torch.ops.genie_tk.triangle_attention_fwd(q, k, v, bias, mask, 0.25, 1e9)
    args = (torch.randn_like(o), q, k, v, bias, mask, o, stats, 0.25, 1e9)
    torch.library.opcheck(torch.ops.genie_tk.triangle_attention_bwd.default, args)


@needs_ops
def test_forward_op_gradcheck():
    q, k, v, bias, mask = _op_inputs(n=5, h=1)

    def f(q, k, v, bias):
        return torch.ops.genie_tk.triangle_attention_fwd(q, k, v, bias, mask, 0.25, 1e9)[0]

    assert torch.autograd.gradcheck(f, (q, k, v, bias), fast_mode=True)


@needs_ops
def test_fake_op_gives_shapes_on_meta():
    q = torch.empty(2, 3, 4, 5, 16, device="meta", dtype=torch.bfloat16)
    bias = torch.empty(2, 4, 5, 5, device="meta", dtype=torch.bfloat16)
    o, stats = torch.ops.genie_tk.triangle_attention_fwd(q, q, q, bias, None, 0.25, 1e9)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert stats.shape == (2, 3, 4, 5, 2) and stats.dtype == torch.float32
    grads = torch.ops.genie_tk.triangle_attention_bwd(q, q, q, q, bias, None, o, stats, 0.25, 1e9)
    assert [g.shape for g in grads] == [q.shape, q.shape, q.shape, bias.shape]


@needs_ops
def test_compiled_op_matches_eager():
    q, k, v, bias, mask = _op_inputs(n=7, seed=4)

    def f(q, k, v, bias):
        return tk_attention.run(q, k, v, bias, mask, None, 1e9).square().sum()

    eager = torch.autograd.grad(f(q, k, v, bias), (q, k, v, bias))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo's own, not ours
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(q, k, v, bias), (q, k, v, bias))
    for e, g in zip(eager, got):
        torch.testing.assert_close(g, e)


@needs_ops
@pytest.mark.parametrize("cls", [genie_tk.TriangleAttentionStartingNode, genie_tk.TriangleAttentionEndingNode])
def test_layer_glue_matches_the_reference(cls):
    """run_layer (projections in PyTorch around the core op, here its CPU
    emulation) computes OpenFold's TriangleAttention, values and gradients."""
    module = build(cls, 8, 16, 2, seed=5)
    z = torch.randn(2, 6, 6, 8, dtype=torch.float64)
    mask = pair_mask(2, 6, 0, 0.2, 5)
    cotangent = torch.randn_like(z)
    want = forward_backward(module, z, mask, cotangent)
    kernel = _backend.TK_KERNELS["triangle_attention_layer"]
    mha = module.mha

    class Glue(torch.nn.Module):
        def forward(self, x, mask=None):
            weights = (module.layer_norm.weight, module.layer_norm.bias, module.linear.weight,
                       mha.linear_q.weight, mha.linear_k.weight, mha.linear_v.weight, mha.linear_g.weight,
                       mha.linear_g.bias, mha.linear_o.weight, mha.linear_o.bias)
            return kernel.run(x, mask, weights, module.starting, module.inf, module.layer_norm.eps)

    glue = Glue()
    glue.m = module  # so forward_backward's zero_grad/named_parameters see the weights
    got = forward_backward(glue, z, mask, cotangent)
    assert rel(got[0], want[0]) < 1e-12
    assert rel(got[1], want[1]) < 1e-10
    for name, g in want[2].items():
        assert rel(got[2]["m." + name], g) < 1e-10, name


# ------------------------------------------------------------ bindings


@needs_ops
def test_bindings_name_the_bad_argument_before_touching_cuda():
    ext = _backend._C
    q = torch.empty(1, 2, 1, 3, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^q must be a CUDA tensor, got a tensor on cpu"):
        ext.triangle_attention_fwd(q, q, q, q, q, q, q, 0.25, 0)
    with pytest.raises(ValueError, match=r"^dout must be a CUDA tensor"):
        ext.triangle_attention_bwd_delta(q, q, q, 0)
    with pytest.raises(TypeError):
        ext.triangle_attention_fwd([1.0], q, q, q, q, q, q, 0.25, 0)


@needs_ops
@pytest.mark.parametrize(("b", "rows", "h", "n", "sms"), [(1, 17, 4, 17, 132), (1, 256, 4, 256, 132),
                                                        (1, 1024, 4, 1024, 132), (3, 1, 8, 1, 16)])
def test_dbias_splits_leave_no_split_empty(b, rows, h, n, sms):
    splits = _backend._C.triangle_attention_dbias_splits(b, rows, h, n, sms)
    assert 1 <= splits <= min(rows, 16)
    per_split = -(-rows // splits)
    assert -(-rows // per_split) == splits
    with pytest.raises(ValueError):
        _backend._C.triangle_attention_dbias_splits(b, 0, h, n, sms)
