"""Readers that turn structure sources into :class:`Chain` objects (Cα traces).

* :func:`read_structure` — one PDB or mmCIF file, plain or ``.gz`` (gemmi).
* :func:`read_genie_coords` / :func:`read_genie_layout` — the original Genie data layout:
  ``<dataDirectory>/<name>/coords/*.npy`` (for ``scope``/``cath``) or
  ``<dataDirectory>/<name>_coords/*.npy``, each file a *text* table (comma-separated,
  despite the extension) of N, CA, C coordinates, three rows per residue, in Å. Genie's
  sampler writes the same format with one Cα row per residue.
* :func:`read_npz_chains` — the ``pdb_chains_ca.npz`` format (int16 centi-Å Cα,
  ``starts``, ``lengths``, ``names``, ``sequences``).

The ProMod3 StructureDB reader lives in :mod:`flash_genie.data.structure_db`.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from flash_genie.data.chains import Chain, StructureError

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif")
_MMCIF_SUFFIXES = (".cif", ".mmcif")
_NPY_MAGIC = b"\x93NUMPY"


def _inner_name(path: Path) -> str:
    """File name without a trailing ``.gz``, lower-cased (for format detection)."""
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def is_structure_file(path: Path) -> bool:
    """Whether ``path`` is named like a PDB/mmCIF file (plain or ``.gz``)."""
    return path.is_file() and _inner_name(path).endswith(STRUCTURE_SUFFIXES)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it ends in ``.gz``; corrupt gzip is a StructureError."""
    if not path.is_file():
        raise StructureError(path, "file not found")
    try:
        if path.name.lower().endswith(".gz"):
            # gemmi reads .gz itself but silently accepts a truncated stream; Python's
            # gzip raises on a missing end-of-stream marker, so decompress here.
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as err:
        raise StructureError(path, f"truncated or corrupt gzip data ({err})") from err


def _stem(path: Path) -> str:
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return name.rsplit(".", 1)[0] if "." in name else name


def read_structure(path) -> list[Chain]:
    """Read the protein chains of a PDB or mmCIF file (plain or gzip-compressed).

    Only the first model is read (NMR ensembles give one conformer), and only the first
    alternative location of each atom. Residues of a protein polymer without a Cα atom are
    left out (the gap filter of :func:`~flash_genie.data.build_dataset` then sees the break).
    Nucleic-acid, saccharide and non-polymer chains are skipped.

    Args:
        path: a ``.pdb``/``.ent``/``.cif``/``.mmcif`` file, optionally ``.gz``; other names
            are parsed with gemmi's format detection.

    Returns:
        One :class:`Chain` per protein chain, named ``<id>_<chain>`` where ``<id>`` is the
        entry id of the file (``_entry.id`` / PDB ``HEADER``) or else the file stem.

    Raises:
        StructureError: missing, empty, binary, truncated (as far as the parser or gzip
            can tell) or unparsable file, or a file with no protein chain.
    """
    import gemmi  # imported here so that the rest of flash_genie.data works without it

    path = Path(path)
    data = _read_bytes(path)
    if not data.strip():
        raise StructureError(path, "empty file")
    if b"\x00" in data[:65536]:
        raise StructureError(path, "binary data, not a PDB or mmCIF text file")
    inner = _inner_name(path)
    if inner.endswith(_MMCIF_SUFFIXES):
        fmt = gemmi.CoorFormat.Mmcif
    elif inner.endswith((".pdb", ".ent")):
        fmt = gemmi.CoorFormat.Pdb
    else:
        fmt = gemmi.CoorFormat.Detect
    try:
        st = gemmi.read_structure_string(data, format=fmt)
    except (RuntimeError, ValueError) as err:
        raise StructureError(path, f"cannot parse ({err})") from err
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise StructureError(path, "no atoms (not a PDB/mmCIF coordinate file, or cut off before its first atom)")
    st.setup_entities()
    entry = st.info["_entry.id"] if "_entry.id" in st.info else ""
    entry_id = entry.strip() or _stem(path)

    chains, other = [], []
    for gchain in st[0]:
        polymer = gchain.get_polymer()
        kind = polymer.check_polymer_type() if len(polymer) else None
        if kind not in (gemmi.PolymerType.PeptideL, gemmi.PolymerType.PeptideD):
            other.append(f"{gchain.name} ({kind.name if kind is not None else 'no polymer'})")
            continue
        coords, letters = [], []
        for residue in polymer:
            atom = residue.find_atom("CA", "*", gemmi.Element("C"))
            if atom is None:
                continue
            coords.append((atom.pos.x, atom.pos.y, atom.pos.z))
            info = gemmi.find_tabulated_residue(residue.name)
            code = info.one_letter_code.upper() if info is not None and info.is_amino_acid() else "X"
            letters.append(code if code.isalpha() else "X")
        if coords:
            chains.append(Chain(f"{entry_id}_{gchain.name}", "".join(letters), np.array(coords)))
    if not chains:
        found = ", ".join(other) if other else "none"
        raise StructureError(path, f"no protein chain with Cα atoms (chains found: {found})")
    return chains


def read_genie_coords(path, atoms_per_residue: int = 3) -> Chain:
    """Read one Genie coordinate file: comma-separated text (or a binary ``.npy``) in Å.

    Args:
        path: the file (Genie names them ``*.npy`` although they are text).
        atoms_per_residue: 3 for Genie's training data (rows N, CA, C per residue; the CA
            row is taken), 1 for Genie's sampled Cα traces.

    Returns:
        A :class:`Chain` named after the file stem, with an unknown (``X``) sequence.

    Raises:
        StructureError: missing/empty/unparsable file, wrong column count, or a row count
            that is not a multiple of ``atoms_per_residue``.
    """
    path = Path(path)
    data = _read_bytes(path)
    if not data.strip():
        raise StructureError(path, "empty file")
    try:
        if data.startswith(_NPY_MAGIC):
            with path.open("rb") as fh:
                table = np.load(fh, allow_pickle=False)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # loadtxt warns (not raises) on odd input
                table = np.loadtxt(data.decode("ascii").splitlines(), delimiter=",", ndmin=2)
    except (ValueError, UnicodeDecodeError, UserWarning) as err:
        raise StructureError(path, f"not a comma-separated coordinate table ({err})") from err
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 3:
        raise StructureError(path, f"expected 3 columns (x, y, z), got shape {table.shape}")
    if len(table) % atoms_per_residue:
        raise StructureError(
            path, f"{len(table)} rows is not a multiple of {atoms_per_residue} atoms per residue"
        )
    ca = table[1::3] if atoms_per_residue == 3 else table[::atoms_per_residue]
    if len(ca) == 0:
        raise StructureError(path, "no coordinates")
    return Chain(_stem(path), "X" * len(ca), ca)


def genie_layout_files(data_dir, dataset_names: Sequence[str] | None = None) -> list[Path]:
    """The coordinate files of Genie's ``dataDirectory``/``datasetNames`` layout, sorted.

    Genie looks in ``<data_dir>/<name>/coords/*.npy`` when the name is ``scope`` or ``cath``
    and in ``<data_dir>/<name>_coords/*.npy`` otherwise; both places are tried for every
    name here. ``dataset_names=None`` takes every such folder found.

    Raises:
        FileNotFoundError: ``data_dir`` is missing, or a named dataset has no folder.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"Genie data directory {data_dir} does not exist")
    if dataset_names is None:
        folders = sorted(p for p in data_dir.glob("*/coords") if p.is_dir())
        folders += sorted(p for p in data_dir.glob("*_coords") if p.is_dir())
    else:
        folders = []
        for name in dataset_names:
            found = [p for p in (data_dir / name / "coords", data_dir / f"{name}_coords") if p.is_dir()]
            if not found:
                raise FileNotFoundError(
                    f"dataset {name!r}: neither {data_dir / name / 'coords'} nor "
                    f"{data_dir / (name + '_coords')} exists"
                )
            folders += found
    return [f for folder in folders for f in sorted(folder.glob("*.npy"))]


def read_genie_layout(data_dir, dataset_names: Sequence[str] | None = None) -> list[Chain]:
    """Read every domain of Genie's data layout (see :func:`genie_layout_files`).

    Raises:
        FileNotFoundError: missing folders; StructureError: the first unreadable file
        (:func:`~flash_genie.data.build_dataset` skips and reports such files instead).
    """
    return [read_genie_coords(f) for f in genie_layout_files(data_dir, dataset_names)]


NPZ_KEYS = ("ca_centi_angstrom", "starts", "lengths", "names", "sequences")


def read_npz_chains(path) -> Iterator[Chain]:
    """Yield the chains of a ``pdb_chains_ca.npz`` file.

    The file holds int16 Cα coordinates in units of 0.01 Å (``ca_centi_angstrom [R, 3]``),
    per-chain ``starts``/``lengths`` into it, and ``names``/``sequences`` string arrays.

    Raises:
        StructureError: a missing key or inconsistent arrays (raised on the first ``next``).
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise StructureError(path, f"missing arrays {missing} (expected {list(NPZ_KEYS)})")
            ca = npz["ca_centi_angstrom"]
            starts, lengths = npz["starts"].astype(np.int64), npz["lengths"].astype(np.int64)
            names, sequences = npz["names"], npz["sequences"]
    except StructureError:
        raise
    except (OSError, ValueError) as err:  # not a zip, or object arrays (pickles are refused)
        raise StructureError(path, f"not a readable .npz of chains ({err})") from err
    if not (len(starts) == len(lengths) == len(names) == len(sequences)):
        raise StructureError(path, "starts, lengths, names and sequences differ in length")
    if len(starts) and (starts.min() < 0 or (starts + lengths).max() > len(ca)):
        raise StructureError(path, "a chain's starts/lengths run outside ca_centi_angstrom")
    for start, length, name, seq in zip(starts, lengths, names, sequences):
        coords = ca[start : start + length].astype(np.float32) * np.float32(0.01)
        yield Chain(str(name), str(seq), coords)
