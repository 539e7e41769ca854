"""Exactness against real OpenFold outputs (``../shared/fixtures/openfold_reference``).

Every module, forward and every gradient, float64, for the ``reference`` and
``torch`` backends, each tensor held to about 5x the largest relative error
measured over all fixtures and both backends (see ``TOLERANCE``). Skips when
``../shared`` is absent; ``test_backends.py`` covers the same properties without it.
"""

from __future__ import annotations

import pytest
import torch

import genie_tk
from genie_tk.testing import force_efficient, rel

# Relative error bounds per tensor, about 5x the largest measured (torch 2.13.0 CPU, fp64, over
# every fixture and both backends; one thread, two threads lower): output 6.1e-16, grad_z 1.0e-15,
# parameter gradients 3.7e-15 (a LayerNorm bias), chunked output 4.7e-16.
TOLERANCE = {"output": 3e-15, "grad_z": 5e-15, "grad_params": 2e-14}

FILES = [
    f"{cls}_{cfg}.pt"
    for cls, cfgs in {
        "TriangleMultiplicationOutgoing": ("small", "af2"),
        "TriangleMultiplicationIncoming": ("small", "af2"),
        "TriangleAttentionStartingNode": ("small", "af2", "oddhead"),
        "TriangleAttentionEndingNode": ("small", "af2", "oddhead"),
        "FusedTriangleMultiplicationOutgoing": ("small",),
        "FusedTriangleMultiplicationIncoming": ("small",),
    }.items()
    for cfg in cfgs
]


@pytest.fixture(scope="module")
def fixtures(shared_dir):
    root = shared_dir / "fixtures" / "openfold_reference"
    return {name: torch.load(root / name, weights_only=True) for name in FILES}


@pytest.mark.parametrize("backend", ["reference", "torch", "torch-efficient"])
@pytest.mark.parametrize("name", FILES)
def test_matches_openfold(fixtures, name, backend, monkeypatch):
    """``torch-efficient``: the torch backend forced onto its chunked path (these small
    fixtures otherwise run its plain path)."""
    if backend == "torch-efficient":
        force_efficient(monkeypatch)
        backend = "torch"
    fx = fixtures[name]
    module = getattr(genie_tk, fx["class"])(**fx["init_kwargs"]).double()
    module.load_state_dict(fx["state_dict"], strict=True)
    module.backend = backend
    for attr, value in fx["module_attrs"].items():
        if attr in ("starting", "inf", "_outgoing"):
            assert getattr(module, attr) == value, attr
    z = fx["inputs"]["z"].clone().requires_grad_(True)
    out = module(z, mask=fx["inputs"]["mask"])
    (out * fx["cotangent"]).sum().backward()
    errors = {"output": rel(out, fx["output"]), "grad_z": rel(z.grad, fx["grad_z"])}
    for pname, p in module.named_parameters():
        errors[pname] = rel(p.grad, fx["grad_params"][pname])
    assert set(dict(module.named_parameters())) == set(fx["grad_params"])
    print(f"{name} [{backend}]", " ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    over = {k: v for k, v in errors.items() if v > TOLERANCE.get(k, TOLERANCE["grad_params"])}
    assert not over, f"relative errors above {TOLERANCE}: {over}"
    assert genie_tk.last_backend(
        "triangle_attention_layer" if "Attention" in fx["class"] else "triangle_multiplicative_update"
    ) == backend


@pytest.mark.parametrize("name", [f for f in FILES if f.startswith("TriangleAttention")])
def test_attention_chunking_matches_openfold(fixtures, name):
    fx = fixtures[name]
    module = getattr(genie_tk, fx["class"])(**fx["init_kwargs"]).double()
    module.load_state_dict(fx["state_dict"])
    out = module(fx["inputs"]["z"], mask=fx["inputs"]["mask"], chunk_size=4)
    err = rel(out, fx["output"])
    print(f"{name} chunk_size=4: output {err:.1e}")
    assert err <= TOLERANCE["output"]


def test_mask_none_equals_all_ones(fixtures):
    fx = fixtures["TriangleAttentionStartingNode_small.pt"]
    module = genie_tk.TriangleAttentionStartingNode(**fx["init_kwargs"]).double()
    module.load_state_dict(fx["state_dict"])
    z = fx["inputs"]["z"]
    assert torch.equal(module(z), module(z, mask=torch.ones(z.shape[:-1], dtype=z.dtype)))
