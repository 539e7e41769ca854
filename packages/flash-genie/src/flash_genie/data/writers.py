"""Writers of Cα traces: PDB/mmCIF files (gemmi) and Genie's coordinate text files."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flash_genie.data.chains import Chain

# PDB ATOM records hold coordinates in an 8.3f field: -999.999 to 9999.999 Å.
_PDB_MIN, _PDB_MAX = -999.999, 9999.999
_CHAIN_IDS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _check_coords(coords, path) -> np.ndarray:
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3 or len(coords) == 0:
        raise ValueError(f"{path}: coords must have shape [L, 3] with L >= 1, got {coords.shape}")
    if not np.isfinite(coords).all():
        raise ValueError(f"{path}: coords contain NaN or infinite values")
    return coords


def _residue_name(letter: str, path) -> str:
    import gemmi

    if letter.upper() == "X":
        return "UNK"
    name = gemmi.expand_one_letter(letter.upper(), gemmi.ResidueKind.AA)
    if not name:
        raise ValueError(f"{path}: {letter!r} is not a one-letter amino-acid code")
    return name


def write_structure(path, chains: Sequence[Chain], *, title: str | None = None) -> Path:
    """Write Cα-only chains as PDB or mmCIF (by suffix: .pdb/.ent or .cif/.mmcif, + .gz).

    Chains get ids A, B, C, … in order; residues are numbered from 1, atom ``CA``, element
    C, occupancy 1, B-factor 0. Sequence letters become residue names (``X`` → ``UNK``).

    Raises:
        ValueError: an unknown suffix, bad coordinates (see :func:`write_ca_pdb`), more
            than 62 chains, or a sequence letter that is not an amino acid.
    """
    import gemmi

    path = Path(path)
    inner = path.name.lower().removesuffix(".gz")
    if inner.endswith((".pdb", ".ent")):
        mmcif = False
    elif inner.endswith((".cif", ".mmcif")):
        mmcif = True
    else:
        raise ValueError(f"{path}: name must end in .pdb, .ent, .cif or .mmcif (optionally .gz)")
    if not 1 <= len(chains) <= len(_CHAIN_IDS):
        raise ValueError(f"{path}: can write 1 to {len(_CHAIN_IDS)} chains, got {len(chains)}")
    st = gemmi.Structure()
    st.name = path.name.split(".")[0]
    if title:
        st.info["_struct.title"] = title
    model = gemmi.Model(1)
    for chain_id, chain in zip(_CHAIN_IDS, chains):
        coords = _check_coords(chain.ca, path)
        if not mmcif and (coords.min() < _PDB_MIN or coords.max() > _PDB_MAX or len(coords) > 9999):
            raise ValueError(f"{path}: chain {chain.name} does not fit the PDB format "
                             f"(coordinates in [{_PDB_MIN}, {_PDB_MAX}] Å, at most 9999 residues); use .cif")
        gchain = gemmi.Chain(chain_id)
        for i, (xyz, letter) in enumerate(zip(coords, chain.sequence)):
            residue = gemmi.Residue()
            residue.name = _residue_name(letter, path)
            residue.seqid = gemmi.SeqId(i + 1, " ")
            residue.entity_type = gemmi.EntityType.Polymer
            atom = gemmi.Atom()
            atom.name, atom.element = "CA", gemmi.Element("C")
            atom.pos, atom.occ, atom.b_iso = gemmi.Position(*xyz), 1.0, 0.0
            residue.add_atom(atom)
            gchain.add_residue(residue)
        model.add_chain(gchain)
    st.add_model(model)
    st.setup_entities()
    st.assign_label_seq_id()
    text = st.make_mmcif_document().as_string() if mmcif else st.make_pdb_string()
    data = text.encode("ascii")
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.lower().endswith(".gz") else data)
    return path


def write_ca_pdb(path, coords, sequence: str | None = None, *, title: str | None = None) -> Path:
    """Write one Cα trace as a PDB file (chain A) that gemmi, PyMOL and TM-align read.

    One ``ATOM`` record per residue (atom ``CA``), then ``TER`` and ``END``. Without a
    ``sequence`` every residue is ``GLY`` (no side chain is implied).

    Args:
        path: output file (``.pdb``, or ``.cif`` for mmCIF). ``coords``: ``[L, 3]`` in Å
            (numpy, or a CPU torch tensor). ``sequence``: ``L`` one-letter codes, or None.
        title: an optional title (e.g. the model and sampling settings).

    Raises:
        ValueError: wrong shape, NaN/inf, coordinates or length beyond the PDB format
            (-999.999 to 9999.999 Å, 9999 residues), or a sequence of the wrong length.
    """
    coords = _check_coords(coords, path)
    if sequence is not None and len(sequence) != len(coords):
        raise ValueError(f"{path}: sequence has {len(sequence)} letters for {len(coords)} residues")
    return write_structure(path, [Chain("A", sequence or "G" * len(coords), coords)], title=title)


def write_genie_coords(path, coords) -> Path:
    """Write a Cα trace as Genie's sampler does: ``x,y,z`` per line, ``%.3f``, in Å.

    Genie names these files ``<length>_<index>.npy`` although they are text; read them
    back with :func:`~flash_genie.data.read_genie_coords` (``atoms_per_residue=1``).
    """
    path = Path(path)
    np.savetxt(path, _check_coords(coords, path), fmt="%.3f", delimiter=",")
    return path
