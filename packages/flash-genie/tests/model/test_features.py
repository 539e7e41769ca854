"""Single and pair feature nets against Genie's intermediates, and their invariances."""

from __future__ import annotations

import pytest
import torch

from flash_genie.model.features import PairFeatureNet


def _features(model, inputs):
    mask = inputs["mask"]
    pair_mask = mask.unsqueeze(2) * mask.unsqueeze(1)
    with torch.no_grad():
        s = model.single_feature_net(inputs["timesteps"], mask)
        p = model.pair_feature_net(s, inputs["xt"], pair_mask)
    return s, p


@pytest.mark.parametrize("name", ["scope_l_128", "tiny", "tiny_triatt"])
def test_features_match_genie(genie_reference, reference_model, helpers, name):
    ref = genie_reference(name)
    inter, mask = ref["intermediates"], ref["inputs"]["mask"].bool()
    s, p = _features(reference_model(name), ref["inputs"])
    helpers.assert_close(f"{name} single", s[mask], inter["single"][mask], atol=1e-9, rtol=1e-9)
    if "pair_features" in inter:
        pair_mask = mask.unsqueeze(2) & mask.unsqueeze(1)
        helpers.assert_close(f"{name} pair", p[pair_mask], inter["pair_features"][pair_mask], atol=1e-9, rtol=1e-9)
    else:
        n0 = int(ref["inputs"]["lengths"][0])
        helpers.assert_close(f"{name} pair b0", p[0, :n0, :n0], inter["pair_features_b0_valid"], atol=1e-9, rtol=1e-9)


def test_pair_features_formula():
    torch.manual_seed(0)
    net = PairFeatureNet(c_s=5, c_p=4, relpos_k=2).double()
    s = torch.randn(1, 6, 5, dtype=torch.float64)
    x = torch.randn(1, 6, 3, dtype=torch.float64)
    pair_mask = torch.ones(1, 6, 6, dtype=torch.float64)
    p = net(s, x, pair_mask)
    i, j = 5, 1  # i - j = 4 clips to the last bin
    onehot = torch.zeros(5, dtype=torch.float64)
    onehot[4] = 1
    d = torch.sqrt(1e-10 + ((x[0, i] - x[0, j]) ** 2).sum())
    expected = (
        net.linear_s_p_i(s[0, i]) + net.linear_s_p_j(s[0, j]) + net.linear_relpos(onehot)
        + net.linear_template(d.view(1))
    )
    torch.testing.assert_close(p[0, i, j], expected)
    # The diagonal template distance is sqrt(1e-10), not 0.
    torch.testing.assert_close(
        p[0, 2, 2] - net.linear_s_p_i(s[0, 2]) - net.linear_s_p_j(s[0, 2]) - net.relpos(6, None)[2, 2],
        net.linear_template(torch.tensor([1e-5], dtype=torch.float64)),
    )


def test_features_ignore_padding_and_depend_on_padded_length(tiny_config, helpers):
    model = helpers.random_model(tiny_config)
    x, mask = helpers.random_chain(2, 10, [7, 10])
    steps = torch.tensor([3, 50])
    inputs = {"xt": x, "mask": mask, "timesteps": steps}
    s, p = _features(model, inputs)
    junk = x.clone()
    junk[0, 7:] = 100.0
    s2, p2 = _features(model, {**inputs, "xt": junk})
    assert torch.equal(s, s2) and torch.equal(p[0, :7, :7], p2[0, :7, :7])
    assert p2[0, 7:].abs().max() == 0 and p2[0, :, 7:].abs().max() == 0  # masked
    # Genie scales the residue-index encoding by the padded length (pitfall 1).
    longer = {"xt": torch.cat([x, torch.zeros(2, 4, 3, dtype=x.dtype)], 1),
              "mask": torch.cat([mask, torch.zeros(2, 4, dtype=mask.dtype)], 1), "timesteps": steps}
    s3, _ = _features(model, longer)
    assert (s3[:, :7] - s[:, :7]).abs().max() > 1e-3
