"""Writers for sampled Cα traces: a Cα-only PDB file, and Genie's coordinate text file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# PDB ATOM records hold coordinates in an 8.3f field: at most 9999.999 and -999.999.
_PDB_MIN, _PDB_MAX = -999.999, 9999.999


def _check_coords(coords, path) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3 or len(coords) == 0:
        raise ValueError(f"{path}: coords must have shape [L, 3] with L >= 1, got {coords.shape}")
    if not np.isfinite(coords).all():
        raise ValueError(f"{path}: coords contain NaN or infinite values")
    return coords


def write_ca_pdb(path, coords, sequence: str | None = None, *, chain: str = "A", title: str | None = None) -> Path:
    """Write a Cα trace as a PDB file that gemmi, PyMOL and TM-align read.

    One ``ATOM`` record per residue (atom ``CA``, element C, residues numbered from 1),
    then ``TER`` and ``END``. Residue names come from ``sequence``; without one every
    residue is ``GLY`` (no side chain is implied), and ``X`` becomes ``UNK``.

    Args:
        path: output file. ``coords``: ``[L, 3]`` in Å (numpy or torch, on CPU).
        sequence: ``L`` one-letter codes, or None. ``chain``: one-character chain id.
        title: an optional ``TITLE`` line (e.g. the model and sampling settings).

    Raises:
        ValueError: wrong shape, non-finite values, coordinates outside the PDB format's
            range (-999.999 to 9999.999 Å), or a sequence of the wrong length.
    """
    import gemmi

    path = Path(path)
    coords = _check_coords(coords, path)
    if coords.min() < _PDB_MIN or coords.max() > _PDB_MAX:
        raise ValueError(f"{path}: coordinates outside the PDB range [{_PDB_MIN}, {_PDB_MAX}] Å")
    if sequence is not None and len(sequence) != len(coords):
        raise ValueError(f"{path}: sequence has {len(sequence)} letters for {len(coords)} residues")
    if len(coords) > 9999:
        raise ValueError(f"{path}: {len(coords)} residues do not fit the PDB format's 4-digit numbering")
    if len(chain) != 1:
        raise ValueError(f"chain id must be one character, got {chain!r}")
    lines = [f"TITLE     {title[:69]}"] if title else []
    serial = 0
    for i, xyz in enumerate(coords):
        letter = sequence[i].upper() if sequence is not None else "G"
        name = "UNK" if letter == "X" else gemmi.expand_one_letter(letter, gemmi.ResidueKind.AA)
        if not name:
            raise ValueError(f"{path}: {letter!r} at position {i + 1} is not an amino-acid code")
        serial += 1
        lines.append(
            f"ATOM  {serial:5d}  CA  {name:>3s} {chain}{i + 1:4d}    "
            f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}  1.00  0.00           C"
        )
    lines.append(f"TER   {serial + 1:5d}      {name:>3s} {chain}{len(coords):4d}")
    lines.append("END")
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    return path


def write_genie_coords(path, coords) -> Path:
    """Write a Cα trace as Genie's sampler does: ``x,y,z`` per line, ``%.3f``, in Å.

    Genie names these files ``<length>_<index>.npy`` although they are text; read them
    back with :func:`~flash_genie.data.read_genie_coords` (``atoms_per_residue=1``).
    """
    path = Path(path)
    np.savetxt(path, _check_coords(coords, path), fmt="%.3f", delimiter=",")
    return path
