"""Cα geometry metrics on known shapes, and the native Rg scaling on real chains."""

from __future__ import annotations

import numpy as np
import pytest

from flash_genie.data import builtin_dataset
from flash_genie.eval import (
    clash_count,
    kabsch,
    native_rg,
    radius_of_gyration,
    step_stats,
    virtual_angles,
)


def ideal_ca_helix(n: int) -> np.ndarray:
    """α-helix Cα trace: radius 2.3 Å, 100° and 1.5 Å rise per residue (steps ≈ 3.8 Å)."""
    t = np.radians(100.0) * np.arange(n)
    return np.stack([2.3 * np.cos(t), 2.3 * np.sin(t), 1.5 * np.arange(n)], axis=1)


def test_helix_steps_angles():
    helix = ideal_ca_helix(40)
    mean, std = step_stats(helix)
    print(f"ideal helix step {mean:.4f} ± {std:.2e} Å")
    assert mean == pytest.approx(3.8, abs=0.05) and std < 1e-9
    theta, tau = virtual_angles(helix)
    assert np.allclose(theta, theta[0]) and theta[0] == pytest.approx(91, abs=2)
    assert tau[0] == pytest.approx(50, abs=2)  # right-handed: positive virtual torsion
    mirrored = helix * np.array([1, 1, -1])
    assert virtual_angles(mirrored)[1][0] == pytest.approx(-tau[0])
    assert clash_count(helix) == 0


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_straight_line_rg(n):
    line = np.zeros((n, 3))
    line[:, 0] = 3.8 * np.arange(n)
    # n points spaced d apart: Rg² = d² (n² − 1) / 12.
    assert radius_of_gyration(line) == pytest.approx(3.8 * np.sqrt((n * n - 1) / 12))
    assert step_stats(line) == pytest.approx((3.8, 0.0))


def test_clashes():
    ca = np.zeros((5, 3))
    ca[:, 0] = [0.0, 3.8, 7.6, 5.0, 1.0]  # the chain folds back onto itself
    # |i - j| >= 2 pairs under 3 Å: (0, 4) 1.0 Å, (1, 3) 1.2 Å, (1, 4) 2.8 Å.
    assert clash_count(ca) == 3
    assert clash_count(ca, min_separation=3) == 2
    assert clash_count(ca, distance=1.1) == 1


def test_kabsch_recovers_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3)) * 5
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))  # a proper rotation
    y = x @ q.T + np.array([1.0, -2.0, 3.0])
    r, t = kabsch(x, y)
    np.testing.assert_allclose(r, q, atol=1e-10)
    np.testing.assert_allclose(x @ r.T + t, y, atol=1e-10)
    r_mirror, _ = kabsch(x, y * np.array([1, 1, -1]))  # a mirror image: still a proper rotation
    assert np.linalg.det(r_mirror) == pytest.approx(1.0)
    batched, _ = kabsch(np.stack([x, x]), np.stack([y, y]))
    np.testing.assert_allclose(batched[1], q, atol=1e-10)


def test_native_rg_scaling_on_real_chains():
    ds = builtin_dataset()
    lengths = ds.lengths
    ratio = np.array([radius_of_gyration(ds.coords(i)) for i in range(len(ds))]) / native_rg(lengths)
    median, (p10, p90) = np.median(ratio), np.percentile(ratio, [10, 90])
    print(f"Rg / (2.2 L^0.38) on the built-in set: median {median:.3f}, 10–90 % {p10:.2f}–{p90:.2f}")
    assert 0.95 < median < 1.15 and p10 > 0.85  # compact chains follow the law; none collapse
    assert native_rg(100) == pytest.approx(2.2 * 100**0.38)
