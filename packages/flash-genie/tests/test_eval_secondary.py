"""Secondary structure from Cα: ideal helix/strand built from backbone dihedrals, real chains."""

from __future__ import annotations

import numpy as np
import pytest

from flash_genie.data import builtin_dataset
from flash_genie.eval import assign_secondary_structure, secondary_fractions

# Engh & Huber backbone geometry: bond lengths (Å) and angles (degrees).
N_CA, CA_C, C_N = 1.458, 1.525, 1.329
ANGLE_N_CA_C, ANGLE_CA_C_N, ANGLE_C_N_CA = 111.2, 116.2, 121.7


def _place(a, b, c, bond, angle, torsion):
    """Atom d with |cd| = bond, angle bcd and torsion abcd (degrees): the NeRF construction."""
    angle, torsion = np.radians(angle), np.radians(torsion)
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d = np.array([-np.cos(angle), np.sin(angle) * np.cos(torsion), np.sin(angle) * np.sin(torsion)])
    return c + bond * (d[0] * bc + d[1] * m + d[2] * n)


def backbone_ca(n: int, phi: float, psi: float, omega: float = 180.0) -> np.ndarray:
    """Cα trace of a full backbone built with constant (φ, ψ, ω): independent of the Cα method."""
    atoms = [np.array([0.0, 1.4, 0.0]), np.zeros(3), np.array([CA_C, 0.0, 0.0])]  # N, CA, C
    atoms[0] = _place(atoms[2], atoms[1], atoms[1] + np.array([0.0, 0.0, 1.0]), N_CA, ANGLE_N_CA_C, 120)
    for _ in range(n - 1):
        nxt = _place(atoms[-3], atoms[-2], atoms[-1], C_N, ANGLE_CA_C_N, psi)
        ca = _place(atoms[-2], atoms[-1], nxt, N_CA, ANGLE_C_N_CA, omega)
        c = _place(atoms[-1], nxt, ca, CA_C, ANGLE_N_CA_C, phi)
        atoms += [nxt, ca, c]
    return np.array(atoms[1::3])


@pytest.mark.parametrize("n", [30, 101])
def test_ideal_helix(n):
    ca = backbone_ca(n, -57.8, -47.0)
    steps = np.linalg.norm(np.diff(ca, axis=0), axis=1)
    assert steps.mean() == pytest.approx(3.80, abs=0.02)
    states = assign_secondary_structure(ca)
    print(states)
    assert states == "-" + "H" * (n - 2) + "-"  # the end residues have no window centre
    assert secondary_fractions(ca)["helix"] == pytest.approx((n - 2) / n)  # ≈ 1


@pytest.mark.parametrize("phi, psi", [(-139.0, 135.0), (-119.0, 113.0)], ids=["antiparallel", "parallel"])
def test_ideal_strand(phi, psi):
    states = assign_secondary_structure(backbone_ca(40, phi, psi))
    assert states == "-" + "E" * 38 + "-"


def test_left_handed_helix_and_polyproline_are_not_helix():
    assert "H" not in assign_secondary_structure(backbone_ca(30, 57.8, 47.0))
    assert "H" not in assign_secondary_structure(backbone_ca(30, -75.0, 145.0))  # PPII


def test_short_chains():
    assert assign_secondary_structure(np.zeros((3, 3))) == "---"
    assert secondary_fractions(np.zeros((0, 3))) == {"helix": 0.0, "strand": 0.0, "coil": 0.0}


def test_real_chains():
    ds = builtin_dataset()
    index = {name: i for i, name in enumerate(ds.names)}
    # 2NPS: early endosomal SNARE complex, a bundle of long α-helices.
    assert secondary_fractions(ds.coords(index["2NPS_C"]))["helix"] > 0.85
    # 1QJP: transmembrane domain of OmpA, an eight-stranded β-barrel.
    omp = secondary_fractions(ds.coords(index["1QJP_A"]))
    assert omp["strand"] > 0.55 and omp["helix"] < 0.05
    # Whole PDB: about a third helix and a quarter strand (DSSP gives ~0.35 / ~0.22).
    fractions = np.array([[f["helix"], f["strand"]] for f in map(secondary_fractions, map(ds.coords, range(len(ds))))])
    print("mean helix, strand on the built-in set:", fractions.mean(axis=0))
    assert 0.28 < fractions[:, 0].mean() < 0.42 and 0.17 < fractions[:, 1].mean() < 0.29
