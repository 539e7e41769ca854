"""The torch backend's per-call choice between the plain computation and the chunked one.

Small calls run the plain reference computation (as fast, no larger: see
``benchmarks/torch_vs_reference.py``), large ones the chunked, memory-efficient path; an
explicit ``chunk_size`` always takes the chunked path. Both paths give the reference's
numbers (float64).
"""

from __future__ import annotations

import pytest
import torch

import genie_tk
from genie_tk import reference, torch_backend
from genie_tk.testing import TRI_ATT, TRI_MUL, build, forward_backward, pair_mask, rel


def _core_inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, 2, n, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, n, n, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v, bias, pair_mask(1, n, 1, 0.2, seed + 1)


@pytest.mark.parametrize("limit, chunk_size, path", [(None, None, "plain"), (-1, None, "efficient"),
                                                     (None, 3, "efficient")])
def test_core_path_and_numbers(monkeypatch, limit, chunk_size, path):
    if limit is not None:
        monkeypatch.setitem(torch_backend.PLAIN_BYTES, "triangle_attention", limit)
    q, k, v, bias, mask = _core_inputs(9)
    out = genie_tk.triangle_attention(q, k, v, bias, mask, backend="torch", chunk_size=chunk_size)
    assert torch_backend.last_path("triangle_attention") == path
    expected = reference.triangle_attention(q, k, v, bias, mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, bias))
    grads_ref = torch.autograd.grad(expected.square().sum(), (q, k, v, bias))
    assert rel(out, expected) <= 1e-14
    assert max(rel(a, b) for a, b in zip(grads, grads_ref)) <= 1e-13


def test_threshold_is_the_logits_size(monkeypatch):
    n = 9
    logits = 1 * n * 2 * n * n * 8  # B·I·H·J·K float64 values
    q, k, v, bias, mask = _core_inputs(n)
    for limit, path in ((logits, "plain"), (logits - 1, "efficient")):
        monkeypatch.setitem(torch_backend.PLAIN_BYTES, "triangle_attention", limit)
        genie_tk.triangle_attention(q, k, v, bias, mask, backend="torch")
        assert torch_backend.last_path("triangle_attention") == path


@pytest.mark.parametrize("cls", TRI_ATT + TRI_MUL, ids=lambda c: c.__name__)
def test_module_paths_agree(monkeypatch, cls):
    z = torch.randn(2, 10, 10, 6, dtype=torch.float64)
    mask = pair_mask(2, 10, 2, 0.1, seed=3)
    cot = torch.randn_like(z)
    module = build(cls, 6, 4, 2, seed=4, backend="torch")
    op = "triangle_attention_layer" if cls in TRI_ATT else "triangle_multiplicative_update"
    plain = forward_backward(module, z, mask, cot)
    assert torch_backend.last_path(op) == "plain"
    monkeypatch.setattr(torch_backend, "PLAIN_BYTES", dict.fromkeys(torch_backend.PLAIN_BYTES, -1))
    efficient = forward_backward(module, z, mask, cot)
    assert torch_backend.last_path(op) == "efficient"
    assert rel(efficient[0], plain[0]) <= 1e-14 and rel(efficient[1], plain[1]) <= 1e-13
    assert max(rel(efficient[2][k], plain[2][k]) for k in plain[2]) <= 1e-12


def test_trimul_training_and_inference_thresholds_are_separate(monkeypatch):
    monkeypatch.setitem(torch_backend.PLAIN_BYTES, "triangle_multiplicative_update", -1)
    monkeypatch.setitem(torch_backend.PLAIN_BYTES, "triangle_multiplicative_update_grad", 1 << 40)
    module = build(TRI_MUL[0], 6, 4, 0, seed=5, backend="torch")
    z = torch.randn(1, 8, 8, 6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        module(z)
    assert torch_backend.last_path("triangle_multiplicative_update") == "efficient"
    module(z)
    assert torch_backend.last_path("triangle_multiplicative_update") == "plain"


@pytest.mark.parametrize("cls", TRI_MUL, ids=lambda c: c.__name__)
def test_trimul_inference_row_blocks(monkeypatch, cls):
    """The inference path's per-pair stages in blocks of one row give the whole-tensor numbers
    (up to the last bits of a differently blocked GEMM)."""
    monkeypatch.setattr(torch_backend, "PLAIN_BYTES", dict.fromkeys(torch_backend.PLAIN_BYTES, -1))
    module = build(cls, 6, 4, 0, seed=7, backend="torch")
    z = torch.randn(2, 11, 11, 6, dtype=torch.float64)
    mask = pair_mask(2, 11, 2, 0.1, seed=8)
    with torch.no_grad():
        expected = build(cls, 6, 4, 0, seed=7, backend="reference")(z, mask=mask)
        whole = module(z, mask=mask)
        monkeypatch.setattr(torch_backend, "_CACHE_ELEMENTS", 1)
        blocked = module(z, mask=mask)
        chunked = module(z, mask=mask, inplace_safe=True, _inplace_chunk_size=4)
    assert rel(blocked, whole) <= 1e-15 and rel(chunked, whole) <= 1e-15  # a GEMM's blocking: last bits
    assert rel(whole, expected) <= 1e-14


def test_float16_attention_takes_the_chunked_path_and_stays_finite():
    """The plain path's mask bias is -inf in float16 (a fully masked row turns NaN), so
    float16 attention, as input dtype or under autocast, always runs chunked."""
    torch.manual_seed(0)
    q = torch.randn(1, 3, 2, 6, 16, dtype=torch.float16)
    mask = torch.ones(1, 3, 6)
    mask[:, 1] = 0  # a fully masked row
    out = genie_tk.triangle_attention(q, q, q, torch.zeros(1, 2, 6, 6, dtype=torch.float16), mask, backend="torch")
    assert torch_backend.last_path("triangle_attention") == "efficient"
    assert torch.isfinite(out).all()
    module = build(genie_tk.TriangleAttentionStartingNode, 8, 16, 2, seed=0, dtype=torch.float32)
    z = torch.randn(1, 6, 6, 8)
    zmask = torch.ones(1, 6, 6)
    zmask[:, 2] = 0
    with torch.autocast("cpu", dtype=torch.float16):
        out = module(z, zmask)
    assert torch_backend.last_path("triangle_attention_layer") == "efficient"
    assert torch.isfinite(out).all()
    module(z, zmask)  # float32 at this size: the plain path
    assert torch_backend.last_path("triangle_attention_layer") == "plain"
