"""benchmarks/builtin_quality.py: the target checks on made-up rows, and a smoke run of the whole
script on the committed built-in snapshot (2 samples, a 3-step schedule, no ProteinMPNN: mechanics only)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]


def _load():
    sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location("builtin_quality", HERE / "builtin_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(**values):
    base = {"step_mean": 3.80, "clashes": 0.0, "rg_ratio": 1.1, "helix": 0.4, "strand": 0.2, "novelty": 0.5,
            "mpnn_nll": 1.0, "mpnn_top_aa": 0.15}
    return {**base, **values}


def test_targets_pass_and_fail():
    bench = _load()
    reference = [_row(rg_ratio=1.0, strand=0.2), _row(rg_ratio=1.2, strand=0.3)]  # Rg 1.1 ± 0.1, strand 0.25
    good = [_row(step_mean=3.79), _row(step_mean=3.83)] * 10
    status = {t["target"]: t["status"] for t in bench.check_targets(good, reference, {"samples": {"mean_pairwise_tm": 0.4}})}
    assert status == {"Cα step mean": "pass", "Cα step spread": "pass", "no clash": "pass", "Rg ratio": "pass",
                      "helix + strand": "pass", "strand": "pass", "diversity": "pass",
                      "novelty (max TM to training chains)": "reported", "mpnn_nll (designability proxy)": "reported",
                      "commonest residue share of the designs": "reported"}
    # each target fails on its own
    cases = {
        "Cα step mean": [_row(step_mean=3.86)] * 20,
        "Cα step spread": [_row(step_mean=3.5), _row(step_mean=4.1)] * 10,  # mean 3.80, sd 0.3
        "no clash": [_row()] * 18 + [_row(clashes=1.0)] * 2,  # 90 % clean
        "Rg ratio": [_row(rg_ratio=1.25)] * 20,
        "helix + strand": [_row(helix=0.3, strand=0.15)] * 20,
        "strand": [_row(helix=0.6, strand=0.12)] * 20,  # below 0.25 / 2
    }
    for target, rows in cases.items():
        failed = [t["target"] for t in bench.check_targets(rows, reference, {"samples": {"mean_pairwise_tm": 0.4}})
                  if t["status"] == "FAIL"]
        assert failed == [target], (target, failed)
    failed = [t["target"] for t in bench.check_targets(good, reference, {"samples": {"mean_pairwise_tm": 0.61}})
              if t["status"] == "FAIL"]
    assert failed == ["diversity"]


def test_defaults_are_the_committed_evaluation():
    bench = _load()
    assert len(bench.LENGTHS) * bench.NUM >= 32 and min(bench.LENGTHS) == 50 and max(bench.LENGTHS) == 128
    assert bench.recommended_noise_scale() == 0.6  # flash-genie sample's default


def test_smoke_run_on_the_builtin_snapshot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    bench = _load()
    out = tmp_path / "q"
    assert bench.main(["--num", "1", "--lengths", "50", "64", "--timesteps", "3", "--mpnn-sequences", "0",
                       "--reference-per-bin", "1", "--out", str(out)]) == 0
    doc = json.loads((out / "quality.json").read_text())
    assert doc["quick"] and doc["config"]["timesteps"] == 3 and doc["config"]["n_samples"] == 2
    assert doc["model"]["name"] == "builtin" and len(doc["targets"]) == 10
    assert all(t["status"] in ("pass", "FAIL", "reported") for t in doc["targets"])
    assert (out / "samples.png").read_bytes()[:4] == b"\x89PNG" and (out / "reference.png").is_file()
    assert (out / "samples" / "evaluation" / "metrics.csv").is_file()
    assert "Quick run" in (out / "quality.md").read_text()
    printed = capsys.readouterr().out
    assert "Cα step mean" in printed and "results in" in printed
