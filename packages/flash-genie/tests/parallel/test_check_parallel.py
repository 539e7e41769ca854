"""``flash-genie check-parallel`` on CPU with gloo: sequence parallelism and DDP against one
process (outputs and gradients of the pair stack, the structure net and a training step).

Each test launches the command as a user would (torchrun's launcher, a free local port);
the first is the one CI must run: 2 processes, one sequence group, float64.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from flash_genie.cli import main

CHECKS = ("pair stack", "structure (IPA)", "training step")


def check_parallel(*args: str) -> tuple[int, dict[str, tuple[float, float]], str]:
    """Run the command; returns its exit status, ``{check: (outputs, gradients)}`` and stdout."""
    proc = subprocess.run([sys.executable, "-m", "flash_genie.cli", "check-parallel", *args],
                          capture_output=True, text=True, timeout=300)
    print(proc.stdout)
    figures = {}
    for name in CHECKS:
        match = re.search(rf"^{re.escape(name)}\s+(\S+)\s+(\S+)$", proc.stdout, re.MULTILINE)
        if match is None:
            pytest.fail(f"no '{name}' line; exit {proc.returncode}; stderr:\n{proc.stderr[-4000:]}")
        figures[name] = (float(match[1]), float(match[2]))
    return proc.returncode, figures, proc.stdout


def test_two_processes_one_sequence_group_float64():
    code, figures, out = check_parallel("--nproc", "2")
    assert "data 1 × sequence 2" in out and "rows 11+10" in out  # uneven blocks
    assert code == 0 and "tolerance 1e-09: OK" in out
    assert all(v <= 1e-9 for pair in figures.values() for v in pair)


def test_data_times_sequence_grid_and_the_exit_status_beyond_tolerance():
    # 2 data × 2 sequence ranks, 2 micro-batches each: DDP, accumulation and sequence
    # parallelism at once. The differences are rounding, never all zero at 9 residues, so a
    # zero tolerance must fail while every figure stays within float64's bound of 1e-9.
    code, figures, out = check_parallel("--nproc", "4", "--sp", "2", "--length", "9", "--tolerance", "0")
    assert "data 2 × sequence 2" in out and "rows 5+4" in out and "accumulation:" not in out
    values = [v for pair in figures.values() for v in pair]
    assert all(v <= 1e-9 for v in values) and max(values) > 0
    assert code != 0 and "tolerance 0e+00: FAILED" in out


@pytest.mark.parametrize("args", [["--nproc", "3", "--sp", "2"], ["--nproc", "2", "--length", "1"],
                                  ["--nproc", "2", "--tolerance", "-1"]])
def test_impossible_layouts_are_refused_before_launching(args, capsys):
    assert main(["check-parallel", *args]) == 2
    assert "flash-genie check-parallel: error:" in capsys.readouterr().err


def test_split_sizes_and_shards():
    from flash_genie.parallel import SequenceShard, split_sizes

    assert split_sizes(21, 2) == [11, 10] and split_sizes(21, 4) == [6, 5, 5, 5] and split_sizes(8, 4) == [2] * 4
    shards = [SequenceShard(21, rank, 4) for rank in range(4)]
    assert [s.rows for s in shards] == [slice(0, 6), slice(6, 11), slice(11, 16), slice(16, 21)]
    with pytest.raises(ValueError, match="at least one residue per rank"):
        SequenceShard(3, 0, 4)
