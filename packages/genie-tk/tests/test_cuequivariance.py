"""genie_tk.cuequivariance against cuEquivariance 0.13's documented semantics.

The real package does not import on a CPU machine (``libcue_ops.so`` links
``libcuda.so.1``), so the oracles here are written from its documentation and its
PyTorch path: additive mask bias ``-1e9 · (1 - mask)`` before the triangle bias,
``scale`` on ``q``, rows of ``kv_lengths`` 0 zeroed; the tri-mul formula of its
docstring with the mask on ``a`` and ``b``. The callers' side (Boltz and OpenFold3
calling these functions) is tested in test_boltz.py / test_openfold3.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from genie_tk import cuequivariance as cueq
from genie_tk.testing import pair_mask, rel

BACKENDS = ("torch", "reference")


def attention_oracle(q, k, v, bias, mask, scale, additive=True):
    """cuEquivariance's attention: ``additive`` as its PyTorch path, else its docs' formula
    (masked logits replaced by -1e9)."""
    s = (q * scale) @ k.transpose(-1, -2)
    if mask is None:
        return torch.softmax(s + bias, -1) @ v
    if additive:
        s = s + (-1e9) * (~mask).to(s.dtype)
        return torch.softmax(s + bias, -1) @ v
    return torch.softmax((s + bias).masked_fill(~mask, -1e9), -1) @ v


def attention_inputs(b, n, h, d, seed, n_pad=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, n, d, generator=g, dtype=dtype) for _ in range(3))
    bias = torch.randn(b, 1, h, n, n, generator=g, dtype=dtype)
    mask = pair_mask(b, n, n_pad, 0.2, seed).bool()[:, :, None, None, :]  # padded rows are fully masked
    return q, k, v, bias, mask


def grads(fn, tensors, cotangent):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    (out * cotangent).sum().backward()
    return out.detach(), [t.grad for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_triangle_attention_matches_documented_semantics(backend, scale):
    b, n, h, d = 2, 11, 3, 4
    q, k, v, bias, mask = attention_inputs(b, n, h, d, seed=1)
    s = 1 / math.sqrt(d) if scale is None else scale
    cot = torch.randn(b, n, h, n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours, g_ours = grads(lambda *t: cueq.triangle_attention(*t, mask=mask, scale=scale, backend=backend),
                         (q, k, v, bias), cot)
    ref, g_ref = grads(lambda *t: attention_oracle(*t, mask, s), (q, k, v, bias), cot)
    errors = [rel(ours, ref)] + [rel(a, r) for a, r in zip(g_ours, g_ref)]
    print(f"cueq triangle_attention {backend} scale={scale}: rel err out/dq/dk/dv/dbias", errors)
    assert max(errors) < 1e-12
    # Rows with a valid key also match the docs' formula (masked logits := -1e9) exactly.
    valid = mask.any(-1, keepdim=True).expand_as(ours)
    docs = attention_oracle(q, k, v, bias, mask, s, additive=False)
    assert (ours - docs)[valid].abs().max() < 1e-12
    assert not valid.all()  # the padded rows were exercised


def test_triangle_attention_four_dim_inputs_give_five_dim_output():
    q, k, v, bias, mask = attention_inputs(1, 7, 2, 4, seed=3)
    out5 = cueq.triangle_attention(q, k, v, bias, mask)
    out4 = cueq.triangle_attention(q[0], k[0], v[0], bias[0], mask[0])
    assert out4.shape == (1, 7, 2, 7, 4)  # as cuEquivariance returns
    assert torch.equal(out4, out5)


def test_triangle_attention_without_mask_and_float_mask():
    q, k, v, bias, mask = attention_inputs(2, 6, 2, 4, seed=4)
    assert rel(cueq.triangle_attention(q, k, v, bias), attention_oracle(q, k, v, bias, None, 0.5)) < 1e-12
    as_float = cueq.triangle_attention(q, k, v, bias, mask.double())  # cast to bool: nonzero keeps
    assert torch.equal(as_float, cueq.triangle_attention(q, k, v, bias, mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_triangle_attention_kv_lengths(backend):
    b, n, h, d = 2, 9, 2, 4
    q, k, v, bias, _ = attention_inputs(b, n, h, d, seed=5)
    lengths = torch.tensor([[9, 4, 0, 12, 1, 7, 0, 3, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9]], dtype=torch.int32)
    lengths = lengths.reshape(b, n, 1, 1, 1)
    prefix = (torch.arange(n) < lengths)  # (B, N, 1, 1, K); 12 clamps to K
    cot = torch.randn(b, n, h, n, d, dtype=torch.float64)
    ours, g_ours = grads(lambda *t: cueq.triangle_attention(*t, kv_lengths=lengths, backend=backend),
                         (q, k, v, bias), cot)
    keep = (lengths > 0).to(torch.float64)
    ref, g_ref = grads(lambda *t: attention_oracle(*t, prefix, 0.5) * keep, (q, k, v, bias), cot)
    assert torch.all(ours[0, 2] == 0) and torch.all(ours[0, 6] == 0)  # zero-length rows: zeros
    assert max([rel(ours, ref)] + [rel(a, r) for a, r in zip(g_ours, g_ref)]) < 1e-12


def test_triangle_attention_refusals():
    q, k, v, bias, mask = attention_inputs(1, 5, 2, 4, seed=6)
    with pytest.raises(ValueError, match="return_aux"):
        cueq.triangle_attention(q, k, v, bias, mask, None, True)
    with pytest.raises(ValueError, match="either mask or kv_lengths"):
        cueq.triangle_attention(q, k, v, bias, mask, kv_lengths=torch.ones(1, 5, 1, 1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"bias must have shape \(B, 1, H, Q, K\)"):
        cueq.triangle_attention(q, k, v, bias[..., :4], mask)
    with pytest.raises(ValueError, match=r"mask must have shape \(B, N, 1, 1, K\)"):
        cueq.triangle_attention(q, k, v, bias, mask[..., :4])
    with pytest.raises(ValueError, match="kv_lengths must be an integer tensor"):
        cueq.triangle_attention(q, k, v, bias, kv_lengths=torch.ones(1, 5, 1, 1, 1))
    with pytest.raises(ValueError, match="q must be 5-D"):
        cueq.triangle_attention(q[0, 0], k, v, bias)


def trimul_oracle(x, direction, mask, w, eps=1e-5):
    """The docstring's formula, written out."""
    xn = F.layer_norm(x, x.shape[-1:], w["norm_in_weight"], w["norm_in_bias"], eps)
    ab = torch.sigmoid(F.linear(xn, w["g_in_weight"], w.get("g_in_bias"))) * F.linear(xn, w["p_in_weight"], w.get("p_in_bias"))
    if mask is not None:
        ab = ab * mask[..., None]
    a, b = ab.chunk(2, -1)
    u = torch.einsum("...ikc,...jkc->...ijc" if direction == "outgoing" else "...kic,...kjc->...ijc", a, b)
    u = F.layer_norm(u, u.shape[-1:], w["norm_out_weight"], w["norm_out_bias"], eps)
    return F.linear(u, w["p_out_weight"], w.get("p_out_bias")) * torch.sigmoid(F.linear(xn, w["g_out_weight"], w.get("g_out_bias")))


def trimul_weights(c, d, seed, biases, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, centre=0.0):
        return centre + 0.3 * torch.randn(*shape, generator=g, dtype=dtype)

    w = {"norm_in_weight": r(c, centre=1), "norm_in_bias": r(c), "p_in_weight": r(2 * d, c),
         "g_in_weight": r(2 * d, c), "norm_out_weight": r(d, centre=1), "norm_out_bias": r(d),
         "p_out_weight": r(c, d), "g_out_weight": r(c, c)}
    if biases:
        w |= {"p_in_bias": r(2 * d), "g_in_bias": r(2 * d), "p_out_bias": r(c), "g_out_bias": r(c)}
    return w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", ["outgoing", "incoming"])
@pytest.mark.parametrize("biases", [False, True], ids=["no-bias", "bias"])
def test_triangle_multiplicative_update_matches_documented_formula(backend, direction, biases):
    b, n, c, d = 2, 10, 8, 6
    w = trimul_weights(c, d, seed=7, biases=biases)
    x = torch.randn(b, n, n, c, dtype=torch.float64)
    mask = pair_mask(b, n, 2, 0.2, seed=8)
    cot = torch.randn(b, n, n, c, dtype=torch.float64)
    names = list(w)
    ours, g_ours = grads(lambda x, *ws: cueq.triangle_multiplicative_update(
        x, direction, mask, **dict(zip(names, ws)), backend=backend), (x, *w.values()), cot)
    ref, g_ref = grads(lambda x, *ws: trimul_oracle(x, direction, mask, dict(zip(names, ws))), (x, *w.values()), cot)
    errors = [rel(ours, ref)] + [rel(a, r) for a, r in zip(g_ours, g_ref)]
    print(f"cueq triangle_multiplicative_update {backend} {direction} biases={biases}: max rel err", max(errors))
    assert max(errors) < 1e-12


def test_triangle_multiplicative_update_defaults_and_shapes():
    n, c = 7, 8
    w = trimul_weights(c, c, seed=9, biases=False)
    x = torch.randn(n, n, c, dtype=torch.float64)
    mask = pair_mask(1, n, 1, 0.1, seed=10)
    plain = {k: v for k, v in w.items() if not k.startswith("norm")}
    ones = {"norm_in_weight": torch.ones(c, dtype=torch.float64), "norm_in_bias": torch.zeros(c, dtype=torch.float64),
            "norm_out_weight": torch.ones(c, dtype=torch.float64), "norm_out_bias": torch.zeros(c, dtype=torch.float64)}
    out = cueq.triangle_multiplicative_update(x, mask=mask, **plain)  # 3-D x, (1, N, N) mask; norms default
    assert out.shape == x.shape
    assert rel(out, trimul_oracle(x, "outgoing", mask[0], plain | ones)) < 1e-12
    bool_mask = cueq.triangle_multiplicative_update(x, mask=mask.bool(), **plain)
    assert torch.equal(bool_mask, out)


def test_triangle_multiplicative_update_precision():
    n, c = 6, 8
    w = trimul_weights(c, c, seed=11, biases=True, dtype=torch.float32)
    x, mask = torch.randn(1, n, n, c), pair_mask(1, n, 1, 0.1, seed=12, dtype=torch.float32)
    plain = cueq.triangle_multiplicative_update(x, "incoming", mask, **w)
    for p in (None, "default", "none", "IEEE", cueq.TriMulPrecision.TF32, 3):
        assert torch.equal(cueq.triangle_multiplicative_update(x, "incoming", mask, **w, precision=p), plain)
    bf = cueq.triangle_multiplicative_update(x, "incoming", mask, **w, precision="bfloat16")
    by_hand = cueq.triangle_multiplicative_update(x.bfloat16(), "incoming", mask.bfloat16(),
                                                  **{k: t.bfloat16() for k, t in w.items()})
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, by_hand)
    assert 1e-4 < rel(bf, plain) < 5e-2  # rounded, not ignored
    with pytest.raises(ValueError, match="mxfp8"):
        cueq.triangle_multiplicative_update(x, "incoming", mask, **w, precision="mxfp8")
    with pytest.raises(ValueError, match="precision="):
        cueq.triangle_multiplicative_update(x, "incoming", mask, **w, precision="fp4")


def test_triangle_multiplicative_update_refusals():
    w = trimul_weights(8, 8, seed=13, biases=False)
    x = torch.randn(1, 5, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="g_out_weight is required"):
        cueq.triangle_multiplicative_update(x, **{k: v for k, v in w.items() if k != "g_out_weight"})
    with pytest.raises(ValueError, match="direction"):
        cueq.triangle_multiplicative_update(x, "sideways", **w)
    with pytest.raises(ValueError, match=r"mask must have shape \(1, 5, 5\)"):
        cueq.triangle_multiplicative_update(x, mask=torch.ones(1, 5, 4), **w)
