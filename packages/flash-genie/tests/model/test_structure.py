"""IPA and the structure net against Genie's per-layer intermediates; invariances."""

from __future__ import annotations

import pytest
import torch

from flash_genie.model.frames import frenet_frames
from flash_genie.model.ipa import InvariantPointAttention
from flash_genie.model.rigid import Rigid, quaternion_to_rotation
from flash_genie.model.structure import BackboneUpdate


def _run_layers(net, s, p, frames, mask):
    """Run the structure net, recording ``(s, frames)`` after every layer call."""
    seen = []
    handles = [layer.register_forward_hook(lambda _m, _i, out: seen.append(out)) for layer in net.net]
    try:
        with torch.no_grad():
            final = net(s, p, frames, mask)
    finally:
        for h in handles:
            h.remove()
    return final, seen


@pytest.mark.parametrize("name", ["scope_l_128", "tiny", "tiny_triatt"])
def test_structure_layers_match_genie(genie_reference, reference_model, helpers, name):
    ref = genie_reference(name)
    inputs, inter = ref["inputs"], ref["intermediates"]
    mask = inputs["mask"]
    s, frames = inter["single"], Rigid(inputs["rots_t"], inputs["xt"])
    if "pair_transform" in inter:
        p = inter["pair_transform"]
        ours = theirs = lambda t: t[mask.bool()]
    else:
        # scope_l_128 stores the pair only for element 0's real block: run that
        # chain alone (the IPA weight of padded keys is exactly zero).
        n0 = int(inputs["lengths"][0])
        s, p, mask = s[:1, :n0], inter["pair_transform_b0_valid"][None], mask[:1, :n0]
        frames = Rigid(frames.rots[:1, :n0], frames.trans[:1, :n0])
        ours, theirs = (lambda t: t[0]), (lambda t: t[0, :n0])
    final, seen = _run_layers(reference_model(name).structure_net, s, p, frames, mask)
    assert len(seen) == inter["structure_layers_s"].shape[0]
    for k, (s_k, frames_k) in enumerate(seen):
        for label, got in (("s", s_k), ("rots", frames_k.rots), ("trans", frames_k.trans)):
            want = inter[f"structure_layers_{label}"][k]
            helpers.assert_close(f"{name} layer {k} {label}", ours(got), theirs(want), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(final.trans, seen[-1][1].trans)


def _random_rigid(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, generator=g, dtype=torch.float64)
    return quaternion_to_rotation(q / q.norm()), torch.randn(3, generator=g, dtype=torch.float64) * 10


def test_ipa_is_invariant_to_global_rigid_motion():
    torch.manual_seed(0)
    ipa = InvariantPointAttention(c_s=10, c_z=6, c_hidden=4, no_heads=3, no_qk_points=2, no_v_points=3).double()
    with torch.no_grad():
        for prm in ipa.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    s, z = torch.randn(2, 8, 10, dtype=torch.float64), torch.randn(2, 8, 8, 6, dtype=torch.float64)
    x = torch.randn(2, 8, 3, dtype=torch.float64) * 5
    mask = (torch.arange(8)[None] < torch.tensor([8, 5])[:, None]).double()
    frames = Rigid(frenet_frames(x, mask), x)
    r, t = _random_rigid(1)
    moved = Rigid(r @ frames.rots, frames.trans @ r.T + t)
    with torch.no_grad():
        a, b = ipa(s, z, frames, mask), ipa(s, z, moved, mask)
    err = (a - b)[mask.bool()].abs().max().item()
    print(f"IPA invariance: {err:.3e}")
    assert err < 1e-10


def test_backbone_update_of_zero_is_identity():
    bb = BackboneUpdate(4).double()
    with torch.no_grad():
        bb.linear.weight.zero_()
        bb.linear.bias.zero_()
    out = bb(torch.randn(3, 4, dtype=torch.float64))
    torch.testing.assert_close(out.rots, torch.eye(3, dtype=torch.float64).expand(3, 3, 3))
    assert out.trans.abs().max() == 0
