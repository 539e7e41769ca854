"""The distributed-training error table: ``flash-genie check-parallel`` over the process layouts
of packages/flash-genie/README.md ("Checking a machine or a cluster"), one fresh launch per row.

Each row runs ``flash-genie check-parallel --nproc P --sp S --dtype D --length L`` (gloo on the
CPU) and records what rank 0 prints: per check (pair stack, structure net with IPA, one training
step through DDP) the largest relative difference ``max|parallel - single| / max|single|`` of the
outputs and of the gradients, the tolerance and the verdict.

    python benchmarks/check_parallel_errors.py              # every row (about 10 minutes on 2 cores)
    python benchmarks/check_parallel_errors.py --rows 0 5 --quick

Files: ``benchmarks/results/check_parallel_cpu_<date>[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads on a shared machine

import torch  # noqa: E402
from genie_bench import results  # noqa: E402
from genie_bench.env import environment  # noqa: E402

SCHEMA = "flash-genie-check-parallel/1"
CHECKS = ("pair stack", "structure (IPA)", "training step")
# (processes, sequence-parallel size, dtype, residues): the README table's rows.
ROWS = (
    (2, 2, "float64", 21),
    (2, 1, "float64", 21),
    (4, 2, "float64", 21),
    (4, 4, "float64", 21),
    (2, 2, "float64", 9),
    (2, 2, "float32", 21),
    (4, 2, "float32", 9),
)
_HEADER = re.compile(r"flash-genie check-parallel: .*?, (\w+), (float\d+), (\d+) residues \(rows ([\d+]+)\)")
_CHECK = re.compile(r"^(pair stack|structure \(IPA\)|training step)\s+(\S+)\s+(\S+)", re.M)
_VERDICT = re.compile(r"^tolerance (\S+): (OK|FAILED)", re.M)


def parse(output: str) -> dict:
    """The figures of one ``check-parallel`` run from what it printed."""
    header = _HEADER.search(output)
    verdict = _VERDICT.search(output)
    checks = {m.group(1): {"outputs": float(m.group(2)), "gradients": float(m.group(3))}
              for m in _CHECK.finditer(output)}
    if header is None or verdict is None or set(checks) != set(CHECKS):
        raise ValueError(f"not the output of a finished check-parallel run:\n{output}")
    return {"backend": header.group(1), "rows": header.group(4), "checks": checks,
            "tolerance": float(verdict.group(1)), "ok": verdict.group(2) == "OK"}


def run_row(nproc: int, sp: int, dtype: str, length: int, timeout_s: float = 900) -> dict:
    """One fresh ``flash-genie check-parallel`` launch; its figures, exit status and wall time."""
    cmd = [sys.executable, "-m", "flash_genie.cli", "check-parallel", f"--nproc={nproc}", f"--sp={sp}",
           f"--dtype={dtype}", f"--length={length}", "--backend=gloo", f"--timeout={timeout_s}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    row = {"nproc": nproc, "sp": sp, "data": nproc // sp, "dtype": dtype, "length": length,
           "command": " ".join(["flash-genie", *cmd[3:]]), "returncode": done.returncode,
           "seconds": time.perf_counter() - start}
    row.update(parse(done.stdout))
    return row


def _figure(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def markdown(doc: dict) -> str:
    lines = [f"### flash-genie check-parallel on the CPU (gloo; commit "
             f"{doc['environment']['commit']['hash'][:10]})", "",
             "Largest relative difference `max|parallel - single| / max|single|`, outputs / gradients "
             "(gradients over all parameters as one vector).", "",
             "| processes | data × sequence | residues (rows per rank) | dtype | pair stack (out / grad) | "
             "structure, IPA (out / grad) | training step (out / grad) | tolerance |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["results"]:
        cells = [f"{_figure(r['checks'][c]['outputs'])} / {_figure(r['checks'][c]['gradients'])}" for c in CHECKS]
        lines.append(f"| {r['nproc']} | {r['data']} × {r['sp']} | {r['length']} ({r['rows']}) | {r['dtype']} | "
                     + " | ".join(cells) + f" | {r['tolerance']:.0e} {'OK' if r['ok'] else 'FAILED'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", help=f"indices into ROWS (default: all {len(ROWS)})")
    ap.add_argument("--quick", action="store_true", help="mark the result as a quick run")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    rows = []
    doc = {"schema": SCHEMA, "environment": environment(torch.device("cpu")),
           "config": {"rows": [ROWS[i] for i in (args.rows or range(len(ROWS)))]}, "results": rows}
    for nproc, sp, dtype, length in doc["config"]["rows"]:
        print(f"{nproc} processes, sp {sp}, {dtype}, {length} residues ...", flush=True)
        rows.append(run_row(nproc, sp, dtype, length))
    results.write(doc, markdown(doc), args.out, results.stem("check_parallel_cpu", args.quick))
    return 0 if all(r["ok"] and r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
