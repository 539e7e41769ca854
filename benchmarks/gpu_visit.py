"""The GPU visit, staged: each stage its own process under its own timeout.

A lent GPU comes rarely and for minutes, and its machine starts bare. This
script spends them in the order that localises a failure: device facts, the
carried prebuilt wheels (no compiling there), the TMA plumbing, each kernel
family against its emulation on the same CUDA tensors, compute-sanitizer's
racecheck and synccheck on the smallest cases, only then the whole
``pytest -m cuda`` (per-kernel tests first) and the triton tests, and the
benchmarks only if all of that passed. It stops at the first failure. When a
kernel stage fails in the normal build it runs again once with the
``GENIE_TK_DEBUG`` build, whose bounded barrier waits turn a hang into a
printed ``genie_tk hang: ... block .. warpgroup .. barrier .. phase .. step ..``
line and a trap. Every stage prints a one-line verdict; the full log
(``visit.log``) and the result (``visit.json``) go into ``--out``, and a short
table comes last.

    python benchmarks/gpu_visit.py --plan            # the stages, their timeouts, the total
    python benchmarks/gpu_visit.py --out "$OUT"      # the visit (from the repository root)

Options: ``--wheels DIR`` (``dist-gpu``: ``normal/`` and ``debug/`` hold the
cp312 wheels from ``benchmarks/build_gpu_wheels.sh``), ``--only A,B`` /
``--from NAME`` (a second visit resumes), ``--timeout NAME=SECONDS``,
``--total-s`` (the budget the plan must fit; the benchmark stage gets whatever
of it the earlier stages left), ``--python``, ``--no-debug-build`` (only the
normal wheel carried: no debug reruns). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = "packages/genie-tk/tests"
KERNEL_TESTS = f"{TESTS}/test_tk_kernels_cuda.py"
SCHEMA = "genie-gpu-visit/1"
TOTAL_S = 540  # one 9-minute call, leaving a minute of a 10-minute one for transfers
RESERVE_S = 20  # kept back from the flexible stage for writing the results
INSTALL_ROOT = "/tmp/genie-visit"  # the wheels are installed into <root>/<build>


@dataclass
class Stage:
    """One step of the visit.

    ``command`` is an argv list or a bash script (str). ``build`` is the genie-tk
    build whose install is put first on ``PYTHONPATH`` ("normal", "debug" or None
    for stages that do not import it). ``debug_rerun``: on failure, run once more
    with the debug build. ``flexible``: the timeout grows to what is left of the
    total budget. ``no_tests_ok``: pytest's "no tests collected" (exit 5) passes.
    """

    name: str
    description: str
    timeout_s: float
    command: list[str] | str
    build: str | None = "normal"
    debug_rerun: bool = False
    flexible: bool = False
    no_tests_ok: bool = False


@dataclass
class Result:
    name: str
    status: str  # pass, fail, timeout, skipped (not run: an earlier stage failed), not-selected
    timeout_s: float
    wall_s: float = 0.0
    rc: int | None = None
    summary: str = ""
    build: str | None = None
    debug_rerun: dict | None = field(default=None)


def _pytest(python: str, *args: str) -> list[str]:
    return [python, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *args]


def _sanitizer(python: str, tool: str, selection: str) -> str:
    """compute-sanitizer on the N=17 kernel cases, only genie-tk's kernels checked
    when this compute-sanitizer can filter by kernel name."""
    test = shlex.join(_pytest(python, KERNEL_TESTS, "-k", selection))
    return (
        f"opts=(--tool {tool} --error-exitcode 86 --print-limit 30)\n"
        "if compute-sanitizer --help 2>&1 | grep -q -- '--kernel-name'; then opts+=(--kernel-name kns=genie_tk); fi\n"
        'echo "+ compute-sanitizer ${opts[*]}"\n'
        f'compute-sanitizer "${{opts[@]}}" {test}\n'
    )


def stages(python: str = "python3", wheels: str = "dist-gpu", debug_build: bool = True) -> list[Stage]:
    """The visit's stages, in order (the issue's (1) to (8)). ``debug_build=False``:
    only the normal wheel is carried, and failed kernel stages are not rerun."""
    facts = (
        "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || exit 1\n"
        "nvcc --version | tail -n 2 || true\n"
        "compute-sanitizer --version | head -n 2 || echo 'compute-sanitizer: not found'\n"
        f"{python} - <<'EOF'\n"
        "import sys, torch\n"
        "print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda)\n"
        "assert torch.cuda.is_available(), 'torch sees no GPU'\n"
        "p = torch.cuda.get_device_properties(0)\n"
        "print(p.name, 'sm_%d%d' % (p.major, p.minor), p.multi_processor_count, 'SMs',\n"
        "      round(p.total_memory / 2**30, 1), 'GiB')\n"
        "try:\n"
        "    import triton; print('triton', triton.__version__)\n"
        "except ImportError as exc:\n"
        "    print('triton: not importable', exc)\n"
        "EOF\n"
    )
    install = (
        "set -e\n"
        f"for build in {'normal debug' if debug_build else 'normal'}; do\n"
        f"  whl=$(ls {wheels}/$build/genie_tk-*.whl 2>/dev/null | head -n 1)\n"
        f'  if [ -z "$whl" ]; then echo "no wheel in {wheels}/$build: build it with '
        'benchmarks/build_gpu_wheels.sh and carry the folder"; exit 1; fi\n'
        f'  want=$(cat "$(dirname "$whl")/kernels.sha256" 2>/dev/null || echo none); '
        "have=$(bash benchmarks/kernel_sources_hash.sh)\n"
        '  if [ "$want" != "$have" ]; then echo "$whl was built from other kernel sources '
        '($want, this tree: $have): rebuild with benchmarks/build_gpu_wheels.sh"; exit 1; fi\n'
        f"  rm -rf {INSTALL_ROOT}/$build\n"
        f'  {python} -m pip install -q --no-index --no-deps --no-compile --target {INSTALL_ROOT}/$build "$whl"\n'
        "  # The Python side from this tree (a newer backend, e.g. triton, counts), the\n"
        "  # compiled _C from the wheel, whose kernel sources are this tree's (checked above).\n"
        f"  cp -r packages/genie-tk/src/genie_tk/. {INSTALL_ROOT}/$build/genie_tk/\n"
        f'  PYTHONPATH={INSTALL_ROOT}/$build {python} - "$build" <<\'EOF\'\n'
        "import json, sys\n"
        "import genie_tk\n"
        "from genie_tk import _C\n"
        "print(genie_tk.__file__, json.dumps(_C.info()))\n"
        "assert _C.driver_status() == '', _C.driver_status()\n"
        "assert _C.info()['debug'] == (sys.argv[1] == 'debug'), 'the wrong build in this folder'\n"
        "EOF\n"
        "done\n"
        "if ls .whl/*.whl >/dev/null 2>&1; then\n"
        f"  {python} -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl\n"
        "fi\n"
        f"PYTHONPATH={INSTALL_ROOT}/normal:$PYTHONPATH {python} -c "
        "\"import genie_tk, json; print(json.dumps(genie_tk.backends(), default=str))\"\n"
    )
    small = "N17 and bf16 and (d32 or ABt or c64)"
    rerun = debug_build
    return [
        Stage("facts", "(1) device, driver, toolkit, torch", 15, facts, build=None),
        Stage("install", "carried cp312 wheels (normal, debug) and peer wheels, no build", 40, install, build=None),
        Stage("tile-copy", "(2) TMA round trip tile_copy_sm90", 35,
              _pytest(python, f"{TESTS}/test_build.py", "-m", "cuda", "-k", "tile_copy"), debug_rerun=rerun),
        Stage("attention-fwd", "(3) attention forward vs emulation, N=17/130, odd I", 45,
              _pytest(python, KERNEL_TESTS, "-k", "attention_forward"), debug_rerun=rerun),
        Stage("attention-bwd", "(4) delta, dq/dk/dv, dbias vs emulation", 50,
              _pytest(python, KERNEL_TESTS, "-k", "attention_backward"), debug_rerun=rerun),
        Stage("trimul", "(5) tri-mul contract/input/output vs emulation, N=17/100", 50,
              _pytest(python, KERNEL_TESTS, "-k", "trimul"), debug_rerun=rerun),
        Stage("racecheck", "(6) compute-sanitizer racecheck, N=17", 45, _sanitizer(python, "racecheck", small)),
        Stage("synccheck", "(6) compute-sanitizer synccheck, N=17", 35, _sanitizer(python, "synccheck", small)),
        Stage("pytest-cuda", "(7) pytest -m cuda, per-kernel tests first", 150,
              # Two runs, so that the per-kernel tests come first (pytest orders the
              # files of a directory itself); flash-genie's tests need gemmi to be
              # collected (carried in .whl/).
              "rc=0\n"
              + shlex.join(_pytest(python, "-m", "cuda", KERNEL_TESTS, f"{TESTS}/test_build.py")) + " || rc=$?\n"
              f"fg=packages/flash-genie/tests\n{python} -c 'import gemmi' 2>/dev/null || "
              "{ echo 'gemmi is not importable: flash-genie tests left out (carry its wheel in .whl/)'; fg=; }\n"
              + shlex.join(_pytest(python, "-m", "cuda", TESTS, f"--ignore={KERNEL_TESTS}",
                                   f"--ignore={TESTS}/test_build.py", "-k", "not triton"))
              + " $fg || { r=$?; [ $rc -eq 0 ] && rc=$r; }\nexit $rc\n"),
        Stage("triton", "(7) pytest -m cuda -k triton (the triton backend)", 30,
              _pytest(python, "-m", "cuda", TESTS, "-k", "triton"), no_tests_ok=True),
        Stage("bench", "(8) kernel benchmarks (genie_bench), only after (7) passed", 45,
              "budget=$(( ${VISIT_STAGE_TIMEOUT_S%.*} - 25 )); [ $budget -lt 20 ] && budget=20\n"
              f"{python} -m genie_bench --budget-s $budget --out \"$VISIT_OUT\" --no-plots ${{BENCH_ARGS:-}}\n",
              flexible=True),
    ]


def plan_text(plan: Sequence[Stage], total_s: float) -> str:
    """The stages, their timeouts and the total, as ``--plan`` prints them."""
    lines = [f"{'stage':<14} {'timeout':>8}  description"]
    for s in plan:
        extra = " (+ one rerun with the debug build on failure)" if s.debug_rerun else ""
        extra += " (grows to what the earlier stages left)" if s.flexible else ""
        lines.append(f"{s.name:<14} {s.timeout_s:>7.0f}s  {s.description}{extra}")
    worst = sum(s.timeout_s for s in plan)
    lines.append(f"{'total':<14} {worst:>7.0f}s  of a {total_s:.0f} s budget "
                 f"({'fits' if worst <= total_s else 'DOES NOT FIT'}; a debug rerun replaces the stages after it)")
    return "\n".join(lines)


def _summary(output: str) -> str:
    """The line that says what a stage found: the first FAILED / hang line, else
    pytest's last summary line, else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for pattern in (r"^genie_tk hang:", r"^(FAILED|ERROR) ", r"ERROR SUMMARY: [1-9]", r"RuntimeError|CUDA error"):
        for ln in lines:
            if re.search(pattern, ln):
                return ln[:200]
    for ln in reversed(lines):
        if re.search(r"\d+ (passed|failed|skipped|deselected|error)|no tests ran", ln):
            return ln.strip("= ")[:200]
    return lines[-1][:200] if lines else ""


def run_process(command: list[str] | str, timeout_s: float, env: dict[str, str], log) -> tuple[int | None, str, bool]:
    """Runs ``command`` in its own process group, its output passed line by line
    to ``log``; returns (exit code or None, output, timed out). A process past
    its timeout is killed with its whole group (a wedged CUDA context does not
    outlive it)."""
    argv = ["bash", "-c", command] if isinstance(command, str) else list(command)
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    chunks: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            chunks.append(line)
            log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    reader.join(timeout=5)
    proc.stdout.close()
    return (None if timed_out else proc.returncode), "".join(chunks), timed_out


def _env(build: str | None, timeout_s: float) -> dict[str, str]:
    env = dict(os.environ)
    paths = [] if build is None else [f"{INSTALL_ROOT}/{build}"]
    paths += [str(ROOT / "packages/flash-genie/src"), str(ROOT / "benchmarks"), "/tmp/site"]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env.update(PYTHONPATH=":".join(paths), PYTHONUNBUFFERED="1", VISIT_STAGE_TIMEOUT_S=str(int(timeout_s)))
    env.setdefault("VISIT_OUT", "/tmp/genie-gpu-visit")
    return env


Runner = Callable[[list[str] | str, float, dict[str, str], Callable[[str], None]], tuple[int | None, str, bool]]


def run_visit(plan: Sequence[Stage], out: Path, total_s: float = TOTAL_S, runner: Runner = run_process,
              selected: set[str] | None = None, env_for: Callable[[str | None, float], dict[str, str]] = _env) -> list[Result]:
    """Runs the stages in order, stops at the first failure, writes
    ``out/visit.log`` and ``out/visit.json``; returns one Result per stage."""
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "visit.log").open("w")

    def log(text: str) -> None:
        log_file.write(text)
        log_file.flush()
        sys.stdout.write(text)

    start = time.monotonic()
    results: list[Result] = []
    failed = False
    for number, stage in enumerate(plan, 1):
        if selected is not None and stage.name not in selected:
            results.append(Result(stage.name, "not-selected", stage.timeout_s))
            continue
        if failed:
            results.append(Result(stage.name, "skipped", stage.timeout_s, summary="an earlier stage failed"))
            continue
        timeout = stage.timeout_s
        if stage.flexible:
            timeout = max(stage.timeout_s, total_s - (time.monotonic() - start) - RESERVE_S)
        log(f"\n=== stage {number} {stage.name}: {stage.description} (timeout {timeout:.0f} s, "
            f"{time.monotonic() - start:.0f} s into the visit)\n")
        result = _run_stage(stage, stage.build, timeout, runner, log, env_for)
        if result.status != "pass" and stage.debug_rerun and stage.build == "normal":
            log(f"\n=== stage {number} {stage.name} again with the GENIE_TK_DEBUG build (bounded waits)\n")
            rerun = _run_stage(stage, "debug", stage.timeout_s, runner, log, env_for)
            result.debug_rerun = {"status": rerun.status, "rc": rerun.rc, "wall_s": rerun.wall_s,
                                  "summary": rerun.summary}
        results.append(result)
        line = f"VERDICT {stage.name:<14} {result.status.upper():<8} {result.wall_s:6.1f}s  {result.summary}"
        if result.debug_rerun:
            line += f"  | debug build: {result.debug_rerun['status']}: {result.debug_rerun['summary']}"
        log(line + "\n")
        failed = result.status != "pass"
        _write_json(out, results, plan, total_s, time.monotonic() - start)
    _write_json(out, results, plan, total_s, time.monotonic() - start)
    log("\n" + table(results) + "\n")
    log_file.close()
    return results


def _run_stage(stage: Stage, build: str | None, timeout: float, runner: Runner, log, env_for) -> Result:
    t0 = time.monotonic()
    rc, output, timed_out = runner(stage.command, timeout, env_for(build, timeout), log)
    wall = time.monotonic() - t0
    if timed_out:
        status = "timeout"
        summary = _summary(output) + f" (killed after {timeout:.0f} s)"
    elif rc == 0 or (stage.no_tests_ok and rc == 5):
        status = "pass"
        summary = _summary(output) if rc == 0 else "no tests collected"
    else:
        status = "fail"
        summary = f"exit {rc}: " + _summary(output)
    return Result(stage.name, status, timeout, round(wall, 1), rc, summary.strip(), build)


def _write_json(out: Path, results: list[Result], plan: Sequence[Stage], total_s: float, elapsed: float) -> None:
    doc = {
        "schema": SCHEMA,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": os.environ.get("GENIE_BENCH_COMMIT", ""),
        "total_budget_s": total_s,
        "elapsed_s": round(elapsed, 1),
        "verdict": "fail" if any(r.status in ("fail", "timeout") for r in results) else "pass",
        "stages": [
            {"name": r.name, "description": next(s.description for s in plan if s.name == r.name),
             "status": r.status, "timeout_s": round(r.timeout_s), "wall_s": r.wall_s, "rc": r.rc,
             "build": r.build, "summary": r.summary, "debug_rerun": r.debug_rerun}
            for r in results
        ],
    }
    (out / "visit.json").write_text(json.dumps(doc, indent=1) + "\n")


def table(results: Sequence[Result]) -> str:
    """The short table printed last."""
    lines = [f"{'stage':<14} {'status':<12} {'wall':>7}  summary", "-" * 72]
    for r in results:
        status = r.status + ("*" if r.debug_rerun else "")
        lines.append(f"{r.name:<14} {status:<12} {r.wall_s:6.1f}s  {r.summary[:90]}")
    if any(r.debug_rerun for r in results):
        lines.append("* rerun with the GENIE_TK_DEBUG build: see the VERDICT line and visit.log")
    return "\n".join(lines)


def _parse_timeouts(items: Sequence[str], plan: Sequence[Stage]) -> None:
    names = {s.name: s for s in plan}
    for item in items:
        name, _, value = item.partition("=")
        if name not in names or not value:
            raise SystemExit(f"--timeout takes NAME=SECONDS with NAME one of {', '.join(names)}, got {item!r}")
        names[name].timeout_s = float(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", action="store_true", help="print the stages, timeouts and total, run nothing")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/genie-gpu-visit"))
    parser.add_argument("--wheels", default="dist-gpu", help="folder with normal/ and debug/ cp312 wheels")
    parser.add_argument("--no-debug-build", action="store_true",
                        help="only the normal wheel was carried: no debug reruns")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--total-s", type=float, default=TOTAL_S)
    parser.add_argument("--only", default="", help="comma-separated stage names to run")
    parser.add_argument("--from", dest="start", default="", help="run from this stage on")
    parser.add_argument("--timeout", action="append", default=[], metavar="NAME=SECONDS")
    args = parser.parse_args(argv)

    plan = stages(args.python, args.wheels, debug_build=not args.no_debug_build)
    _parse_timeouts(args.timeout, plan)
    names = [s.name for s in plan]
    selected: set[str] | None = None
    if args.only:
        selected = set(args.only.split(","))
    if args.start:
        if args.start not in names:
            parser.error(f"--from must be one of {', '.join(names)}")
        selected = set(names[names.index(args.start):]) & (selected or set(names))
    unknown = (selected or set()) - set(names)
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(names)}")
    chosen = [s for s in plan if selected is None or s.name in selected]
    if args.plan:
        print(plan_text(chosen, args.total_s))
        return 0
    results = run_visit(plan, args.out, args.total_s, selected=selected)
    return 0 if all(r.status in ("pass", "not-selected") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
