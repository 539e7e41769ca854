"""build_dataset: every source kind, filters, report, errors, no overwrite, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flash_genie.data import (
    Chain,
    Dataset,
    DatasetError,
    build_dataset,
    builtin_dataset,
    detect_source,
    split_at_gaps,
)
from flash_genie.data import build as build_module
from flash_genie.data.filters import redundant
from flash_genie.data.writers import write_structure


@pytest.fixture(scope="module")
def chains():
    ds = builtin_dataset()
    return [ds.chain(i) for i in range(6)]


def with_gap(chain: Chain, at: int, shift: float = 10.0) -> Chain:
    """The chain with every residue from ``at`` on moved ``shift`` Å away: one break."""
    ca = chain.ca.copy()
    ca[at:] += np.float32(shift)
    return Chain(chain.name, chain.sequence, ca)


@pytest.fixture
def pdb_folder(tmp_path, chains):
    """Two good files (one gz, one mmCIF with two chains), a DNA-free junk set and a README."""
    src = tmp_path / "pdbs"
    (src / "sub").mkdir(parents=True)
    write_structure(src / "a.pdb.gz", chains[:1])
    write_structure(src / "sub" / "b.cif", chains[1:3])
    (src / "empty.pdb").write_bytes(b"")
    (src / "junk.cif").write_bytes(np.random.default_rng(1).bytes(500))
    (src / "notes.txt").write_text("not a structure")
    return src


def test_build_from_pdb_folder(tmp_path, pdb_folder, chains):
    out = tmp_path / "ds"
    report = build_dataset(pdb_folder, out, min_length=10, max_length=1000)
    print(report)
    assert report.kind == "structures" and report.kept == 3 and report.files_read == 2
    skipped = dict(report.skipped_files)
    assert set(skipped) == {str(pdb_folder / n) for n in ("empty.pdb", "junk.cif", "notes.txt")}
    assert "empty" in skipped[str(pdb_folder / "empty.pdb")]
    assert "skipped files:" in str(report) and "kept: 3" in str(report)
    ds = Dataset.open(out)
    assert ds.names == ["a_A", "b_A", "b_B"]
    for i, want in enumerate(chains[:3]):
        coords, _, seq = ds[i]
        assert seq == want.sequence and coords.dtype == np.float32
        np.testing.assert_allclose(coords, want.ca, atol=1e-3)
    assert isinstance(ds._ca, np.memmap)  # memory-mapped, not read whole
    meta = json.loads((out / "meta.json").read_text())
    assert meta["report"]["kept"] == 3 and meta["filters"]["min_length"] == 10
    assert ds.lengths.tolist() == [len(c) for c in chains[:3]]


def test_length_filter_and_report(tmp_path, pdb_folder, chains):
    lengths = sorted(len(c) for c in chains[:3])
    report = build_dataset(pdb_folder, tmp_path / "ds", min_length=lengths[1], max_length=lengths[1])
    assert report.kept == 1 and report.dropped["too_short"] + report.dropped["too_long"] == 2


def test_gap_split_and_drop(tmp_path, chains):
    broken = with_gap(chains[0], 60)
    pieces = split_at_gaps(broken, 4.2)
    assert [len(p) for p in pieces] == [60, len(broken) - 60]
    assert pieces[0].name == f"{broken.name}/1-60" and pieces[1].sequence == broken.sequence[60:]
    src = write_structure(tmp_path / "broken.pdb", [broken, chains[1]])
    split = build_dataset(src, tmp_path / "split", min_length=50, max_length=1000, gap_mode="split")
    assert split.kept == 3 and split.split_chains == 1
    assert Dataset.open(tmp_path / "split").names == ["broken_A/1-60", f"broken_A/61-{len(broken)}", "broken_B"]
    short = build_dataset(src, tmp_path / "short", min_length=61, max_length=1000, gap_mode="split")
    assert short.kept == 2 and short.dropped["too_short"] == 1  # the 60-residue piece
    drop = build_dataset(src, tmp_path / "drop", min_length=50, max_length=1000, gap_mode="drop")
    assert drop.kept == 1 and drop.dropped["chain_break"] == 1
    nogap = build_dataset(src, tmp_path / "nogap", min_length=50, max_length=1000, max_gap=None)
    assert nogap.kept == 2


def test_dedup(tmp_path, chains):
    c = chains[0]
    mutant = "".join("A" if i % 20 == 0 else s for i, s in enumerate(c.sequence))  # ~95 % identical
    mutant = mutant if mutant != c.sequence else "G" + c.sequence[1:]
    copies = [c, Chain("copy_A", c.sequence, c.ca), Chain("mut_A", mutant, c.ca), chains[1]]
    assert redundant([x.sequence for x in copies], None) == {}
    assert redundant([x.sequence for x in copies], "exact") == {1: "duplicate_sequence"}
    assert redundant([x.sequence for x in copies], 0.9) == {1: "duplicate_sequence", 2: "similar_sequence"}
    assert redundant([x.sequence for x in copies], 1.0) == {1: "duplicate_sequence"}
    unknown = ["X" * 60, "X" * 60]  # no sequence (Genie layout): never merged
    assert redundant(unknown, 0.9) == {}
    with pytest.raises(ValueError, match="dedup"):
        redundant([], 0.5)
    src = write_structure(tmp_path / "dups.cif", copies)
    report = build_dataset(src, tmp_path / "ds", min_length=10, max_length=1000, dedup=0.9)
    assert report.kept == 2 and report.dropped == {"duplicate_sequence": 1, "similar_sequence": 1}


def test_dedup_on_real_sequences_keeps_distinct_chains():
    ds = builtin_dataset()
    # The built-in set was deduplicated at 90 %: clustering it again removes nothing.
    assert redundant(ds.sequences, 0.9) == {}


def test_limit_is_seeded(tmp_path, chains):
    src = write_structure(tmp_path / "six.cif", chains)
    a = build_dataset(src, tmp_path / "a", min_length=10, max_length=1000, limit=3, seed=4)
    build_dataset(src, tmp_path / "b", min_length=10, max_length=1000, limit=3, seed=4)
    assert a.kept == 3 and a.dropped["not_in_random_subset"] == 3
    assert Dataset.open(tmp_path / "a").names == Dataset.open(tmp_path / "b").names


def test_other_sources(tmp_path, chains):
    """npz, StructureDB and Genie-layout sources are detected and built."""
    ca = np.concatenate([np.round(c.ca * 100) for c in chains]).astype(np.int16)
    lengths = np.array([len(c) for c in chains])
    np.savez(tmp_path / "chains.npz", ca_centi_angstrom=ca, lengths=lengths, starts=np.cumsum(lengths) - lengths,
             names=np.array([c.name for c in chains]), sequences=np.array([c.sequence for c in chains]))
    assert detect_source(tmp_path / "chains.npz") == "npz"
    assert build_dataset(tmp_path / "chains.npz", tmp_path / "from_npz", min_length=10, max_length=1000).kept == 6

    genie = tmp_path / "genie" / "cath" / "coords"
    genie.mkdir(parents=True)
    for c in chains[:2]:
        np.savetxt(genie / f"{c.name}.npy", np.repeat(c.ca, 3, axis=0), delimiter=",")
    (genie / "broken.npy").write_text("1,2,3\n")
    assert detect_source(tmp_path / "genie") == "genie"
    report = build_dataset(tmp_path / "genie", tmp_path / "from_genie", min_length=10, max_length=1000)
    assert report.kept == 2 and len(report.skipped_files) == 1 and report.kind == "genie"


def test_structure_db_source(tmp_path, chains):
    import struct

    from flash_genie.data.structure_db import ENTRIES_OFFSET, MAGIC, VERSION

    out = bytearray(struct.pack("<ii", MAGIC, VERSION)) + bytes(ENTRIES_OFFSET - 8)
    out += struct.pack("<Q", 1) + struct.pack("<I", 4) + b"1ABC" + struct.pack("<I", 1) + b"A"
    c = chains[0]
    out += struct.pack("<IHh3f", 0, len(c), 1, 0, 0, 0)
    out += struct.pack("<Q", len(c)) + c.sequence.encode()
    out += struct.pack("<Q", len(c)) + np.round(np.repeat(c.ca[:, None], 4, axis=1) * 100).astype("<i2").tobytes()
    (tmp_path / "db.dat").write_bytes(bytes(out))
    assert detect_source(tmp_path / "db.dat") == "structure_db"
    build_dataset(tmp_path / "db.dat", tmp_path / "ds", min_length=10, max_length=1000)
    assert Dataset.open(tmp_path / "ds").names == ["1ABC_A"]


def test_empty_result_is_an_error(tmp_path, pdb_folder):
    out = tmp_path / "ds"
    with pytest.raises(DatasetError, match="no chain kept") as err:
        build_dataset(pdb_folder, out, min_length=900, max_length=1000)
    assert "too_short" in str(err.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["pdbs"]  # no temporary left
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.pdb").write_text("nothing\n")
    with pytest.raises(DatasetError, match=r"x\.pdb: no atoms"):
        build_dataset(only_bad, out, min_length=10, max_length=100)


def test_bad_arguments_and_sources(tmp_path, pdb_folder):
    with pytest.raises(FileNotFoundError, match="missing"):
        build_dataset(tmp_path / "missing", tmp_path / "ds")
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(DatasetError, match="not a folder"):
        build_dataset(tmp_path / "x.bin", tmp_path / "ds")
    for kwargs, match in [({"min_length": 0}, "min_length"), ({"max_length": 5, "min_length": 6}, "min_length"),
                          ({"gap_mode": "join"}, "gap_mode"), ({"max_gap": 0}, "max_gap"),
                          ({"dedup": "fuzzy"}, "dedup"), ({"limit": 0}, "limit")]:
        with pytest.raises(ValueError, match=match):
            build_dataset(pdb_folder, tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_no_overwrite_without_flag(tmp_path, pdb_folder):
    out = tmp_path / "ds"
    build_dataset(pdb_folder, out, min_length=10, max_length=1000)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DatasetError, match="already exists"):
        build_dataset(pdb_folder, out, min_length=10, max_length=100)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    report = build_dataset(pdb_folder, out, min_length=10, max_length=1000, dedup=None, overwrite=True)
    assert report.kept == 3 and Dataset.open(out).meta["filters"]["dedup"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "pdbs"]  # old copy removed
    not_a_dataset = tmp_path / "precious"
    not_a_dataset.mkdir()
    (not_a_dataset / "thesis.tex").write_text("do not delete")
    with pytest.raises(DatasetError, match="not a flash-genie dataset"):
        build_dataset(pdb_folder, not_a_dataset, min_length=10, max_length=1000, overwrite=True)
    assert (not_a_dataset / "thesis.tex").read_text() == "do not delete"


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_write(tmp_path, pdb_folder, monkeypatch, existing):
    """A failure while writing leaves ``out`` as it was (absent, or the old dataset)."""
    out = tmp_path / "ds"
    if existing:
        build_dataset(pdb_folder, out, min_length=10, max_length=1000)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else None
    real = build_module.write_dataset_files

    def fail_midway(folder, *args, **kwargs):
        real(folder, *args, **kwargs)  # the files are there, under the temporary name ...
        raise OSError("disk full")  # ... and then the build fails

    monkeypatch.setattr(build_module, "write_dataset_files", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        build_dataset(pdb_folder, out, min_length=10, max_length=1000, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ds", "pdbs"] if existing else ["pdbs"])
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_dataset_open_errors(tmp_path, pdb_folder):
    with pytest.raises(DatasetError, match="does not exist"):
        Dataset.open(tmp_path / "none")
    out = tmp_path / "ds"
    build_dataset(pdb_folder, out, min_length=10, max_length=1000)
    (out / "names.txt").write_text("only_one\n")
    with pytest.raises(DatasetError, match="inconsistent"):
        Dataset.open(out)
    (out / "names.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing names\.txt"):
        Dataset.open(out)
    ds = builtin_dataset()
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
    assert ds[-1][1] == ds.names[-1]


def test_build_from_shared_npz(shared_dir, tmp_path):
    """The full 20,182-chain npz of ../shared: the counts per length bin of DATA.md come out."""
    report = build_dataset(shared_dir / "data" / "pdb_chains_ca.npz", tmp_path / "ds",
                           min_length=100, max_length=149, max_gap=5.2, dedup=None)
    print(report)
    assert report.chains_read == 20182 and report.split_chains == 0  # gap-free at 5.2 Å
    assert report.kept == 4178 and report.dropped["too_short"] == 2929
