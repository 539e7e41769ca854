"""Frenet–Serret frames and rigid-transform helpers."""

from __future__ import annotations

import math

import pytest
import torch

from flash_genie.model.frames import frenet_frames, prefix_lengths
from flash_genie.model.rigid import Rigid, quaternion_to_rotation


def random_rotation(seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, generator=g, dtype=dtype)
    return quaternion_to_rotation(q / q.norm())


@pytest.mark.parametrize("name", ["scope_l_128", "tiny", "tiny_triatt"])
@pytest.mark.parametrize(("x", "mask", "rots"), [("x0", "mask", "rots_x0"), ("xt", "mask", "rots_xt"), ("edge_x", "edge_mask", "edge_rots")])
def test_frames_match_genie(genie_reference, helpers, name, x, mask, rots):
    frames = genie_reference(name)["frames"]
    out = frenet_frames(frames[x], frames[mask])
    helpers.assert_close(f"{name} {rots}", out, frames[rots], atol=1e-12, rtol=0)


def test_float32_frames_match_genie_float32(genie_reference, helpers):
    inputs = genie_reference("tiny")["inputs"]
    out = frenet_frames(inputs["xt_float32"], inputs["mask"])
    assert out.dtype == torch.float32
    helpers.assert_close("float32 frames", out, inputs["rots_t_float32"], atol=1e-5, rtol=0)


def test_edge_cases_without_fixtures():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 3, dtype=torch.float64)
    x[2, 1:4] = torch.tensor([[0.0, 0, 0], [1, 0, 0], [2, 0, 0]], dtype=torch.float64)  # collinear
    mask = (torch.arange(8)[None] < torch.tensor([8, 3, 5, 2])[:, None]).double()
    rots = frenet_frames(x, mask)
    eye = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(rots[3], eye.expand(8, 3, 3))  # L = 2: identity everywhere
    torch.testing.assert_close(rots[1, 0], rots[1, 1])  # ends copy their neighbour
    torch.testing.assert_close(rots[1, 2], rots[1, 1])
    torch.testing.assert_close(rots[1, 3:], eye.expand(5, 3, 3))  # padding
    # The collinear triple at residue 2 of chain 2: b = n = 0.
    assert rots[2, 2, :, 1:].abs().max() == 0
    assert math.isclose(rots[2, 2, 0, 0].item(), 1 / math.sqrt(1 + 1e-10), rel_tol=1e-15)
    # Regular frames are orthonormal with det -1 ([t, b, b × t] is left-handed, as in Genie).
    r = rots[0, 1:7]
    torch.testing.assert_close(r.transpose(-1, -2) @ r, eye.expand(6, 3, 3))
    torch.testing.assert_close(torch.linalg.det(r), -torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize(("batch", "n_res"), [(3, 16), (2, 5), (3, 3), (1, 1), (2, 0)])
def test_cross_product_is_per_residue(batch, n_res):
    # Genie's torch.cross without dim crosses along the first size-3 axis when
    # B == 3 or N - 2 == 3; ours must equal a per-element computation always.
    torch.manual_seed(1)
    x = torch.randn(batch, n_res, 3, dtype=torch.float64)
    mask = torch.ones(batch, n_res, dtype=torch.float64)
    rots = frenet_frames(x, mask)
    for b in range(batch):
        torch.testing.assert_close(rots[b : b + 1], frenet_frames(x[b : b + 1], mask[b : b + 1]))
    if n_res >= 3:
        t = (x[0, 2] - x[0, 1]) / (x[0, 2] - x[0, 1]).norm()
        u = (x[0, 1] - x[0, 0]) / (x[0, 1] - x[0, 0]).norm()
        b_vec = torch.linalg.cross(u, t)
        b_vec = b_vec / b_vec.norm()
        torch.testing.assert_close(rots[0, 1], torch.stack([t, b_vec, torch.linalg.cross(b_vec, t)], dim=-1))


def test_frames_are_rotation_equivariant_and_translation_invariant():
    torch.manual_seed(2)
    x = torch.randn(2, 12, 3, dtype=torch.float64) * 4
    mask = (torch.arange(12)[None] < torch.tensor([12, 9])[:, None]).double()
    r = random_rotation(3)
    rots = frenet_frames(x, mask)
    moved = frenet_frames(x @ r.T + torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64), mask)
    valid = mask.bool()
    torch.testing.assert_close(moved[valid], (r @ rots)[valid])


def test_bad_masks_and_shapes():
    x = torch.zeros(2, 6, 3)
    with pytest.raises(ValueError, match="contiguous prefix"):
        frenet_frames(x, torch.tensor([[1.0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        frenet_frames(x, torch.full((2, 6), 0.5))
    with pytest.raises(ValueError, match=r"x must have shape \[B, N, 3\]"):
        frenet_frames(torch.zeros(2, 6, 2), torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, N\]"):
        frenet_frames(x, torch.ones(2, 5))
    assert prefix_lengths(torch.tensor([[True, True, False]])).tolist() == [2]


def test_rigid_compose_apply_invert():
    r1, r2 = random_rotation(4), random_rotation(5)
    t1, t2 = torch.tensor([1.0, 2, 3], dtype=torch.float64), torch.tensor([-1.0, 0.5, 2], dtype=torch.float64)
    a, b = Rigid(r1, t1), Rigid(r2, t2)
    pts = torch.randn(7, 3, dtype=torch.float64)
    ab = a.compose(b)
    torch.testing.assert_close(ab.apply(pts), a.apply(b.apply(pts)))
    torch.testing.assert_close(a.invert_apply(a.apply(pts)), pts)


def test_quaternion_to_rotation():
    q = torch.randn(10, 4, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    r = quaternion_to_rotation(q)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, torch.eye(3, dtype=torch.float64).expand(10, 3, 3))
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(10, dtype=torch.float64))
    # A rotation by θ about z: q = (cos θ/2, 0, 0, sin θ/2).
    theta = 0.7
    rz = quaternion_to_rotation(torch.tensor([math.cos(theta / 2), 0, 0, math.sin(theta / 2)], dtype=torch.float64))
    c, s = math.cos(theta), math.sin(theta)
    torch.testing.assert_close(rz, torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64))
