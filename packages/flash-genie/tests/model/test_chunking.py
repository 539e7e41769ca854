"""``chunked``: row-chunked evaluation that recomputes in backward equals the plain call."""

from __future__ import annotations

import pytest
import torch

from flash_genie.model.chunking import chunked


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(2, 7, 5, 3, dtype=torch.float64, generator=g).requires_grad_()
    keys = torch.randn(2, 5, 3, dtype=torch.float64, generator=g).requires_grad_()
    layer = torch.nn.Linear(3, 4).double()
    return rows, keys, layer


def _fn(layer):
    def fn(r, k):  # rows [B, I, J, 3], keys [B, J, 3] -> [B, I, J, 4]
        return torch.tanh(layer(r * k.unsqueeze(1))) * k.sum(-1)[:, None, :, None]

    return fn


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 50])
def test_cat_equals_plain_call_with_gradients(chunk_size):
    rows, keys, layer = _inputs()
    fn = _fn(layer)
    cot = torch.randn(2, 7, 5, 4, dtype=torch.float64)
    wrt = (rows, keys, layer.weight, layer.bias)
    plain = fn(rows, keys)
    expected = torch.autograd.grad((plain * cot).sum(), wrt)
    out = chunked(fn, (rows,), (keys,), tuple(layer.parameters()), chunk_size=chunk_size)
    grads = torch.autograd.grad((out * cot).sum(), wrt)
    torch.testing.assert_close(out, plain, atol=0, rtol=1e-15)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-14, rtol=1e-13)


def test_sum_reduction_and_gradcheck():
    rows, keys, layer = _inputs(1)
    fn = _fn(layer)
    plain = fn(rows, keys).sum(1)

    def reduced(r, k):
        return chunked(lambda a, b: fn(a, b).sum(1), (r,), (k,), tuple(layer.parameters()), chunk_size=2,
                       reduce="sum")

    torch.testing.assert_close(reduced(rows, keys), plain, atol=1e-14, rtol=1e-14)
    assert torch.autograd.gradcheck(reduced, (rows, keys))


def test_inference_loop_and_inputs_without_gradient():
    rows, keys, layer = _inputs(2)
    fn = _fn(layer)
    with torch.no_grad():
        torch.testing.assert_close(chunked(fn, (rows,), (keys,), chunk_size=3), fn(rows, keys))
    frozen = keys.detach()
    out = chunked(fn, (rows,), (frozen,), tuple(layer.parameters()), chunk_size=4)
    (g_rows,) = torch.autograd.grad(out.sum(), rows)
    torch.testing.assert_close(g_rows, torch.autograd.grad(fn(rows, frozen).sum(), rows)[0])


def test_recomputation_keeps_the_autocast_state():
    """Backward recomputes each chunk in the forward's autocast state, so the gradient is
    that of the values the forward produced (bfloat16 matmuls here)."""
    rows, keys, layer = _inputs(3)
    rows32, keys32, layer32 = rows.float().detach().requires_grad_(), keys.float(), layer.float()
    fn = _fn(layer32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = fn(rows32, keys32)
        out = chunked(fn, (rows32,), (keys32,), tuple(layer32.parameters()), chunk_size=2)
    assert out.dtype == plain.dtype
    (g_plain,) = torch.autograd.grad(plain.float().sum(), rows32)
    (g_chunk,) = torch.autograd.grad(out.float().sum(), rows32)
    torch.testing.assert_close(g_chunk, g_plain, atol=0, rtol=0)


def test_bad_arguments():
    rows, keys, layer = _inputs()
    with pytest.raises(ValueError, match="reduce"):
        chunked(_fn(layer), (rows,), (keys,), chunk_size=2, reduce="mean")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked(_fn(layer), (rows,), (keys,), chunk_size=0)
