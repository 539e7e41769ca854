"""The torch backend equals the reference on random inputs (no external data needed)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import genie_tk
from genie_tk import reference
from genie_tk.testing import (
    TRI_ATT,
    TRI_MUL,
    build,
    force_efficient,
    forward_backward,
    pair_mask,
    rel,
)


@pytest.fixture(autouse=True)
def _efficient_path(monkeypatch):
    """The torch backend's chunked path at every size here: its plain path is the reference."""
    force_efficient(monkeypatch)


def _compare(cls, b, n, c, hidden, heads, n_pad, drop, seed, tol=1e-12):
    ref = build(cls, c, hidden, heads, seed, backend="reference")
    tor = build(cls, c, hidden, heads, seed, backend="torch")
    g = torch.Generator().manual_seed(seed + 2)
    z = torch.randn(b, n, n, c, generator=g, dtype=torch.float64)
    cot = torch.randn(b, n, n, c, generator=g, dtype=torch.float64)
    mask = pair_mask(b, n, n_pad, drop, seed + 3)
    o_r, gz_r, gp_r = forward_backward(ref, z, mask, cot)
    o_t, gz_t, gp_t = forward_backward(tor, z, mask, cot)
    errors = {"out": rel(o_t, o_r), "grad_z": rel(gz_t, gz_r)}
    # A gradient that is zero by symmetry (LayerNorm over one or two hidden channels has a
    # constant output) holds only rounding noise, which two exact computations need not share.
    largest = max(g.norm().item() for g in gp_r.values())
    errors.update({k: rel(gp_t[k], gp_r[k]) for k in gp_r if gp_r[k].norm().item() > 1e-10 * largest})
    print(cls.__name__, {k: f"{v:.1e}" for k, v in errors.items()})
    assert torch.isfinite(o_t).all()
    assert max(errors.values()) <= tol, errors


@pytest.mark.parametrize("cls", TRI_MUL + TRI_ATT, ids=lambda c: c.__name__)
@pytest.mark.parametrize("n", [1, 17, 33])
def test_torch_equals_reference(cls, n):
    _compare(cls, b=2, n=n, c=12, hidden=5, heads=3, n_pad=min(3, n - 1), drop=0.1, seed=n)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 64),
    b=st.integers(1, 2),
    c=st.integers(3, 20),  # LayerNorm over 1 or 2 channels has a zero input gradient: noise only
    heads=st.integers(1, 4),
    hidden=st.integers(1, 9),
    pad=st.integers(0, 4),
    drop=st.sampled_from([0.0, 0.2, 1.0]),
    cls=st.sampled_from(TRI_MUL + TRI_ATT),
    seed=st.integers(0, 2**16),
)
def test_torch_equals_reference_hypothesis(n, b, c, heads, hidden, pad, drop, cls, seed):
    _compare(cls, b, n, c, hidden, heads, min(pad, n), drop, seed)


def _attention_inputs(b, n, h, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, n, d, generator=g, dtype=dtype) for _ in range(3))
    bias = torch.randn(b, h, n, n, generator=g, dtype=dtype)
    mask = pair_mask(b, n, 2, 0.2, seed + 1, dtype=dtype)
    return q, k, v, bias, mask


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_core_torch_equals_reference(chunk_size):
    q, k, v, bias, mask = _attention_inputs(2, 11, 3, 4, seed=5)
    args = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    out_r = reference.triangle_attention(*args, mask)
    grads_r = torch.autograd.grad(out_r.square().sum(), args)
    out_t = genie_tk.triangle_attention(*args, mask, backend="torch", chunk_size=chunk_size)
    grads_t = torch.autograd.grad(out_t.square().sum(), args)
    assert rel(out_t, out_r) <= 1e-13
    for gt, gr in zip(grads_t, grads_r):
        assert rel(gt, gr) <= 1e-13


def test_core_scale_argument():
    q, k, v, bias, mask = _attention_inputs(1, 6, 2, 4, seed=8)
    for backend in ("reference", "torch"):
        half = genie_tk.triangle_attention(q, k, v, bias, mask, scale=0.25, backend=backend)
        default = genie_tk.triangle_attention(q / 2, k, v, bias, mask, backend=backend)
        assert rel(half, default) <= 1e-14


def test_core_gradcheck():
    # No fully masked rows here: their logits sit on float64's 1e9-scale grid,
    # too coarse for finite differences (their exactness is tested against OpenFold).
    q, k, v, bias, _ = _attention_inputs(1, 5, 2, 3, seed=9)
    mask = pair_mask(1, 5, 0, 0.2, seed=10)
    args = tuple(t.requires_grad_(True) for t in (q, k, v, bias))
    assert torch.autograd.gradcheck(
        lambda *a: genie_tk.triangle_attention(*a, mask, backend="torch", chunk_size=2), args
    )


@pytest.mark.parametrize("cls", TRI_MUL + TRI_ATT, ids=lambda c: c.__name__)
def test_module_gradcheck(cls):
    m = build(cls, 4, 3, 2, seed=3, backend="torch")
    z = torch.randn(1, 5, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = pair_mask(1, 5, 0, 0.2, seed=4)
    names = [n for n, _ in m.named_parameters()]

    def f(z, *params):
        return torch.func.functional_call(m, dict(zip(names, params)), (z,), {"mask": mask})

    params = [p.detach().clone().requires_grad_(True) for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (z, *params))


def _swap_ab(state):
    swapped = dict(state)
    for kind in ("p", "g"):
        swapped[f"linear_a_{kind}.weight"], swapped[f"linear_b_{kind}.weight"] = (
            state[f"linear_b_{kind}.weight"], state[f"linear_a_{kind}.weight"])
        swapped[f"linear_a_{kind}.bias"], swapped[f"linear_b_{kind}.bias"] = (
            state[f"linear_b_{kind}.bias"], state[f"linear_a_{kind}.bias"])
    return swapped


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_incoming_is_transposed_outgoing_with_swapped_projections(backend):
    out_m = build(genie_tk.TriangleMultiplicationOutgoing, 6, 4, 0, seed=1, backend=backend)
    in_m = genie_tk.TriangleMultiplicationIncoming(6, 4).double()
    in_m.load_state_dict(_swap_ab(out_m.state_dict()))
    in_m.backend = backend
    z = torch.randn(2, 9, 9, 6, dtype=torch.float64)
    mask = pair_mask(2, 9, 2, 0.2, seed=2)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    expected = t(out_m(t(z), mask=t(mask)))
    assert rel(in_m(z, mask=mask), expected) <= 1e-14
    # Without the swap the identity does not hold: incoming is not a transpose.
    in_m.load_state_dict(out_m.state_dict())
    assert rel(in_m(z, mask=mask), expected) > 1e-3


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ending_is_transposed_starting(backend):
    start = build(genie_tk.TriangleAttentionStartingNode, 6, 4, 2, seed=1, backend=backend)
    end = genie_tk.TriangleAttentionEndingNode(6, 4, 2).double()
    end.load_state_dict(start.state_dict())
    end.backend = backend
    z = torch.randn(2, 9, 9, 6, dtype=torch.float64)
    mask = pair_mask(2, 9, 2, 0.2, seed=2)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    assert rel(end(z, mask=mask), t(start(t(z), mask=t(mask)))) <= 1e-14
    assert genie_tk.TriangleAttention(6, 4, 2, starting=False).starting is False


@pytest.mark.parametrize("cls", TRI_ATT, ids=lambda c: c.__name__)
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_attention_chunked_equals_unchunked(cls, chunk_size):
    m = build(cls, 8, 4, 2, seed=6, backend="torch")
    z = torch.randn(1, 13, 13, 8, dtype=torch.float64, requires_grad=True)
    mask = pair_mask(1, 13, 2, 0.1, seed=7)
    full = m(z, mask=mask)
    (gz_full,) = torch.autograd.grad(full.sum(), z)
    chunked = m(z, mask=mask, chunk_size=chunk_size)
    (gz_chunk,) = torch.autograd.grad(chunked.sum(), z)
    assert rel(chunked, full) <= 1e-14 and rel(gz_chunk, gz_full) <= 1e-14


@pytest.mark.parametrize("cls", TRI_MUL, ids=lambda c: c.__name__)
def test_trimul_inplace_chunked_equals_default(cls):
    m = build(cls, 8, 5, 0, seed=6, backend="torch")
    z = torch.randn(2, 13, 13, 8, dtype=torch.float64)
    mask = pair_mask(2, 13, 2, 0.1, seed=7)
    expected = m(z, mask=mask)
    with torch.no_grad():
        chunked = m(z.clone(), mask=mask, inplace_safe=True, _inplace_chunk_size=4)
        added = m(z.clone(), mask=mask, inplace_safe=True, _add_with_inplace=True, _inplace_chunk_size=5)
    assert rel(chunked, expected) <= 1e-14
    assert rel(added, z + expected) <= 1e-14


@pytest.mark.parametrize("cls", TRI_MUL + TRI_ATT, ids=lambda c: c.__name__)
def test_fully_masked_pairs_are_finite_and_match_reference(cls):
    ref = build(cls, 6, 4, 2, seed=11, backend="reference")
    tor = build(cls, 6, 4, 2, seed=11, backend="torch")
    z = torch.randn(1, 7, 7, 6, dtype=torch.float64)
    zeros = torch.zeros(1, 7, 7, dtype=torch.float64)
    out = tor(z, mask=zeros)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    assert rel(out, ref(z, mask=zeros)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", TRI_MUL + TRI_ATT, ids=lambda c: c.__name__)
def test_low_precision_error_within_twice_pytorch(cls, dtype):
    """The flash-attention rule: torch-backend error <= 2x the reference's own error
    in the same precision, measured against the float64 reference."""
    exact = build(cls, 16, 8, 2, seed=12, backend="reference")
    z = torch.randn(1, 24, 24, 16, dtype=torch.float64)
    mask = pair_mask(1, 24, 3, 0.1, seed=13)
    cot = torch.randn_like(z)
    o64, g64, _ = forward_backward(exact, z, mask, cot)
    errs = {}
    for backend in ("reference", "torch"):
        m = build(cls, 16, 8, 2, seed=12, dtype=dtype, backend=backend)
        o, gz, _ = forward_backward(m, z.to(dtype), mask.to(dtype), cot.to(dtype))
        errs[backend] = (rel(o, o64), rel(gz, g64))
    print(cls.__name__, dtype, errs)
    for i in range(2):
        assert errs["torch"][i] <= 2 * errs["reference"][i] + 1e-6


@pytest.mark.parametrize("inf", [float("inf"), float("-inf"), float("nan"), 0.0, -1e9, 1e39, 3e38],
                         ids=lambda v: repr(v))
def test_attention_rejects_a_non_finite_or_overflowing_inf(inf):
    """An ``inf`` that is not finite, not positive, or overflows float32 once scaled by
    log2(e) would make fully masked rows NaN (or invert the mask): it raises, naming it."""
    q = torch.randn(1, 3, 2, 5, 4)
    bias = torch.randn(1, 2, 5, 5)
    mask = pair_mask(1, 5, 1, 0.0, 0)[:, :3]
    with pytest.raises(ValueError, match=r"^inf must be a positive finite number at most 2\.36e\+38"):
        genie_tk.triangle_attention(q, q, q, bias, mask, inf=inf)
    module = build(genie_tk.TriangleAttentionStartingNode, 8, 4, 2, seed=0)
    module.inf = inf
    with pytest.raises(ValueError, match=r"^inf must be"):
        module(torch.randn(1, 5, 5, 8, dtype=torch.float64), mask=pair_mask(1, 5, 1, 0.0, 0))
    with pytest.raises(TypeError, match=r"^inf must be a real number"):
        genie_tk.triangle_attention(q, q, q, bias, mask, inf="1e9")


def test_attention_accepts_the_largest_inf():
    """``MAX_INF`` still gives OpenFold's uniform softmax on a fully masked row."""
    from genie_tk.ops import MAX_INF

    q = torch.randn(1, 3, 2, 5, 4)
    v = torch.randn(1, 3, 2, 5, 4)
    bias = torch.randn(1, 2, 5, 5)
    mask = torch.ones(1, 3, 5)
    mask[0, 1] = 0  # row i = 1 fully masked
    out = genie_tk.triangle_attention(q, q, v, bias, mask, inf=MAX_INF, backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 1], v[0, 1].mean(-2, keepdim=True).expand_as(out[0, 1]))
