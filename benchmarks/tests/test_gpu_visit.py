"""benchmarks/gpu_visit.py without a GPU: the plan, and the stage machinery on fake
stages (real subprocesses): stop at the first failure, timeouts that kill, the
debug-build rerun, the flexible last stage, the log, the JSON and the table."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_visit  # noqa: E402
from gpu_visit import Stage, run_visit  # noqa: E402

ISSUE_ORDER = ["facts", "install", "tile-copy", "attention-fwd", "attention-bwd", "trimul", "racecheck",
               "synccheck", "pytest-cuda", "triton", "bench"]


def test_plan_lists_every_stage_in_order_and_fits_one_9_minute_run():
    out = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_visit.sh"), "--plan"], capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}).stdout
    print(out)
    rows = out.strip().splitlines()
    assert [r.split()[0] for r in rows[1:-1]] == ISSUE_ORDER
    timeouts = [float(r.split()[1].rstrip("s")) for r in rows[1:-1]]
    assert rows[-1].startswith("total") and f"{sum(timeouts):.0f}s" in rows[-1]
    assert sum(timeouts) <= 540 and "(fits;" in rows[-1]
    kernels = [r for r in rows if "debug build" in r]
    assert [r.split()[0] for r in kernels] == ["tile-copy", "attention-fwd", "attention-bwd", "trimul"]


def test_plan_from_a_stage_and_bad_names():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_visit.py"), "--plan", "--from", "pytest-cuda"],
                         capture_output=True, text=True, check=True).stdout
    assert [r.split()[0] for r in out.strip().splitlines()[1:-1]] == ["pytest-cuda", "triton", "bench"]
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_visit.py"), "--plan", "--only", "tile-copy,nope"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown stage(s) nope" in bad.stderr
    with pytest.raises(SystemExit, match="--timeout takes NAME=SECONDS"):
        gpu_visit.main(["--plan", "--timeout", "bench"])


def test_stages_run_in_order_and_stop_at_the_first_failure(tmp_path):
    marker = tmp_path / "later-stage-ran"
    plan = [
        Stage("one", "passes", 20, [sys.executable, "-c", "print('3 passed in 0.1s')"], build=None),
        Stage("two", "fails", 20, "echo 'FAILED tests/x.py::test_kernel[N17] - AssertionError: row (0, 3)'; exit 1",
              build=None),
        Stage("three", "must not run", 20, f"touch {marker}", build=None),
    ]
    results = run_visit(plan, tmp_path / "out", total_s=60)
    assert [r.status for r in results] == ["pass", "fail", "skipped"]
    assert not marker.exists()
    assert results[0].summary == "3 passed in 0.1s"
    assert results[1].rc == 1 and "test_kernel[N17]" in results[1].summary
    doc = json.loads((tmp_path / "out/visit.json").read_text())
    assert doc["schema"] == "genie-gpu-visit/1" and doc["verdict"] == "fail"
    assert [s["status"] for s in doc["stages"]] == ["pass", "fail", "skipped"]
    log = (tmp_path / "out/visit.log").read_text()
    assert log.count("VERDICT ") == 2 and "=== stage 3" not in log
    assert log.rstrip().splitlines()[-2].startswith("two ")  # the table comes last


def test_a_hanging_stage_is_killed_and_rerun_with_the_debug_build(tmp_path):
    # The normal build "hangs"; the debug build reports where and traps.
    hang = ("case \"$PYTHONPATH\" in */genie-visit/debug*) "
            "echo 'genie_tk hang: fwd.cuh:151 block 3 warpgroup 1 warp 4 barrier pipeline.ready phase 1 step 2'; "
            "exit 1;; *) sleep 60;; esac")
    plan = [Stage("kernel", "hangs", 1.5, hang, debug_rerun=True), Stage("after", "skipped", 5, "true", build=None)]
    t0 = time.monotonic()
    results = run_visit(plan, tmp_path, total_s=30)
    assert time.monotonic() - t0 < 20
    kernel = results[0]
    assert kernel.status == "timeout" and kernel.rc is None and "killed after 2 s" in kernel.summary
    assert kernel.debug_rerun["status"] == "fail"
    assert kernel.debug_rerun["summary"].startswith("exit 1: genie_tk hang: fwd.cuh:151 block 3 warpgroup 1")
    assert results[1].status == "skipped"
    assert "debug build: fail: exit 1: genie_tk hang" in (tmp_path / "visit.log").read_text()


def test_no_tests_collected_passes_where_allowed_and_the_last_stage_gets_the_time_left(tmp_path):
    plan = [
        Stage("triton", "no tests yet", 10, "exit 5", build=None, no_tests_ok=True),
        Stage("bench", "flexible", 5, 'echo "timeout $VISIT_STAGE_TIMEOUT_S"', build=None, flexible=True),
        Stage("strict", "exit 5 fails here", 10, "exit 5", build=None),
    ]
    results = run_visit(plan, tmp_path, total_s=100)
    assert [r.status for r in results] == ["pass", "pass", "fail"]
    assert results[0].summary == "no tests collected"
    assert 70 <= results[1].timeout_s <= 100 - gpu_visit.RESERVE_S
    assert results[1].summary == f"timeout {int(results[1].timeout_s)}"


def test_only_selected_stages_run(tmp_path):
    plan = [Stage(name, name, 10, "echo '1 passed'", build=None) for name in ("a", "b", "c")]
    results = run_visit(plan, tmp_path, total_s=30, selected={"b"})
    assert [r.status for r in results] == ["not-selected", "pass", "not-selected"]


def test_kernel_sources_hash_names_the_sources_a_wheel_was_built_from():
    """The install stage compares this hash with the one stored beside each wheel."""
    run = [str(ROOT / "benchmarks/kernel_sources_hash.sh")]
    first = subprocess.run(["bash", *run], capture_output=True, text=True, check=True).stdout.strip()
    assert len(first) == 64 and int(first, 16) >= 0
    assert subprocess.run(["bash", *run], capture_output=True, text=True, check=True).stdout.strip() == first
    install = next(s for s in gpu_visit.stages() if s.name == "install").command
    assert "kernels.sha256" in install and "kernel_sources_hash.sh" in install


def test_without_the_debug_build_nothing_is_rerun():
    plan = gpu_visit.stages(debug_build=False)
    assert not any(s.debug_rerun for s in plan)
    install = next(s for s in plan if s.name == "install").command
    assert "for build in normal; do" in install
    assert "for build in normal debug; do" in next(s for s in gpu_visit.stages() if s.name == "install").command
