"""OpenFold compatibility of the modules: names, keys, shapes, initialisation, keywords, bad input."""

from __future__ import annotations

import pytest
import torch

import genie_tk
from genie_tk.testing import TRI_ATT, TRI_MUL, build, pair_mask, rel

TRI_MUL_KEYS = {
    "linear_g.weight": ("C", "C"), "linear_g.bias": ("C",),
    "linear_z.weight": ("C", "Ch"), "linear_z.bias": ("C",),
    "layer_norm_in.weight": ("C",), "layer_norm_in.bias": ("C",),
    "layer_norm_out.weight": ("Ch",), "layer_norm_out.bias": ("Ch",),
}
PLAIN = {f"linear_{ab}_{pg}.{wb}": (("Ch", "C") if wb == "weight" else ("Ch",))
         for ab in "ab" for pg in "pg" for wb in ("weight", "bias")}
FUSED = {f"linear_ab_{pg}.{wb}": (("2Ch", "C") if wb == "weight" else ("2Ch",))
         for pg in "pg" for wb in ("weight", "bias")}
ATT_KEYS = {
    "layer_norm.weight": ("C",), "layer_norm.bias": ("C",), "linear.weight": ("H", "C"),
    "mha.linear_q.weight": ("HCh", "C"), "mha.linear_k.weight": ("HCh", "C"),
    "mha.linear_v.weight": ("HCh", "C"), "mha.linear_o.weight": ("C", "HCh"),
    "mha.linear_o.bias": ("C",), "mha.linear_g.weight": ("HCh", "C"), "mha.linear_g.bias": ("HCh",),
}


@pytest.mark.parametrize("cls", TRI_MUL + TRI_ATT, ids=lambda c: c.__name__)
def test_state_dict_keys_and_shapes(cls):
    c, ch, h = 20, 7, 3  # h * ch != c, as in OpenFold's "oddhead" fixture
    sizes = {"C": c, "Ch": ch, "2Ch": 2 * ch, "H": h, "HCh": h * ch}
    if cls in TRI_ATT:
        expected, m = ATT_KEYS, cls(c, ch, h)
    else:
        expected = TRI_MUL_KEYS | (FUSED if "Fused" in cls.__name__ else PLAIN)
        m = cls(c, ch)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {k: tuple(sizes[s] for s in v) for k, v in expected.items()}


def test_openfold_initialisation():
    torch.manual_seed(0)
    m = genie_tk.TriangleMultiplicationOutgoing(64, 32)
    for name in ("linear_a_g", "linear_b_g", "linear_g"):  # gating: W = 0, b = 1
        lin = getattr(m, name)
        assert lin.weight.abs().sum() == 0 and torch.all(lin.bias == 1)
    assert m.linear_z.weight.abs().sum() == 0 and m.linear_z.bias.abs().sum() == 0  # final
    w = m.linear_a_p.weight  # LeCun truncated normal: std 1/sqrt(fan_in), cut at 2 std
    assert abs(w.std().item() - 64**-0.5) < 0.1 * 64**-0.5
    assert w.abs().max() <= 2 * 64**-0.5 / 0.8796 + 1e-6
    assert torch.all(m.linear_a_p.bias == 0)
    a = genie_tk.TriangleAttentionStartingNode(64, 16, 4)
    assert a.mha.linear_o.weight.abs().sum() == 0 and torch.all(a.mha.linear_g.bias == 1)
    assert a.linear.bias is None and a.mha.linear_q.bias is None
    bound = (6 / (64 + 64)) ** 0.5  # glorot uniform
    assert a.mha.linear_q.weight.abs().max() <= bound and a.mha.linear_q.weight.std() > 0.5 * bound / 3**0.5


def test_openfold_forward_keywords_accepted():
    m = build(genie_tk.TriangleAttentionEndingNode, 8, 4, 2, seed=1)
    z = torch.randn(1, 6, 6, 8, dtype=torch.float64)
    base = m(z)
    same = m(z, None, chunk_size=2, use_memory_efficient_kernel=False, use_deepspeed_evo_attention=False,
             use_lma=False, inplace_safe=True)
    assert rel(same, base) < 1e-14


@pytest.mark.parametrize("cls", TRI_MUL + TRI_ATT, ids=lambda c: c.__name__)
def test_leading_batch_dims_and_noncontiguous(cls):
    m = build(cls, 6, 4, 2, seed=2)
    z = torch.randn(2, 3, 7, 7, 6, dtype=torch.float64)
    mask = pair_mask(6, 7, 1, 0.1, seed=3).reshape(2, 3, 7, 7)
    out = m(z, mask=mask)
    flat = m(z.reshape(6, 7, 7, 6), mask=mask.reshape(6, 7, 7))
    assert out.shape == z.shape and rel(out.reshape(6, 7, 7, 6), flat) < 1e-14
    zt = z.transpose(-2, -3)  # a non-contiguous input gives the same as its contiguous copy
    assert rel(m(zt, mask=mask.transpose(-1, -2)), m(zt.contiguous(), mask=mask.transpose(-1, -2).contiguous())) < 1e-14
    bool_mask = m(z, mask=mask.bool())
    assert rel(bool_mask, out) < 1e-14


@pytest.mark.parametrize("cls", TRI_MUL + TRI_ATT, ids=lambda c: c.__name__)
def test_empty_batch_and_single_residue(cls):
    m = build(cls, 6, 4, 2, seed=4)
    empty = torch.randn(0, 5, 5, 6, dtype=torch.float64, requires_grad=True)
    out = m(empty)
    out.sum().backward()
    assert out.shape == (0, 5, 5, 6) and empty.grad.shape == empty.shape
    one = torch.randn(2, 1, 1, 6, dtype=torch.float64)
    ref = build(cls, 6, 4, 2, seed=4, backend="reference")
    assert rel(m(one), ref(one)) < 1e-14


@pytest.mark.parametrize("cls", TRI_MUL + TRI_ATT, ids=lambda c: c.__name__)
def test_bad_input_names_the_argument(cls):
    m = build(cls, 6, 4, 2, seed=5)
    z = torch.randn(1, 5, 5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"z must have shape \[\*, N, N, C\]"):
        m(torch.randn(5, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"z must have shape \[\*, N, N, C\]"):
        m(torch.randn(1, 5, 4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="z has 7 channels in its last axis, expected 6"):
        m(torch.randn(1, 5, 5, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"mask must have shape \(1, 5, 5\), got \(1, 5, 4\)"):
        m(z, mask=torch.ones(1, 5, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="mask must be a bool or floating tensor"):
        m(z, mask=torch.ones(1, 5, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="z must be a floating tensor"):
        m(torch.ones(1, 5, 5, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="mask is on meta but the input is on cpu"):
        m(z, mask=torch.ones(1, 5, 5, device="meta"))


@pytest.mark.parametrize("cls", TRI_MUL + TRI_ATT, ids=lambda c: c.__name__)
def test_input_dtype_must_match_the_parameters(cls):
    """A float64 input to a float32 module (and the reverse) names the input and both dtypes."""
    m = build(cls, 6, 4, 2, seed=5, dtype=torch.float32)
    z = torch.randn(1, 5, 5, 6, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"z is torch.float64 but the weights \(a module's parameters\) are "
                                        r"torch.float32: expected z in torch.float32 \(or float16/bfloat16\)"):
        m(z)
    with pytest.raises(TypeError, match=r"z is torch.float32 but .* are torch.float64: expected z in torch.float64;"):
        m.double()(z.float())
    m.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # half activations over float32 weights still run
        out = m(z.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_chunk_size_must_be_positive(chunk_size):
    z = torch.randn(1, 5, 5, 6, dtype=torch.float64)
    att = build(genie_tk.TriangleAttentionStartingNode, 6, 4, 2, seed=5)
    with pytest.raises(ValueError, match=f"chunk_size must be a positive int or None, got {chunk_size}"):
        att(z, chunk_size=chunk_size)
    q = torch.randn(1, 4, 2, 4, 8)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        genie_tk.triangle_attention(q, q, q, torch.zeros(1, 2, 4, 4), chunk_size=chunk_size)
    mul = build(genie_tk.TriangleMultiplicationOutgoing, 6, 4, 0, seed=5)
    with pytest.raises(ValueError, match=f"_inplace_chunk_size must be a positive int or None, got {chunk_size}"):
        mul(z, inplace_safe=True, _inplace_chunk_size=chunk_size)
    with pytest.raises(TypeError, match="chunk_size must be a positive int or None, got float"):
        att(z, chunk_size=2.0)
    assert rel(att(z, chunk_size=1), att(z)) < 1e-14  # the smallest valid chunk still runs


@pytest.mark.parametrize(("make", "pattern"), [
    (lambda: genie_tk.TriangleAttention(8, 0, 2), "TriangleAttention: c_hidden must be a positive integer, got 0"),
    (lambda: genie_tk.TriangleAttention(8, 4, 0), "TriangleAttention: no_heads must be"),
    (lambda: genie_tk.TriangleAttentionEndingNode(-8, 4, 2), "TriangleAttentionEndingNode: c_in must be"),
    (lambda: genie_tk.TriangleAttention(8, 4.0, 2), r"c_hidden must be a positive integer, got 4\.0"),
    (lambda: genie_tk.TriangleMultiplicationOutgoing(8, 0), "TriangleMultiplicationOutgoing: c_hidden must be"),
    (lambda: genie_tk.FusedTriangleMultiplicationIncoming(0, 4), "FusedTriangleMultiplicationIncoming: c_z must be"),
])
def test_constructor_sizes_must_be_positive_integers(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_core_bad_input():
    q = torch.randn(1, 4, 2, 4, 8)
    with pytest.raises(ValueError, match=r"q must have shape \[B, I, H, J, D\]"):
        genie_tk.triangle_attention(q[0], q[0], q[0], torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"bias must have shape \[B, H, J, K\] = \(1, 2, 4, 4\)"):
        genie_tk.triangle_attention(q, q, q, torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="k and v must have the shape of q"):
        genie_tk.triangle_attention(q, q[:, :3], q, torch.zeros(1, 2, 4, 4))
    with pytest.raises(TypeError, match="q, k and v must share a dtype"):
        genie_tk.triangle_attention(q, q.double(), q, torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="direction must be 'outgoing' or 'incoming'"):
        genie_tk.triangle_multiplicative_update(
            torch.zeros(1, 2, 2, 3), direction="sideways", **{k: None for k in (
                "norm_in_weight", "norm_in_bias", "p_in_weight", "p_in_bias", "g_in_weight", "g_in_bias",
                "norm_out_weight", "norm_out_bias", "p_out_weight", "p_out_bias", "g_out_weight", "g_out_bias")})


def test_float16_normalisation_keeps_trimul_finite():
    """OpenFold's fp16 branch divides a and b by their std: large inputs must not overflow."""
    m = build(genie_tk.TriangleMultiplicationOutgoing, 8, 8, 0, seed=6, backend="torch")
    with torch.no_grad():
        m.linear_a_p.weight.mul_(300)
        m.linear_b_p.weight.mul_(300)
    z = torch.randn(1, 64, 64, 8, dtype=torch.float64)
    expected = m(z)
    out = m.half()(z.half())
    assert torch.isfinite(out).all()
    assert rel(out, expected) < 2e-2


# Dynamo itself instantiates autograd.Function while tracing and warns about it.
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
@pytest.mark.parametrize("cls", [genie_tk.TriangleAttentionEndingNode, genie_tk.TriangleMultiplicationIncoming],
                         ids=lambda c: c.__name__)
def test_torch_compile_fullgraph(cls):
    """The torch backend (autograd.Function with chunk loops) traces in one graph."""
    m = build(cls, 8, 4, 2, seed=9, dtype=torch.float32, backend="torch")
    z = torch.randn(1, 9, 9, 8, requires_grad=True)
    mask = pair_mask(1, 9, 1, 0.2, seed=10, dtype=torch.float32)
    expected = m(z, mask=mask)
    (g_expected,) = torch.autograd.grad(expected.sum(), z)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(z, mask=mask)
    (g,) = torch.autograd.grad(out.sum(), z)
    assert rel(out, expected) < 1e-6 and rel(g, g_expected) < 1e-6
