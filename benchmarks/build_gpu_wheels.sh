#!/usr/bin/env bash
# Builds the two cp312 wheels of genie-tk that a GPU visit carries, so that no
# device minute goes to compiling: the normal build and the GENIE_TK_DEBUG
# build (bounded barrier waits that report and trap, -lineinfo). Run from the
# repository root on a machine with nvcc >= 12.3 and a Python 3.12:
#
#   bash benchmarks/build_gpu_wheels.sh [PYTHON3.12]
#
# PYTHON3.12 (default: the pyenv 3.12 found by `pyenv prefix 3.12`) needs
# scikit-build-core, nanobind, cmake >= 3.26 and ninja; ThunderKittens comes
# from THUNDERKITTENS_ROOT (default $PWD/.tk, see ../shared/GPU.md). Output:
#   dist-gpu/normal/genie_tk-*.whl, dist-gpu/debug/genie_tk-*.whl
# and beside each wheel kernels.sha256, the hash of the kernel sources it was
# built from (benchmarks/kernel_sources_hash.sh), which the visit checks
# against its own tree before it trusts the wheel
# (dist-gpu/ is ignored by git; name it in the device tool's `carry`). Each
# build keeps its CMake tree in build/gpu-wheels/<kind> (ignored) so a rebuild
# recompiles only what changed. Both wheels import without a GPU driver.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${1:-}
if [[ -z "$PY" ]]; then
  PY="$(pyenv prefix 3.12 2>/dev/null)/bin/python" || true
fi
if ! "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  echo "build_gpu_wheels.sh: need a Python 3.12 (the GPU machine's), got '$PY'" >&2
  exit 2
fi
export THUNDERKITTENS_ROOT=${THUNDERKITTENS_ROOT:-$PWD/.tk}
if [[ ! -f "$THUNDERKITTENS_ROOT/include/kittens.cuh" ]]; then
  echo "build_gpu_wheels.sh: no ThunderKittens at $THUNDERKITTENS_ROOT (see ../shared/GPU.md)" >&2
  exit 2
fi

for kind in ${KINDS:-normal debug}; do
  debug=OFF
  [[ "$kind" == debug ]] && debug=ON
  rm -rf "dist-gpu/$kind"
  mkdir -p "dist-gpu/$kind"
  echo "=== genie-tk wheel, $kind build (GENIE_TK_DEBUG=$debug)"
  GENIE_TK_CUDA=ON GENIE_TK_DEBUG=$debug "$PY" -m pip wheel --no-build-isolation --no-deps -v \
    -C "build-dir=$PWD/build/gpu-wheels/$kind" -w "dist-gpu/$kind" packages/genie-tk
  bash benchmarks/kernel_sources_hash.sh > "dist-gpu/$kind/kernels.sha256"
  ls -la "dist-gpu/$kind"
done
