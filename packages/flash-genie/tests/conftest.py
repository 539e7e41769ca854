"""Shared fixtures of flash-genie's tests.

Fixture-based tests (``genie_reference``) compare with the original Genie's
recorded outputs in ``../shared/fixtures/genie_reference`` and skip when that
folder is absent (the root ``shared_dir`` fixture); the root conftest marks
them ``crosstest``. Everything else builds small random models and needs
nothing outside the repository.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from flash_genie import Config, Denoiser, load_genie

REFERENCE_NAMES = ("scope_l_128", "tiny", "tiny_triatt")

TINY_CONFIG = """\
name test_tiny
singleFeatureDimension 24
pairFeatureDimension 16
positionalEmbeddingDimension 12
timestepEmbeddingDimension 10
relativePositionK 4
numPairTransformLayers 1
includeTriangularAttention True
triangularMultiplicativeHiddenDimension 8
triangularAttentionHiddenDimension 6
triangularAttentionNumHeads 2
pairTransitionN 2
numStructureLayers 2
numStructureBlocks 2
ipaHiddenDimension 4
ipaNumHeads 3
ipaNumQkPoints 2
ipaNumVPoints 3
numStructureTransitionLayers 1
numTimesteps 100
"""

#: Training keys of the trainer and command-line tests: 24-residue chains of the builtin
#: dataset, 6 steps of 3 chains (2 of learning-rate warm-up), a checkpoint every 2 steps, float32;
#: and TINY_CONFIG lightened to one structure layer without triangle attention, which makes a
#: step 3x cheaper (the 60-step training test stays quick; the trainer needs no depth).
TINY_TRAINING = {
    "includeTriangularAttention": False,
    "numStructureLayers": 1,
    "numStructureBlocks": 1,
    "maximumNumResidues": 24,
    "minimumNumResidues": 20,
    "batchSize": 3,
    "learningRate": 1e-3,
    "seed": 5,
    "maximumSteps": 6,
    "checkpointEverySteps": 2,
    "warmupSteps": 2,
    "gradientClipVal": 1.0,
    "precision": "fp32",
}


def report(label: str, actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Print and return the max absolute difference."""
    err = (actual - expected).abs()
    worst = err.max().item() if err.numel() else 0.0
    mean = err.mean().item() if err.numel() else 0.0
    print(f"{label}: max |Δ| = {worst:.3e}, mean |Δ| = {mean:.3e}, max |ref| = {expected.abs().max().item():.3e}")
    return worst


def assert_close(label, actual, expected, atol, rtol):
    """``torch.testing.assert_close`` after printing the errors."""
    report(label, actual, expected)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@pytest.fixture(scope="session")
def genie_reference(shared_dir):
    """``genie_reference(name)``: the contents of ``<name>.pt`` (cached)."""
    folder = shared_dir / "fixtures" / "genie_reference"

    @functools.cache
    def load(name: str) -> dict:
        return torch.load(folder / f"{name}.pt", weights_only=True)

    load.folder = folder
    return load


@pytest.fixture(scope="session")
def reference_model(genie_reference):
    """``reference_model(name, dtype)``: the fixture's weights in a fresh model (cached; do not mutate)."""

    @functools.cache
    def build(name: str, dtype: torch.dtype = torch.float64) -> Denoiser:
        ref = genie_reference(name)
        return load_genie(ref["config_text"], ref["state_dict"], dtype=dtype)

    return build


@pytest.fixture
def tiny_config() -> Config:
    return Config.from_text(TINY_CONFIG)


@pytest.fixture(scope="session")
def training_config():
    """``training_config(**overrides)``: a fresh :data:`TINY_CONFIG` with :data:`TINY_TRAINING`,
    and ``overrides`` (file keys, e.g. ``maximumSteps=2``) on top."""

    def build(**overrides) -> Config:
        return Config.from_text(TINY_CONFIG).replace(**{**TINY_TRAINING, **overrides})

    return build


def random_model(config: Config, seed: int = 0, dtype=torch.float64) -> Denoiser:
    """A model with every parameter perturbed, so no zero-initialised layer hides a bug."""
    torch.manual_seed(seed)
    model = Denoiser.from_config(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def random_chain(batch: int, n_res: int, lengths, seed: int = 0, dtype=torch.float64):
    """``(x, mask)``: random-walk Cα traces (3.8 Å steps) with prefix masks, centred, zero at padding."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(batch, n_res, 3, generator=g, dtype=dtype)
    steps = 3.8 * steps / steps.norm(dim=-1, keepdim=True)
    x = torch.cumsum(steps, dim=1)
    mask = (torch.arange(n_res)[None, :] < torch.tensor(lengths)[:, None]).to(dtype)
    x = x - (x * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
    return x * mask[..., None], mask


@pytest.fixture
def helpers() -> SimpleNamespace:
    """The helper functions above (pytest's importlib mode cannot import this conftest)."""
    return SimpleNamespace(
        report=report, assert_close=assert_close, random_model=random_model, random_chain=random_chain
    )
