"""Secondary structure from a Cα trace alone (P-SEA-style virtual-angle criteria).

Method (after Labesse et al., "P-SEA", CABIOS 13:291, 1997, whose α/β values of the
virtual bond angle and torsion are used). For every window of four consecutive Cα atoms
``i … i+3`` with virtual bond angles θ at ``i+1`` and ``i+2`` and virtual torsion τ:

* helix window: both θ in 89 ± 12° and τ in 50 ± 20°;
* strand window: both θ in 124 ± 20° and τ in −170 ± 45° (taken modulo 360°).

The two central residues ``i+1, i+2`` of each window get its state (helix wins where
both hold); then helix runs shorter than 4 residues and strand runs shorter than 3 become
coil. The strand angle tolerance (±20° instead of P-SEA's ±14°), the central-residue
marking and the minimum runs were chosen on TS50 (50 chains, 79–173 residues, with DSSP
assignments in MDAnalysisTests 2.11.0): three-state agreement with DSSP 81.9 %, mean helix
fraction 0.33 (DSSP 0.35), strand 0.24 (DSSP 0.25), per-chain correlation 0.99 (helix) and
0.92 (strand). ``tools/check_secondary_structure.py`` reproduces these numbers. The ends of
a chain (first and last residue) are never helix or strand: they have no window centre.
"""

from __future__ import annotations

import numpy as np

from flash_genie.eval.geometry import virtual_angles

HELIX, STRAND, COIL = "H", "E", "-"
HELIX_ANGLE, HELIX_ANGLE_TOL = 89.0, 12.0
HELIX_TORSION, HELIX_TORSION_TOL = 50.0, 20.0
STRAND_ANGLE, STRAND_ANGLE_TOL = 124.0, 20.0
STRAND_TORSION, STRAND_TORSION_TOL = -170.0, 45.0
MIN_HELIX, MIN_STRAND = 4, 3


def _windows(theta, tau, angle, angle_tol, torsion, torsion_tol) -> np.ndarray:
    """Boolean ``[L - 3]``: windows whose two angles and torsion are within tolerance."""
    ok_angle = np.abs(theta - angle) <= angle_tol
    ok_torsion = np.abs((tau - torsion + 180.0) % 360.0 - 180.0) <= torsion_tol
    return ok_angle[:-1] & ok_angle[1:] & ok_torsion


def _mark(windows: np.ndarray, length: int) -> np.ndarray:
    state = np.zeros(length, dtype=bool)
    starts = np.flatnonzero(windows)
    state[starts + 1] = True
    state[starts + 2] = True
    return state


def _drop_short_runs(state: np.ndarray, min_run: int) -> np.ndarray:
    edges = np.diff(np.r_[0, state.astype(np.int8), 0])
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    out = state.copy()
    for a, b in zip(starts, ends):
        if b - a < min_run:
            out[a:b] = False
    return out


def assign_secondary_structure(ca) -> str:
    """Per-residue state string of ``H`` (helix), ``E`` (strand) and ``-`` (coil).

    Args:
        ca: ``[L, 3]`` Cα coordinates in Å. Chains under 4 residues are all coil.
    """
    ca = np.asarray(ca, dtype=np.float64)
    length = len(ca)
    if length < 4:
        return COIL * length
    theta, tau = virtual_angles(ca)
    helix = _mark(_windows(theta, tau, HELIX_ANGLE, HELIX_ANGLE_TOL, HELIX_TORSION, HELIX_TORSION_TOL), length)
    strand = _mark(_windows(theta, tau, STRAND_ANGLE, STRAND_ANGLE_TOL, STRAND_TORSION, STRAND_TORSION_TOL), length)
    helix = _drop_short_runs(helix, MIN_HELIX)
    strand = _drop_short_runs(strand & ~helix, MIN_STRAND)
    states = np.full(length, COIL)
    states[helix], states[strand] = HELIX, STRAND
    return "".join(states)


def secondary_fractions(ca) -> dict[str, float]:
    """``{"helix": f, "strand": f, "coil": f}``: fractions of residues in each state."""
    states = assign_secondary_structure(ca)
    n = max(len(states), 1)
    return {
        "helix": states.count(HELIX) / n,
        "strand": states.count(STRAND) / n,
        "coil": states.count(COIL) / n,
    }
