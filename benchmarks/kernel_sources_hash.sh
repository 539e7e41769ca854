#!/usr/bin/env bash
# One hash over everything genie_tk._C is compiled from (csrc/ but its notes, CMakeLists.txt,
# cmake/), printed on stdout. build_gpu_wheels.sh stores it beside each wheel;
# the GPU visit's install stage recomputes it on the device's copy of the tree
# and refuses a wheel built from other kernel sources. Run from the repository root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../packages/genie-tk"
find csrc cmake CMakeLists.txt -type f ! -name '*.md' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
