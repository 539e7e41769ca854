"""``python -m genie_bench``: run the kernel suite, write JSON, markdown and plots.

Defaults depend on the device: on a GPU N = 256, 512, 1024, 2048 in bfloat16 and
float32; on a CPU small N in float32. ``--quick`` shrinks both (a CPU run takes
about a minute). Files go to ``--out`` (default ``benchmarks/results``) as
``kernels_<device>_<date>[_quick].{json,md}`` and ``..._<op>_<dtype>.png``; the
short table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: spinning worker threads stall each other whenever
# the machine has other work (seen here: 15x slower medians at load 4 on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from . import kernels, report, schema
from .cases import OPS, PASSES
from .env import REPO_ROOT, device_info, slug
from .timing import TimingConfig

MIB = 1 << 20

# (N, dtypes, timing) per (device type, quick)
DEFAULTS = {
    ("cuda", False): ((256, 512, 1024, 2048), ("bfloat16", "float32"), TimingConfig(0.05, 0.2, 5, 500, 0)),
    ("cuda", True): ((256, 512), ("bfloat16",), TimingConfig(0.02, 0.05, 5, 100, 0)),
    ("cpu", False): ((64, 128, 256, 384), ("float32", "bfloat16"), TimingConfig(0.1, 1.0, 5, 100, 64 * MIB)),
    ("cpu", True): ((32, 64, 128, 192), ("float32",), TimingConfig(0.05, 0.3, 3, 50, 32 * MIB)),
}


def _timing(device: torch.device, args: argparse.Namespace) -> TimingConfig:
    t = DEFAULTS[(device.type, args.quick)][2]
    rotate = t.rotate_bytes
    if device.type == "cuda":
        # Rotate across twice the L2 (H100: 50 MB) so that no run finds its inputs cached.
        rotate = 2 * (getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 10**6)
    return TimingConfig(t.warmup_s if args.warmup_s is None else args.warmup_s,
                        t.rep_s if args.rep_s is None else args.rep_s,
                        t.min_runs if args.min_runs is None else args.min_runs, t.max_runs, rotate)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m genie_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and short timing")
    ap.add_argument("--ops", nargs="+", choices=sorted(OPS), default=list(OPS))
    ap.add_argument("--n", nargs="+", type=int, help="sequence lengths N (default: by device)")
    ap.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", "float16", "float64"))
    ap.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    ap.add_argument("--methods", nargs="+", help="keep only these methods (default: all found)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    ap.add_argument("--name", help="file stem (default: kernels_<device>_<date>[_quick])")
    ap.add_argument("--budget-s", type=float, help="stop timing new cases after this many seconds (recorded as skipped)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads for CPU runs")
    ap.add_argument("--warmup-s", type=float, help="warm-up seconds per case (at least one call)")
    ap.add_argument("--rep-s", type=float, help="timed seconds per case (at least --min-runs calls)")
    ap.add_argument("--min-runs", type=int, help="fewest timed calls per case")
    ap.add_argument("--no-errors", action="store_true", help="skip the fp64 error check")
    ap.add_argument("--no-plots", action="store_true", help="write JSON and markdown only")
    return ap.parse_args(argv)


def _save(doc: dict, path: Path) -> None:
    """Write ``doc`` to ``path`` atomically: a reader never sees half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    ns, dtypes, _ = DEFAULTS[(device.type, args.quick)]
    cfg = kernels.Config(
        ops=tuple(args.ops), ns=tuple(args.n or ns), dtypes=tuple(args.dtypes or dtypes),
        passes=tuple(args.passes), device=device, timing=_timing(device, args),
        methods=tuple(args.methods) if args.methods else None, errors=not args.no_errors,
        budget_s=args.budget_s, quick=args.quick)
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    stem = args.name or f"kernels_{slug(device_info(device))}_{date}" + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    doc = kernels.run(cfg, log=lambda line: print(line, flush=True), progress=lambda d: _save(d, path))
    _save(doc, path)
    problems = schema.problems(doc)
    plots = not args.no_plots and importlib.util.find_spec("matplotlib") is not None
    written = [path, *report.write(doc, path, with_plots=plots)]
    print("\nwrote " + ", ".join(str(p) for p in written))
    if not plots and not args.no_plots:
        print("no plots: matplotlib is not installed (nox -s bench installs it)")
    print(f"\n{doc['environment']['device']['name']}: {len(doc['results'])} rows in {doc['elapsed_s']:.0f} s\n")
    print(report.pivot(doc))
    if problems:
        print("result does not match result.schema.json:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
