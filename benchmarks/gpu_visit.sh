#!/usr/bin/env bash
# One GPU visit in one command: install without network, build the CUDA
# extension against the carried ThunderKittens, run `pytest -m cuda`, run the
# kernel benchmarks, copy logs and results to $OUT, print a short table last.
# Every step runs even when an earlier one failed (a failed build still
# benchmarks the torch/reference backends and the peers); the exit status is 1
# if any step failed. See benchmarks/README.md for the device-tool call.
#
#   bash benchmarks/gpu_visit.sh [--dry-run]      # from the repository root
#
# Environment (all optional):
#   OUT                 folder for what comes back (device tool); default /tmp/genie-gpu-visit
#   GENIE_TK_CUDA       ON (default): the build fails loudly without nvcc/ThunderKittens
#   THUNDERKITTENS_ROOT default $PWD/.tk (the carried folder)
#   GENIE_BENCH_COMMIT  the commit being measured (the device copy has no .git)
#   BENCH_ARGS          extra arguments for `python -m genie_bench`
#   VISIT_LIMIT_S       seconds the whole visit may take (default 570: one 10-minute call)
#   PYTEST_TIMEOUT_S    cap on `pytest -m cuda` (default 150)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY_RUN=""
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; fi

PY=${PYTHON:-python3}
LOG=${OUT:-/tmp/genie-gpu-visit}
RESULTS=benchmarks/results
VISIT_LIMIT_S=${VISIT_LIMIT_S:-570}
export GENIE_TK_CUDA=${GENIE_TK_CUDA:-ON}
export THUNDERKITTENS_ROOT=${THUNDERKITTENS_ROOT:-$PWD/.tk}
export PYTHONUNBUFFERED=1
mkdir -p "$LOG"
exec > >(tee -a "$LOG/visit.log") 2>&1
TEE_PID=$!

declare -A STATUS=()
FAILED=0

step() { printf '\n=== %s (%ss into the visit)\n' "$1" "$SECONDS"; }

# run NAME LOGFILE CMD...: run CMD, its output also in $LOG/LOGFILE unless that
# is "-" (everything is in visit.log anyway; the device tool returns 8 files at
# most); record pass or fail.
run() {
  local name=$1 logfile=$2
  shift 2
  echo "+ $*"
  if [[ -n "$DRY_RUN" ]]; then STATUS[$name]="dry-run"; return 0; fi
  local sink=/dev/null
  if [[ "$logfile" != - ]]; then sink="$LOG/$logfile"; fi
  if "$@" 2>&1 | tee "$sink"; then
    STATUS[$name]="ok"
  else
    STATUS[$name]="FAILED (exit ${PIPESTATUS[0]}, log $logfile)"
    FAILED=1
  fi
}

step "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: no GPU driver here"; } 2>&1
{ nvcc --version | tail -n 2 || echo "nvcc: not found"; } 2>&1
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPU visible:", torch.cuda.is_available())'

step "carried wheels (.whl) into /tmp/site"
if compgen -G ".whl/*.whl" > /dev/null; then
  run wheels - "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
else
  echo "no .whl/ folder: the peers come from an earlier call's /tmp/site, or are recorded as unavailable"
fi
if [[ -d /tmp/site ]]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi

step "install genie-tk (GENIE_TK_CUDA=$GENIE_TK_CUDA) and flash-genie, no network"
if [[ "$GENIE_TK_CUDA" =~ ^(ON|on|1)$ && ! -f "$THUNDERKITTENS_ROOT/include/kittens.cuh" ]]; then
  echo "warning: no ThunderKittens at $THUNDERKITTENS_ROOT (carry .tk, see benchmarks/README.md); the build will fail"
fi
run build build.log "$PY" -m pip install --no-build-isolation --no-deps -v \
  -e packages/genie-tk -e packages/flash-genie
if [[ "${STATUS[build]}" != ok && -z "$DRY_RUN" ]]; then
  echo "build failed: benchmarking the pure-Python backends from the source tree instead"
  export PYTHONPATH=$PWD/packages/genie-tk/src:$PWD/packages/flash-genie/src${PYTHONPATH:+:$PYTHONPATH}
fi
run backends - "$PY" -c 'import json, genie_tk; print(json.dumps(genie_tk.backends(), indent=1, default=str))'

step "pytest -m cuda"
run pytest pytest-cuda.log timeout "${PYTEST_TIMEOUT_S:-150}" "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider

step "kernel benchmarks"
BENCH=(--out "$RESULTS")
if [[ -z "$DRY_RUN" ]] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "no CUDA device: running the CPU quick suite at two sizes instead, to exercise the pipeline"
  BENCH+=(--device cpu --quick --n 16 32 --name visit-check_cpu)
fi
# Leave a minute for copying and the table; the suite stops starting new cases
# at its budget, and `timeout` is the backstop (the JSON is saved after every case).
budget=$((VISIT_LIMIT_S - SECONDS - 60))
if ((budget < 60)); then budget=60; fi
read -r -a EXTRA <<< "${BENCH_ARGS:-}"
started=$(mktemp)  # results written after this are this visit's
run bench - timeout $((budget + 45)) env PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" -m genie_bench --budget-s "$budget" "${BENCH[@]}" "${EXTRA[@]}"

step "results to $LOG"
latest=$(find "$RESULTS" -maxdepth 1 -name '*.json' -newer "$started" | head -n 1)
if [[ -n "$latest" && -z "$DRY_RUN" ]]; then
  stem=${latest%.json}
  # A run stopped by `timeout` saved its JSON but not its report: write it now.
  [[ -f "$stem.md" && "$stem.md" -nt "$latest" ]] ||
    PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m genie_bench.report "$latest" || true
  cp "$latest" "$stem.md" "$LOG/" 2>/dev/null || true
  # The device tool returns at most 8 files: the plots travel as one archive.
  pngs=("$stem"_*.png)
  if [[ -e "${pngs[0]}" ]]; then tar -czf "$LOG/$(basename "$stem")_plots.tar.gz" -C "$RESULTS" "${pngs[@]##*/}"; fi
  ls -la "$LOG"
fi

step "summary"
for name in wheels build backends pytest bench; do
  printf '  %-9s %s\n' "$name" "${STATUS[$name]:-not run}"
done
if [[ -n "$latest" && -z "$DRY_RUN" ]]; then
  echo
  PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m genie_bench.report --summary "$latest" || true
fi
# Let tee finish visit.log before the device tool collects $OUT.
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null || true
exit "$FAILED"
