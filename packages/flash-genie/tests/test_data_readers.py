"""Readers: PDB/mmCIF (+ .gz) round trips on built-in chains, bad files, Genie layout, npz,
and the ProMod3 StructureDB parser on a file written here by the documented layout."""

from __future__ import annotations

import gzip
import struct

import gemmi
import numpy as np
import pytest

from flash_genie.data import (
    Chain,
    StructureError,
    builtin_dataset,
    genie_layout_files,
    read_genie_coords,
    read_genie_layout,
    read_npz_chains,
    read_structure,
    read_structure_db,
    write_ca_pdb,
    write_genie_coords,
)
from flash_genie.data.structure_db import ENTRIES_OFFSET, MAGIC, VERSION
from flash_genie.data.writers import write_structure


@pytest.fixture(scope="module")
def chains():
    ds = builtin_dataset()
    return [ds.chain(i) for i in (0, 1, 2)]


@pytest.mark.parametrize("name", ["s.pdb", "s.ent", "s.cif", "s.mmcif", "s.pdb.gz", "s.cif.gz"])
def test_structure_round_trip(tmp_path, chains, name):
    path = write_structure(tmp_path / name, chains[:2])
    read = read_structure(path)
    assert [c.name for c in read] == ["s_A", "s_B"]
    for got, want in zip(read, chains):
        assert got.sequence == want.sequence
        assert got.ca.dtype == np.float32 and got.ca.shape == want.ca.shape
        np.testing.assert_allclose(got.ca, want.ca, atol=1e-3)  # PDB keeps 3 decimals


def _full_structure(tmp_path, with_dna: bool, with_protein: bool):
    """A structure with a protein chain (one residue without Cα), a DNA chain, water and a ligand."""
    st = gemmi.Structure()
    st.name = "1XYZ"
    model = gemmi.Model(1)

    def residue(name, seq, atoms, het=False):
        r = gemmi.Residue()
        r.name, r.seqid, r.het_flag = name, gemmi.SeqId(seq, " "), "H" if het else "A"
        for atom_name, element, xyz in atoms:
            a = gemmi.Atom()
            a.name, a.element, a.pos, a.occ = atom_name, gemmi.Element(element), gemmi.Position(*xyz), 1.0
            r.add_atom(a)
        return r

    if with_protein:
        prot = gemmi.Chain("P")
        for i, name in enumerate(["MET", "LYS", "GLY", "MSE", "TRP"]):
            atoms = [("N", "N", (3.8 * i - 1, 1, 0)), ("CA", "C", (3.8 * i, 0, 0)), ("C", "C", (3.8 * i + 1, 1, 0))]
            prot.add_residue(residue(name, i + 1, atoms if i != 2 else atoms[:1]))  # GLY 3 lacks CA
        prot.add_residue(residue("HOH", 101, [("O", "O", (0, 9, 9))], het=True))
        model.add_chain(prot)
    if with_dna:
        dna = gemmi.Chain("D")
        for i, name in enumerate(["DA", "DC", "DG", "DT"]):
            dna.add_residue(residue(name, i + 1, [("P", "P", (0, 6.5 * i, 20)), ("C1'", "C", (2, 6.5 * i, 20))]))
        model.add_chain(dna)
    ligand = gemmi.Chain("L")
    ligand.add_residue(residue("ATP", 1, [("PG", "P", (30, 30, 30))], het=True))
    model.add_chain(ligand)
    st.add_model(model)
    st.setup_entities()
    path = tmp_path / "full.cif"
    st.make_mmcif_document().write_file(str(path))
    return path


def test_protein_chains_only_and_missing_ca(tmp_path):
    chains = read_structure(_full_structure(tmp_path, with_dna=True, with_protein=True))
    assert [c.name for c in chains] == ["1XYZ_P"]
    assert chains[0].sequence == "MKMW"  # the residue without Cα is left out; MSE reads as M
    np.testing.assert_allclose(chains[0].ca[:, 0], [0, 3.8, 11.4, 15.2], atol=1e-6)


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000)), "binary"),
        (lambda p: p.write_text("HEADER    just a header\nREMARK nothing else\n"), "no atoms"),
    ],
    ids=["empty", "garbage", "no-atoms"],
)
def test_bad_files(tmp_path, make, reason):
    path = tmp_path / "bad.pdb"
    make(path)
    with pytest.raises(StructureError, match=reason) as err:
        read_structure(path)
    assert err.value.path == str(path)


def test_truncated_files(tmp_path, chains):
    cif = write_structure(tmp_path / "whole.cif", chains[:1]).read_text()
    cut = tmp_path / "cut.cif"
    cut.write_text(cif[: int(len(cif) * 0.7)] + "\nATOM 9999 C CA")  # cut mid-row
    with pytest.raises(StructureError, match="cannot parse"):
        read_structure(cut)
    pdb_gz = write_structure(tmp_path / "whole.pdb.gz", chains[:1]).read_bytes()
    cut_gz = tmp_path / "cut.pdb.gz"
    cut_gz.write_bytes(_truncate(pdb_gz))
    with pytest.raises(StructureError, match="gzip"):
        read_structure(cut_gz)
    pdb = write_structure(tmp_path / "whole.pdb", chains[:1]).read_text()
    cut_pdb = tmp_path / "cut.pdb"
    cut_pdb.write_text(pdb[: pdb.index("ATOM      3") + 35])  # the last record stops mid-line
    with pytest.raises(StructureError, match="cannot parse"):
        read_structure(cut_pdb)


def test_dna_only_and_missing(tmp_path):
    with pytest.raises(StructureError, match="no protein chain"):
        read_structure(_full_structure(tmp_path, with_dna=True, with_protein=False))
    with pytest.raises(StructureError, match="file not found"):
        read_structure(tmp_path / "missing.pdb")


def test_write_ca_pdb(tmp_path, chains):
    c = chains[0]
    path = write_ca_pdb(tmp_path / "sample.pdb", c.ca, title="flash-genie sample")
    lines = path.read_text().splitlines()
    atoms = [line for line in lines if line.startswith("ATOM")]
    assert len(atoms) == len(c) and atoms[0][12:16] == " CA " and atoms[0][17:20] == "GLY"
    assert lines[-1].startswith("END") and any(line.startswith("TER") for line in lines)
    (read,) = read_structure(path)
    np.testing.assert_allclose(read.ca, c.ca, atol=1e-3)
    assert read.sequence == "G" * len(c)
    with_seq = read_structure(write_ca_pdb(tmp_path / "seq.pdb", c.ca, c.sequence))[0]
    assert with_seq.sequence == c.sequence
    for bad, match in [(np.full((4, 3), np.nan), "NaN"), (np.zeros((4, 2)), "shape"), (np.full((4, 3), 1e5), "PDB format")]:
        with pytest.raises(ValueError, match=match):
            write_ca_pdb(tmp_path / "bad.pdb", bad)
    with pytest.raises(ValueError, match="letters"):
        write_ca_pdb(tmp_path / "bad.pdb", c.ca, "AC")


def test_genie_coords_and_layout(tmp_path, chains):
    # Genie's training files: comma-separated N, CA, C rows per residue (text, named .npy).
    for name, folder in [("scope", tmp_path / "scope" / "coords"), ("extra", tmp_path / "extra_coords")]:
        folder.mkdir(parents=True)
        for c in chains[:2]:
            backbone = np.repeat(c.ca, 3, axis=0) + np.tile([[-1.0, 0, 0], [0, 0, 0], [1.0, 0, 0]], (len(c), 1))
            np.savetxt(folder / f"{name}_{c.name}.npy", backbone, delimiter=",")
    files = genie_layout_files(tmp_path, ["scope"])
    assert [f.parent.name for f in files] == ["coords", "coords"]
    read = read_genie_layout(tmp_path, None)
    assert len(read) == 4 and all(set(c.sequence) == {"X"} for c in read)
    np.testing.assert_allclose(read[0].ca, chains[0].ca, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="nothere"):
        genie_layout_files(tmp_path, ["nothere"])
    # Genie's sampler writes one Cα row per residue, %.3f.
    sample = write_genie_coords(tmp_path / "64_0.npy", chains[0].ca)
    np.testing.assert_allclose(read_genie_coords(sample, atoms_per_residue=1).ca, chains[0].ca, atol=1e-3)
    bad = tmp_path / "bad.npy"
    bad.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(StructureError, match="multiple of 3"):
        read_genie_coords(bad)
    bad.write_text("1,2\n")
    with pytest.raises(StructureError, match="3 columns"):
        read_genie_coords(bad)
    bad.write_text("a,b,c\n")
    with pytest.raises(StructureError, match="comma-separated"):
        read_genie_coords(bad)


def _write_npz(path, chains):
    ca = np.concatenate([np.round(c.ca * 100) for c in chains]).astype(np.int16)
    lengths = np.array([len(c) for c in chains], dtype=np.int32)
    np.savez(path, ca_centi_angstrom=ca, lengths=lengths, starts=np.cumsum(lengths) - lengths,
             names=np.array([c.name for c in chains]), sequences=np.array([c.sequence for c in chains]))


def test_npz_chains(tmp_path, chains):
    _write_npz(tmp_path / "c.npz", chains)
    read = list(read_npz_chains(tmp_path / "c.npz"))
    assert [c.name for c in read] == [c.name for c in chains]
    for got, want in zip(read, chains):
        assert got.sequence == want.sequence
        np.testing.assert_allclose(got.ca, want.ca, atol=0.006)
    np.savez(tmp_path / "bad.npz", lengths=np.zeros(1))
    with pytest.raises(StructureError, match="missing arrays"):
        list(read_npz_chains(tmp_path / "bad.npz"))
    np.savez(tmp_path / "objects.npz", **{k: np.array([None]) for k in ("ca_centi_angstrom", "starts", "lengths", "names", "sequences")})
    with pytest.raises(StructureError, match="not a readable"):
        list(read_npz_chains(tmp_path / "objects.npz"))


def write_structure_db(path, chains, *, version=VERSION, cut: int | None = None):
    """A StructureDB v2 file as documented in flash_genie.data.structure_db and ../shared/DATA.md
    section 2 (N, CA, C, O in 0.01 Å); each entry gets its own first residue number and shift,
    which the reader must not apply."""
    out = bytearray(struct.pack("<ii", MAGIC, version))
    out += bytes(ENTRIES_OFFSET - len(out))  # the type-size checks, not interpreted by the reader
    out += struct.pack("<Q", len(chains))
    offset = 0
    for i, c in enumerate(chains):
        pdb_id, chain_id = c.name.split("_")
        for text in (pdb_id, chain_id):
            out += struct.pack("<I", len(text)) + text.encode()
        out += struct.pack("<IHh3f", offset, len(c), 1 - 7 * i, 1.5 + i, -2.5, 3.5 * i)
        offset += len(c)
    out += struct.pack("<Q", offset) + "".join(c.sequence for c in chains).encode()
    atoms = np.concatenate([np.stack([c.ca - 1, c.ca, c.ca + 1, c.ca + 2], axis=1) for c in chains])
    out += struct.pack("<Q", offset) + np.round(atoms * 100).astype("<i2").tobytes()
    out += struct.pack("<Q", offset) + bytes(offset * 4)  # a further per-residue array, ignored
    path.write_bytes(bytes(out[:cut]))
    return path


def test_structure_db(tmp_path, chains):
    read = list(read_structure_db(write_structure_db(tmp_path / "db.dat", chains)))
    assert [c.name for c in read] == [c.name for c in chains]
    for got, want in zip(read, chains):
        assert got.sequence == want.sequence
        np.testing.assert_allclose(got.ca, want.ca, atol=0.006)


def test_structure_db_bad(tmp_path, chains):
    with pytest.raises(StructureError, match="version"):
        list(read_structure_db(write_structure_db(tmp_path / "v3.dat", chains, version=3)))
    whole = write_structure_db(tmp_path / "db.dat", chains).stat().st_size
    for cut in (ENTRIES_OFFSET + 20, whole // 2):
        with pytest.raises(StructureError, match="truncated"):
            list(read_structure_db(write_structure_db(tmp_path / "cut.dat", chains, cut=cut)))


def _write_npz_chains(path, chains):
    """``chains`` in the layout of ``../shared/data/pdb_chains_ca.npz`` (int16 Cα in 0.01 Å)."""
    lengths = np.array([len(c) for c in chains], dtype=np.int64)
    np.savez(path, ca_centi_angstrom=np.round(np.concatenate([c.ca for c in chains]) * 100).astype(np.int16),
             starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths=lengths,
             names=np.array([c.name for c in chains]), sequences=np.array([c.sequence for c in chains]))
    return path


def test_structure_db_of_real_chains_equals_their_npz(tmp_path):
    """What the real promod3-data file is checked for (below), on a StructureDB file built here:
    every chain read from it equals, to the bit, the same chain read from the npz layout.
    The chains are 60 real PDB chains of the built-in dataset."""
    ds = builtin_dataset()
    chains = [ds.chain(i) for i in range(0, len(ds), len(ds) // 60)]
    from_db = list(read_structure_db(write_structure_db(tmp_path / "structure_db.dat", chains)))
    from_npz = list(read_npz_chains(_write_npz_chains(tmp_path / "pdb_chains_ca.npz", chains)))
    assert [c.name for c in from_db] == [c.name for c in from_npz] == [c.name for c in chains]
    for db, npz, chain in zip(from_db, from_npz, chains):
        assert db.sequence == npz.sequence == chain.sequence
        assert db.ca.dtype == np.float32
        np.testing.assert_array_equal(db.ca, npz.ca)
        np.testing.assert_array_equal(db.ca, chain.ca)


REAL_STRUCTURE_DB = ("data/structure_db.dat", "/usr/share/promod3/loop_data/structure_db.dat")


def test_structure_db_real_file(shared_dir):
    """The real promod3-data file where it is (``../shared/data`` or a promod3-data install; see
    DATA.md section 2) against ``pdb_chains_ca.npz``, which was made from it."""
    found = [shared_dir / p for p in REAL_STRUCTURE_DB if (shared_dir / p).is_file()]
    if not found:
        pytest.skip(f"no structure_db.dat at {', '.join(str(shared_dir / p) for p in REAL_STRUCTURE_DB)} "
                    "(apt-get download promod3-data=3.2.1+ds-6); the file built in the test above stands in")
    path = found[0]
    reference = {c.name: c for c in read_npz_chains(shared_dir / "data" / "pdb_chains_ca.npz")}
    n = 0
    for chain in read_structure_db(path):
        if chain.name in reference:
            np.testing.assert_array_equal(chain.ca, reference[chain.name].ca)
            n += 1
    assert n == len(reference)


def test_chain_validation():
    with pytest.raises(ValueError, match="letters"):
        Chain("x", "AA", np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"\[L, 3\]"):
        Chain("x", "AAA", np.zeros((3, 2)))


def test_gzip_reader_matches_plain(tmp_path, chains):
    plain = write_structure(tmp_path / "p.pdb", chains[:1])
    gz = tmp_path / "p2.pdb.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    np.testing.assert_array_equal(read_structure(gz)[0].ca, read_structure(plain)[0].ca)
