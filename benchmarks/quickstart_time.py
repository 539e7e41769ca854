"""The quick start as a user runs it: ``flash-genie train`` (no config) in a fresh process, timed.

Records the whole command's wall time, the training part (from its first line to the line that
names the final checkpoint; also the sum of the steps' own ``seconds`` in ``metrics.jsonl``), the
sampling and evaluation after it, the final loss, and the evaluation's mean Cα–Cα step of the
samples against real chains (``samples/evaluation/summary.json``). The thread count is set with
``OMP_NUM_THREADS`` for the child; the load average before and after is kept, since CPU times on a
shared machine move with it.

    python benchmarks/quickstart_time.py --threads 2         # the README's quick start, 400 steps
    python benchmarks/quickstart_time.py --steps 20 --quick  # a check of the script itself

Files: ``benchmarks/results/quickstart_cpu_<date>[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from genie_bench import results  # noqa: E402
from genie_bench.env import environment  # noqa: E402

from flash_genie.cli import QUICKSTART  # noqa: E402

SCHEMA = "flash-genie-quickstart-time/1"
PRESET_STEPS = int(next(ln.split()[1] for ln in QUICKSTART.splitlines() if ln.startswith("maximumSteps ")))


def run_quickstart(out: Path, threads: int, steps: int | None = None) -> dict:
    """Run ``flash-genie train --out OUT`` (``--max-steps`` if ``steps``) in a fresh process on
    the CPU with ``threads`` threads; the timings and results of that run."""
    cmd = [sys.executable, "-m", "flash_genie.cli", "train", "--out", str(out), "--device", "cpu", "--no-progress"]
    if steps is not None:
        cmd += ["--max-steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    load_before = os.getloadavg()[0]
    marks: dict[str, float] = {}
    lines = []
    start = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            now = time.perf_counter() - start
            lines.append(line.rstrip("\n"))
            if line.startswith("training "):
                marks.setdefault("training_started_s", now)
            elif line.startswith("checkpoint: "):
                marks.setdefault("training_done_s", now)
    total = time.perf_counter() - start
    if proc.returncode != 0 or len(marks) != 2:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n" + "\n".join(lines[-30:]))
    steps_log = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    tail = [s["loss"] for s in steps_log[-max(1, len(steps_log) // 8):]]
    summary = json.loads((out / "samples" / "evaluation" / "summary.json").read_text())
    return {
        "command": " ".join(["flash-genie", *cmd[3:]]),
        "threads": threads,
        "steps": len(steps_log),
        "total_s": total,
        "training_s": marks["training_done_s"] - marks["training_started_s"],
        "steps_sum_s": sum(s["seconds"] for s in steps_log),
        "sampling_and_evaluation_s": total - marks["training_done_s"],
        "final_loss": sum(tail) / len(tail),
        "samples": summary["n_samples"],
        "step_mean_samples": summary["overall"]["samples"]["step_mean"],
        "step_mean_reference": summary["overall"]["reference"]["step_mean"],
        "load_avg_1min": [load_before, os.getloadavg()[0]],
    }


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def markdown(doc: dict) -> str:
    lines = [f"### The quick start, `flash-genie train`, on the CPU (commit {doc['environment']['commit']['hash'][:10]}, "
             f"{doc['environment']['device']['cpu']}, torch {doc['environment']['torch']})", "",
             "| threads | steps | whole command | training | sampling + evaluation | final loss | "
             "Cα–Cα step, samples (Å) | real chains (Å) | load average before / after |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["results"]:
        samples, real = r["step_mean_samples"], r["step_mean_reference"]
        lines.append(f"| {r['threads']} | {r['steps']} | {_minutes(r['total_s'])} | {_minutes(r['training_s'])} | "
                     f"{_minutes(r['sampling_and_evaluation_s'])} | {r['final_loss']:.3f} | "
                     f"{samples[0]:.2f} ± {samples[1]:.2f} | {real[0]:.2f} ± {real[1]:.2f} | "
                     f"{r['load_avg_1min'][0]:.1f} / {r['load_avg_1min'][1]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the run (default 2)")
    ap.add_argument("--steps", type=int, help=f"training steps (default: the preset's {PRESET_STEPS})")
    ap.add_argument("--quick", action="store_true", help="mark the result as a quick run")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        row = run_quickstart(Path(tmp) / "quickstart", args.threads, args.steps)
    doc = {"schema": SCHEMA, "environment": environment(torch.device("cpu")),
           "config": {"preset": "quickstart", "preset_steps": PRESET_STEPS, "threads": args.threads}, "results": [row]}
    results.write(doc, markdown(doc), args.out, results.stem("quickstart_cpu", args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
