"""Repository-wide pytest hooks shared by both packages' test suites.

* GPU tests are marked ``cuda`` automatically (files named ``*_cuda.py`` and tests
  parametrised with ``device="cuda"``) and skipped where no GPU is present, so CI
  runs ``-m "not cuda"`` and a GPU visit runs ``-m cuda``.
* Without a GPU, ``TRITON_INTERPRET=1`` is set before anything imports genie_tk, so
  the ``triton`` backend's kernels run under Triton's interpreter on CPU tensors.
* ``shared_dir`` points at the project's ``../shared`` folder (reference fixtures
  and data) and skips cleanly when it is absent, as on a user's machine. Tests
  that use it are marked ``crosstest`` (``nox -s crosstest`` runs them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent


def _interpret_triton_without_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_gpu()


def _shared_dir() -> Path:
    env = os.environ.get("GENIE_SHARED_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared"


def _wants_cuda(item: pytest.Item) -> bool:
    if Path(str(item.fspath)).stem.endswith("_cuda"):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("device") == "cuda"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "shared_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.crosstest)
        if _wants_cuda(item):
            item.add_marker(pytest.mark.cuda)
            if not has_cuda:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared folder (fixtures, data); skips when it is absent."""
    path = _shared_dir()
    if not (path / "fixtures").is_dir():
        pytest.skip(f"reference data not found at {path} (set GENIE_SHARED_DIR to use it)")
    return path
