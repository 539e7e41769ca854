"""The rank-r factorized pair mode: exactness of the factor algebra and of IPA against the dense
module on the materialised pair, the pair layer's properties, linear memory, bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from flash_genie.memtrack import TensorMemoryTracker
from flash_genie.model.factorized import (
    FactorizedIPA,
    FactorizedPairFeatureNet,
    FactorizedPairTransformLayer,
    FactorPair,
    factor_triangle_incoming,
    factor_triangle_outgoing,
    landmark_index,
    nystrom_features,
)
from flash_genie.model.frames import frenet_frames
from flash_genie.model.ipa import InvariantPointAttention
from flash_genie.model.rigid import Rigid

IPA_DIMS = {"c_s": 10, "c_z": 6, "c_hidden": 4, "no_heads": 3, "no_qk_points": 2, "no_v_points": 3}


def _mask(lengths, n_res, dtype=torch.float64):
    return (torch.arange(n_res)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)


def _factors(batch, n_res, rank, channels, mask=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    left, right = (
        torch.randn(batch, n_res, rank, channels, generator=g, dtype=dtype) for _ in range(2)
    )
    if mask is not None:
        left, right = left * mask[..., None, None], right * mask[..., None, None]
    return FactorPair(left, right)


def _perturb(module, scale=0.3, seed=0):
    """Perturb every parameter, so that zero-initialised output layers hide nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _layer(c_p=6, rank=2, c_hidden=5, dropout=0.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return FactorizedPairTransformLayer(
        c_p, rank, c_hidden, pair_transition_n=2, dropout=dropout
    ).to(dtype)


def _chain(batch, n_res, lengths, seed=0, dtype=torch.float64):
    """``(s, frames, mask)``: random single features and Frenet frames of a random Cα walk."""
    g = torch.Generator().manual_seed(seed)
    mask = _mask(lengths, n_res, dtype)
    steps = torch.randn(batch, n_res, 3, generator=g, dtype=dtype)
    x = torch.cumsum(3.8 * steps / steps.norm(dim=-1, keepdim=True), dim=1) * mask[..., None]
    s = torch.randn(batch, n_res, IPA_DIMS["c_s"], generator=g, dtype=dtype)
    return s, Rigid(frenet_frames(x, mask), x), mask


def _report(label, got, want):
    err = (got - want).abs()
    print(
        f"{label}: max |Δ| = {err.max().item():.3e}, mean |Δ| = {err.mean().item():.3e}, "
        f"max |ref| = {want.abs().max().item():.3e}"
    )
    return err.max().item()


def test_materialize_matches_double_loop():
    pair = _factors(2, 5, 3, 4, seed=1)
    dense = pair.materialize()
    assert dense.shape == (2, 5, 5, 4)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                want = sum(pair.left[b, i, k] * pair.right[b, j, k] for k in range(3))
                torch.testing.assert_close(dense[b, i, j], want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(pair.transpose().materialize(), dense.transpose(1, 2))


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_factorized_ipa_equals_dense_ipa_on_the_materialised_pair(chunk_size):
    torch.manual_seed(0)
    dense = _perturb(InvariantPointAttention(**IPA_DIMS).double())
    factorized = FactorizedIPA(**IPA_DIMS).double()
    factorized.load_state_dict(dense.state_dict())
    assert factorized.state_dict().keys() == dense.state_dict().keys()
    dense.chunk_size = factorized.chunk_size = chunk_size
    s, frames, mask = _chain(2, 12, [12, 7])
    pair = _factors(2, 12, 3, IPA_DIMS["c_z"], mask, seed=2)
    s, left, right = (t.clone().requires_grad_() for t in (s, *pair))
    weights = torch.randn(2, 12, IPA_DIMS["c_s"], dtype=torch.float64) * mask[..., None]
    params = list(dense.parameters())

    want = dense(s, FactorPair(left, right).materialize(), frames, mask)
    want_grads = torch.autograd.grad((want * weights).sum(), [s, left, right, *params])
    got = factorized(s, FactorPair(left, right), frames, mask)
    got_grads = torch.autograd.grad(
        (got * weights).sum(), [s, left, right, *factorized.parameters()]
    )

    real = mask.bool()
    assert _report("output", got[real], want[real]) < 1e-12
    names = ["s", "left", "right", *(name for name, _ in dense.named_parameters())]
    for name, g_got, g_want in zip(names, got_grads, want_grads, strict=True):
        assert g_want.abs().max() > 0, name
        assert _report(f"grad {name}", g_got, g_want) < 1e-12 * max(1.0, g_want.abs().max().item())


def test_factorized_ipa_names_a_dense_pair_as_the_wrong_type():
    ipa = FactorizedIPA(**IPA_DIMS).double()
    s, frames, mask = _chain(1, 4, [4])
    with pytest.raises(TypeError, match="z must be a FactorPair"):
        ipa(s, torch.zeros(1, 4, 4, IPA_DIMS["c_z"], dtype=torch.float64), frames, mask)
    with pytest.raises(ValueError, match="6 channels"):
        ipa(s, _factors(1, 4, 2, 5), frames, mask)


@pytest.mark.parametrize("direction", ["outgoing", "incoming"])
def test_triangle_products_equal_the_dense_sums(direction):
    mask = _mask([9, 6], 9)
    # Garbage at padded residues: the products must mask it themselves.
    a, b = _factors(2, 9, 2, 4, seed=3), _factors(2, 9, 3, 4, seed=4)
    pair_mask = (mask[:, :, None] * mask[:, None, :])[..., None]
    dense_a, dense_b = a.materialize() * pair_mask, b.materialize() * pair_mask
    if direction == "outgoing":
        want = torch.einsum("bimc,bjmc->bijc", dense_a, dense_b)
        got = factor_triangle_outgoing(a, b, mask)
    else:
        want = torch.einsum("bmic,bmjc->bijc", dense_a, dense_b)
        got = factor_triangle_incoming(a, b, mask)
    assert got.left.shape == got.right.shape == (2, 9, 6, 4)
    assert _report(direction, got.materialize(), want) < 1e-12
    assert want[1, 2, 4].abs().max() > 0  # the padded-chain check compares nonzero numbers


def test_fresh_layer_is_the_identity():
    layer = _layer().train()
    mask = _mask([8, 5], 8)
    pair = _factors(2, 8, 2, 6, mask, seed=5)
    out = layer(pair, mask)
    assert out.left.shape == out.right.shape == (2, 8, 2, 6)
    torch.testing.assert_close(out.left, pair.left, rtol=0, atol=0)
    torch.testing.assert_close(out.right, pair.right, rtol=0, atol=0)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_padded_residues_stay_zero_and_do_not_reach_real_ones(rank):
    layer = _perturb(_layer(rank=rank)).eval()
    mask = _mask([8, 5], 8)
    clean = _factors(2, 8, rank, 6, mask, seed=6)
    noise = _factors(2, 8, rank, 6, 1 - mask, seed=7)
    out = layer(clean, mask)
    out_noisy = layer(FactorPair(clean.left + noise.left, clean.right + noise.right), mask)
    pad = ~mask.bool()
    assert out.left[pad].abs().max() == 0 and out.right[pad].abs().max() == 0
    assert out_noisy.left[pad].abs().max() == 0 and out_noisy.right[pad].abs().max() == 0
    assert _report("padding garbage", out_noisy.left, out.left) < 1e-12
    assert _report("padding garbage", out_noisy.right, out.right) < 1e-12
    # The perturbed layer does change the pair.
    assert (out.left - clean.left)[~pad].abs().max() > 1e-3


def test_layer_update_couples_residues_through_the_triangle():
    layer = _perturb(_layer()).eval()
    mask = _mask([10], 10)
    pair = _factors(1, 10, 2, 6, mask, seed=8)
    m = 3
    # A random change: a constant added to every channel would vanish in the factor LayerNorms.
    step = _factors(1, 10, 2, 6, seed=9)
    hit = (torch.arange(10) == m).double()[None, :, None, None]
    moved = FactorPair(pair.left + 0.5 * step.left * hit, pair.right + 0.5 * step.right * hit)

    def update(p):
        return layer(p, mask).materialize() - p.materialize()

    change = (update(moved) - update(pair)).abs().amax(-1)[0]  # [N, N]
    others = [j for j in range(10) if j != m]
    print(
        f"update change at (m, j): {change[m, others].min().item():.3e}, "
        f"at (i, j) with i, j != m: {change[others][:, others].min().item():.3e}"
    )
    # Row m: the update at (m, j) depends on m and on each j, not on m alone.
    assert change[m, others].min() > 1e-6
    # Entries away from m change too: residue m is the third vertex of every triangle (i, j, m).
    assert change[others][:, others].min() > 1e-6


def test_layer_is_permutation_equivariant():
    layer = _perturb(_layer()).eval()
    mask = _mask([9, 6], 9)
    pair = _factors(2, 9, 2, 6, mask, seed=9)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    out = layer(pair, mask)
    out_perm = layer(FactorPair(pair.left[:, perm], pair.right[:, perm]), mask[:, perm])
    assert _report("permuted", out_perm.left, out.left[:, perm]) < 1e-12
    assert _report("permuted", out_perm.right, out.right[:, perm]) < 1e-12


def test_gradients_reach_every_parameter():
    layer = _layer()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(("linear_z.weight", "linear_2.weight")):
                assert p.abs().max() == 0, f"{name} should start at zero"
                p.normal_(0.0, 0.3)
    mask = _mask([8, 5], 8)
    out = layer(_factors(2, 8, 2, 6, mask, seed=10), mask)
    (out.left.square().sum() + (out.left * out.right).sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"no gradient reaches {name}"


def test_dropout_is_deterministic_given_the_rng_and_off_in_eval():
    layer = _perturb(_layer(dropout=0.5)).train()
    mask = _mask([8], 8)
    pair = _factors(1, 8, 2, 6, mask, seed=11)
    torch.manual_seed(1)
    first = layer(pair, mask)
    torch.manual_seed(1)
    again = layer(pair, mask)
    torch.manual_seed(2)
    other = layer(pair, mask)
    torch.testing.assert_close(again.left, first.left, rtol=0, atol=0)
    assert (other.left - first.left).abs().max() > 1e-6
    layer.eval()
    eval_out = layer(pair, mask)
    torch.testing.assert_close(layer(pair, mask).left, eval_out.left, rtol=0, atol=0)
    assert (eval_out.left - first.left).abs().max() > 1e-6


def _peak_ratio(label, step, n_small) -> float:
    """Peak tensor memory of ``step(4·n_small)`` over that of ``step(n_small)``."""
    peaks = {}
    for n_res in (n_small, 4 * n_small):
        with TensorMemoryTracker() as tracker:
            step(n_res)
        peaks[n_res] = tracker.peak
    ratio = peaks[4 * n_small] / peaks[n_small]
    print(f"{label} forward+backward peak bytes: {peaks}, ratio {ratio:.2f} (quadratic: 16)")
    return ratio


def test_layer_memory_grows_linearly():
    layer = _layer(c_p=4, c_hidden=4, dtype=torch.float32)
    _perturb(layer)

    def step(n_res):
        mask = torch.ones(1, n_res)
        left, right = (t.requires_grad_() for t in _factors(1, n_res, 2, 4, dtype=torch.float32))
        out = layer(FactorPair(left, right), mask)
        (out.left * out.right).sum().backward()

    assert _peak_ratio("layer", step, 256) < 4.5


def test_chunked_ipa_memory_grows_linearly():
    torch.manual_seed(0)
    ipa = FactorizedIPA(**IPA_DIMS)
    ipa.chunk_size = 16

    def step(n_res):
        s, frames, mask = _chain(1, n_res, [n_res], dtype=torch.float32)
        pair = _factors(1, n_res, 2, IPA_DIMS["c_z"], dtype=torch.float32)
        s, left, right = (t.requires_grad_() for t in (s, *pair))
        ipa(s, FactorPair(left, right), frames, mask).sum().backward()

    # Unchunked, the [B, H, N, N] logits make this ratio about 15.
    assert _peak_ratio("chunked IPA", step, 64) < 4.5


def test_bf16_autocast():
    torch.manual_seed(0)
    dense = _perturb(InvariantPointAttention(**IPA_DIMS).double())
    ipa = FactorizedIPA(**IPA_DIMS).double()
    ipa.load_state_dict(dense.state_dict())
    layer = _perturb(_layer())
    s, frames, mask = _chain(2, 12, [12, 7])
    pair = _factors(2, 12, 2, IPA_DIMS["c_z"], mask, seed=12)
    real = mask.bool()
    with torch.no_grad():
        exact_pair = layer(pair, mask)
        exact_ipa = ipa(s, pair, frames, mask)
        for module in (dense, ipa, layer):
            module.float()
        s32, mask32, pair32 = s.float(), mask.float(), FactorPair(*(t.float() for t in pair))
        frames32 = Rigid(frames.rots.float(), frames.trans.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            new_pair = layer(pair32, mask32)
            out = ipa(s32, pair32, frames32, mask32)
            out_dense = dense(s32, pair32.materialize(), frames32, mask32)
    for t in (*new_pair, out):
        assert torch.isfinite(t).all()
    assert new_pair.left.dtype == torch.float32  # the factor stream stays in the model's dtype
    rel_pair = max(
        (new.double() - ref).abs().max() / ref.abs().max() for new, ref in zip(new_pair, exact_pair)
    )
    print(f"bf16 layer: relative error {rel_pair.item():.3e}")
    assert rel_pair < 5e-2
    err_ipa = _report("bf16 factorized IPA", out.double()[real], exact_ipa[real])
    err_dense = _report("bf16 dense IPA", out_dense.double()[real], exact_ipa[real])
    # The flash-attention rule, against the dense IPA in the same precision.
    assert err_ipa <= 2 * err_dense


def test_feature_net_holds_the_additive_genie_term_at_rank_2():
    torch.manual_seed(0)
    c_s, c_p = 5, 3
    net = FactorizedPairFeatureNet(c_s, c_p, rank=2).double()
    lin_i, lin_j = torch.nn.Linear(c_s, c_p).double(), torch.nn.Linear(c_s, c_p).double()
    with torch.no_grad():
        # left_i = (Lin_i(s_i), 1), right_j = (1, Lin_j(s_j)): the ones come from the biases.
        net.linear_left.weight.zero_()
        net.linear_left.bias.zero_()
        net.linear_right.weight.zero_()
        net.linear_right.bias.zero_()
        net.linear_geometry_left.weight.zero_()  # the geometry term (tested below) off
        net.linear_geometry_right.weight.zero_()
        net.linear_left.weight[:c_p] = lin_i.weight
        net.linear_left.bias[:c_p] = lin_i.bias
        net.linear_left.bias[c_p:] = 1.0
        net.linear_right.bias[:c_p] = 1.0
        net.linear_right.weight[c_p:] = lin_j.weight
        net.linear_right.bias[c_p:] = lin_j.bias
    mask = _mask([7, 4], 7)
    s = torch.randn(2, 7, c_s, dtype=torch.float64)
    pair = net(s, torch.randn(2, 7, 3, dtype=torch.float64), mask)
    assert pair.left.shape == pair.right.shape == (2, 7, 2, c_p)
    pair_mask = (mask[:, :, None] * mask[:, None, :])[..., None]
    want = (lin_i(s).unsqueeze(2) + lin_j(s).unsqueeze(1)) * pair_mask
    assert _report("additive term", pair.materialize(), want) < 1e-12
    pad = ~mask.bool()
    assert pair.left[pad].abs().max() == 0 and pair.right[pad].abs().max() == 0


def _random_rotation(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def test_nystrom_features_are_the_nystrom_kernel_exact_at_every_landmark():
    torch.manual_seed(0)
    n = 9
    x = torch.cumsum(torch.randn(2, n, 3, dtype=torch.float64) * 3, dim=1)
    mask = _mask([9, 6], n)
    widths = (3.0, 12.0)
    # Every real residue a landmark: the features reproduce the kernel (up to the jitter).
    phi = nystrom_features(x, mask, n_landmarks=6, bandwidths=widths, jitter=1e-10)
    assert phi.shape == (2, n, 12)
    for width, block in zip(widths, phi.split(6, dim=-1), strict=True):
        kernel = torch.exp(-torch.cdist(x, x).square() / (2 * width**2))
        gram = block @ block.transpose(-1, -2)
        # Chain 1 has 6 real residues, all of them landmarks: exact on every real pair.
        assert _report(f"nystrom σ={width}, M = n", gram[1, :6, :6], kernel[1, :6, :6]) < 1e-6
        # Chain 0 (9 residues, 6 landmarks): exact on the pairs that involve a landmark.
        lm = landmark_index(mask, 6)[0]
        assert _report(f"nystrom σ={width}, landmark rows", gram[0, lm], kernel[0, lm]) < 1e-6
    assert landmark_index(mask, 6)[1].tolist() == [0, 1, 2, 3, 4, 5]
    assert phi[1, 6:].abs().max() == 0  # padded residues
    # Invariant under rotation and translation, to float64 rounding.
    rot, shift = _random_rotation(1), torch.tensor([5.0, -3.0, 8.0], dtype=torch.float64)
    moved = nystrom_features(x @ rot.T + shift, mask, n_landmarks=6, bandwidths=widths, jitter=1e-10)
    assert _report("nystrom invariance", moved, phi) < 1e-9


def test_feature_net_sees_the_structure():
    torch.manual_seed(1)
    net = FactorizedPairFeatureNet(5, 3, rank=2, n_landmarks=4).double()
    s, mask = torch.randn(1, 8, 5, dtype=torch.float64), torch.ones(1, 8, dtype=torch.float64)
    x = torch.cumsum(torch.randn(1, 8, 3, dtype=torch.float64) * 3, dim=1)
    other = torch.cumsum(torch.randn(1, 8, 3, dtype=torch.float64) * 3, dim=1)
    a, b = net(s, x, mask).materialize(), net(s, other, mask).materialize()
    assert (a - b).abs().max() > 1e-3


def test_feature_net_names_bad_arguments():
    net = FactorizedPairFeatureNet(5, 3, rank=2)
    s, mask = torch.randn(1, 4, 5), torch.ones(1, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, N, 3\]"):
        net(s, torch.randn(1, 4, 2), mask)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        FactorizedPairFeatureNet(5, 3, rank=0)
    with pytest.raises(ValueError, match="pair must have 6 channels"):
        _layer()(_factors(1, 4, 2, 5, dtype=torch.float32), mask)
