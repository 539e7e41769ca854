"""Pair transform net (genie-tk triangle modules + transition) against Genie, dropout, chunking."""

from __future__ import annotations

import pytest
import torch

from flash_genie.model.pair_stack import PairTransformNet
from flash_genie.model.primitives import SharedDropout


@pytest.mark.parametrize("name", ["scope_l_128", "tiny", "tiny_triatt"])
def test_pair_stack_matches_genie(genie_reference, reference_model, helpers, name):
    ref = genie_reference(name)
    inter, mask = ref["intermediates"], ref["inputs"]["mask"]
    net = reference_model(name).pair_transform_net
    if "pair_features" in inter:
        p_in, expected = inter["pair_features"], inter["pair_transform"]
        pair_mask = mask.unsqueeze(2) * mask.unsqueeze(1)
    else:
        # scope_l_128 stores only batch element 0's real block; padded keys
        # contribute exactly zero, so the block alone gives the same values.
        p_in, expected = inter["pair_features_b0_valid"][None], inter["pair_transform_b0_valid"][None]
        pair_mask = torch.ones(p_in.shape[:-1], dtype=p_in.dtype)
    with torch.no_grad():
        out = net(p_in, pair_mask)
    real = pair_mask.bool()
    helpers.assert_close(f"{name} pair_transform", out[real], expected[real], atol=1e-9, rtol=1e-9)


def _net(include_tri_att=True, dropout=0.25, seed=0):
    torch.manual_seed(seed)
    net = PairTransformNet(
        12, 2, include_mul_update=True, include_tri_att=include_tri_att, c_hidden_mul=7,
        c_hidden_tri_att=5, n_head_tri=2, tri_dropout=dropout, pair_transition_n=2,
    ).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def _pair(batch=2, n=9, lengths=(6, 9)):
    torch.manual_seed(1)
    p = torch.randn(batch, n, n, 12, dtype=torch.float64)
    m = (torch.arange(n)[None] < torch.tensor(lengths)[:, None]).double()
    return p, m.unsqueeze(2) * m.unsqueeze(1)


def test_chunk_size_has_no_effect():
    net = _net().eval()
    p, pair_mask = _pair()
    with torch.no_grad():
        full = net(p, pair_mask)
        net.chunk_size = 2
        chunked = net(p, pair_mask)
    torch.testing.assert_close(chunked, full, atol=1e-13, rtol=1e-13)


def test_padding_does_not_leak():
    net = _net().eval()
    p, pair_mask = _pair()
    junk = p.clone()
    junk[0, 6:] = 50.0
    junk[0, :, 6:] = -50.0
    with torch.no_grad():
        a, b = net(p, pair_mask), net(junk, pair_mask)
    helpers_err = (a[0, :6, :6] - b[0, :6, :6]).abs().max().item()
    print(f"padding leak: {helpers_err:.3e}")
    assert helpers_err < 1e-12
    assert b[0, 6:].abs().max() == 0  # masked at the end of every layer


def test_shared_dropout_masks():
    torch.manual_seed(2)
    x = torch.ones(2, 5, 6, 4)
    row, col = SharedDropout(0.5, -3).train(), SharedDropout(0.5, -2).train()
    y = row(x)
    assert torch.equal(y, y[:, :1].expand_as(y))  # shared along the first residue axis
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    y = col(x)
    assert torch.equal(y, y[:, :, :1].expand_as(y))
    assert torch.equal(row.eval()(x), x)


def test_dropout_only_in_training():
    net = _net()
    p, pair_mask = _pair()
    with torch.no_grad():
        eval_out = net.eval()(p, pair_mask)
        torch.manual_seed(3)
        train_a = net.train()(p, pair_mask)
        torch.manual_seed(3)
        train_b = net(p, pair_mask)
    assert torch.equal(train_a, train_b)
    assert (train_a - eval_out).abs().max() > 1e-3


def test_transition_inference_row_blocks_are_exact(monkeypatch):
    """In inference the transition runs in blocks of rows (cache-sized): the same numbers."""
    from flash_genie.model import pair_stack

    torch.manual_seed(0)
    layer = pair_stack.PairTransition(8, 4).double()
    torch.nn.init.normal_(layer.linear_2.weight)
    z = torch.randn(2, 9, 9, 8, dtype=torch.float64)
    mask = (torch.rand(2, 9, 9) > 0.2).double()
    with torch.no_grad():
        whole = layer(z, mask)
        monkeypatch.setattr(pair_stack, "_CACHE_ELEMENTS", 1)
        blocked = layer(z, mask)
    plain = layer._update(z, mask).detach()
    assert ((blocked - plain).norm() / plain.norm()).item() <= 1e-15  # a GEMM's blocking: last bits
    assert torch.equal(whole, plain)
