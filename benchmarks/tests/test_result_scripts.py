"""The scripts behind the flash-genie README's figures read what the commands print and tabulate it.

Running them costs minutes (a full quick start, seven distributed launches); CI already runs
``check-parallel`` itself (packages/flash-genie/tests/parallel), so here: their parsing and tables.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]

# What rank 0 of `flash-genie check-parallel --nproc 2` printed in one run.
CHECK_OUTPUT = """\
flash-genie check-parallel: 2 processes = data 1 × sequence 2, gloo, float64, 21 residues (rows 11+10), batch 2, \
2 micro-batches per data rank
check                   outputs    gradients   (max relative difference)
pair stack            4.529e-16    1.811e-15
structure (IPA)       0.000e+00    2.945e-15
training step         1.894e-15    1.732e-15
tolerance 1e-09: OK
"""


def _load(name: str):
    sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_parallel_output_is_parsed_and_tabulated():
    bench = _load("check_parallel_errors")
    parsed = bench.parse("torchrun noise\n" + CHECK_OUTPUT)
    assert parsed["rows"] == "11+10" and parsed["backend"] == "gloo" and parsed["ok"] is True
    assert parsed["tolerance"] == 1e-9
    assert parsed["checks"]["pair stack"] == {"outputs": 4.529e-16, "gradients": 1.811e-15}
    assert parsed["checks"]["structure (IPA)"]["outputs"] == 0.0
    row = {"nproc": 2, "sp": 2, "data": 1, "dtype": "float64", "length": 21, **parsed}
    table = bench.markdown({"environment": {"commit": {"hash": "0123456789abc"}}, "results": [row]})
    assert "| 2 | 1 × 2 | 21 (11+10) | float64 | 4.5e-16 / 1.8e-15 | 0 / 2.9e-15 | 1.9e-15 / 1.7e-15 | 1e-09 OK |" in table
    assert "FAILED" in bench.markdown({"environment": {"commit": {"hash": "0"}},
                                       "results": [{**row, "ok": False}]})
    with pytest.raises(ValueError, match="not the output of a finished check-parallel run"):
        bench.parse(CHECK_OUTPUT.replace("training step", "training"))


def test_check_parallel_rows_are_valid_layouts():
    bench = _load("check_parallel_errors")
    for nproc, sp, dtype, length in bench.ROWS:
        assert nproc % sp == 0 and length >= sp and dtype in ("float64", "float32")


def test_quickstart_table():
    bench = _load("quickstart_time")
    assert bench.PRESET_STEPS == 400  # read from the preset the command runs
    row = {"threads": 2, "steps": 400, "total_s": 125.4, "training_s": 61.0, "sampling_and_evaluation_s": 64.4,
           "final_loss": 1.1234, "step_mean_samples": [12.5, 2.5], "step_mean_reference": [3.80, 0.01],
           "load_avg_1min": [0.2, 1.9]}
    doc = {"environment": {"commit": {"hash": "0123456789abc"}, "device": {"cpu": "x"}, "torch": "2"},
           "results": [row]}
    assert ("| 2 | 400 | 2 min 05 s | 1 min 01 s | 1 min 04 s | 1.123 | 12.50 ± 2.50 | 3.80 ± 0.01 | 0.2 / 1.9 |"
            in bench.markdown(doc))
