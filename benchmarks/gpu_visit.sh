#!/usr/bin/env bash
# The GPU visit in one command, staged: benchmarks/gpu_visit.py runs each stage
# (device facts, carried wheels, tile_copy, each kernel family against its
# emulation, compute-sanitizer, pytest -m cuda, triton, benchmarks) as its own
# process under its own timeout, stops at the first failure, reruns a failed
# kernel stage with the GENIE_TK_DEBUG build, and writes visit.log and
# visit.json into $OUT (or --out). See benchmarks/README.md, "GPU visit".
#
#   bash benchmarks/gpu_visit.sh --plan       # stages, timeouts, total
#   bash benchmarks/gpu_visit.sh              # the visit, from the repository root
#
# Environment: PYTHON (default python3), OUT, GENIE_BENCH_COMMIT (the commit
# being measured: the device copy has no .git), BENCH_ARGS (extra arguments of
# `python -m genie_bench`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
exec "$PY" benchmarks/gpu_visit.py --python "$PY" "$@"
