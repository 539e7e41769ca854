#!/usr/bin/env bash
# What CI runs (.ci/run calls this): the README's test command on a clean checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv-ci
# shellcheck disable=SC1091
. .venv-ci/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "nox>=2024.10"

# The README's test command.
nox -s lint tests
