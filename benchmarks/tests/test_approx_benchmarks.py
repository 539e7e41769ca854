"""The approximate-mode benchmarks on small inputs: a training-step measurement per kind of
mode, the exponent fit, and one quality run (a few training steps, short sampling)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fit_exponent_recovers_power_laws():
    bench = _load("approx_modes")
    lengths = [512, 1024, 2048]
    assert math.isclose(bench.fit_exponent(lengths, [3.0 * n for n in lengths]), 1.0)
    assert math.isclose(bench.fit_exponent(lengths, [0.5 * n**2 for n in lengths]), 2.0)
    assert bench.fit_exponent([512], [1.0]) is None


@pytest.mark.parametrize("mode", ["factorized r=2 + sparse k=32", "axial attention",
                                  "ultra_long_training (as written)"])
def test_training_step_child(mode):
    bench = _load("approx_modes")
    row = bench.child_step(mode, 24, small=True)
    assert row["peak_tensor_mib"] > 0 and row["step_s"] > 0
    if mode.endswith("(as written)"):  # the config's own memory defaults, nothing added
        assert row["memory_options"]["ipa_chunk_size"] == "auto" and row["memory_options"]["checkpointing"] == "all"
    else:
        assert row["memory_options"]["ipa_chunk_size"] == 64


def test_quality_run_and_table(tmp_path):
    bench = _load("approx_quality")
    row = bench.run_mode("sparse k=16", 2, 1, tmp_path, numTimesteps=20)
    assert row["steps"] == 2 and math.isfinite(row["final_loss"])
    assert row["samples"]["step_mean"] is not None and row["reference"]["step_mean"][0] == pytest.approx(3.8, abs=0.1)
    doc = {"config": {"steps": 2, "samples": 2}, "environment": {"commit": {"hash": "0123456789abc"}},
           "results": [row]}
    table = bench.markdown(doc)
    assert "| sparse k=16 |" in table and "| real chains (reference) |" in table
