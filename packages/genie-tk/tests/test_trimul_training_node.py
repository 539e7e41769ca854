"""The torch backend's tri-mul trains through one memory-efficient autograd node.

Its values and gradients against the reference are covered by ``test_backends.py``
(float64, both directions, masks, hypothesis shapes, gradcheck); here: what it keeps for
backward, its row chunking, and autocast.
"""

from __future__ import annotations

import pytest
import torch

from genie_tk import torch_backend
from genie_tk.testing import TRI_MUL, build, force_efficient, forward_backward, pair_mask, rel


@pytest.fixture(autouse=True)
def _efficient_path(monkeypatch):
    """The node at every size here (small calls otherwise run plain autograd)."""
    force_efficient(monkeypatch)


def _saved_bytes(module, z, mask) -> int:
    """Bytes autograd keeps for backward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(z, mask=mask)
    return sum(seen.values())


@pytest.mark.parametrize("cls", TRI_MUL, ids=lambda c: c.__name__)
def test_training_node_keeps_input_and_contraction_only(cls):
    c, ch, n = 16, 24, 20
    z = torch.randn(2, n, n, c, requires_grad=True)
    mask = pair_mask(2, n, 2, 0.1, seed=1, dtype=torch.float32)
    modules = {b: build(cls, c, ch, 0, seed=2, dtype=torch.float32, backend=b) for b in ("torch", "reference")}
    kept = {b: _saved_bytes(m, z, mask) for b, m in modules.items()}
    pairs = 2 * n * n
    print({b: f"{v / pairs:.0f} B/pair" for b, v in kept.items()})
    # z (C), the mask and the contraction x (Ch) in float32, and the stacked a/b weights
    weights = sum(p.numel() * 4 for p in modules["torch"].parameters())
    assert kept["torch"] <= pairs * 4 * (c + 1 + ch) + weights
    assert kept["reference"] > 4 * kept["torch"]


@pytest.mark.parametrize("outgoing", [True, False])
def test_row_chunks_do_not_change_the_result(outgoing):
    module = build(TRI_MUL[0], 8, 6, 0, seed=3)
    weights = (module.layer_norm_in.weight, module.layer_norm_in.bias, *module._input_projections(),
               module.layer_norm_out.weight, module.layer_norm_out.bias, module.linear_z.weight,
               module.linear_z.bias, module.linear_g.weight, module.linear_g.bias)
    z = torch.randn(2, 11, 11, 8, dtype=torch.float64, requires_grad=True)
    mask = pair_mask(2, 11, 2, 0.2, seed=4)
    cot = torch.randn(2, 11, 11, 8, dtype=torch.float64)
    results = []
    for chunk in (None, 1, 4):
        out = torch_backend.TriangleMultiplicationLayer.apply(z, mask, outgoing, 1e-5, chunk, *weights)
        results.append((out, *torch.autograd.grad((out * cot).sum(), (z, *weights))))
    for other in results[1:]:
        assert max(rel(a, b) for a, b in zip(other, results[0])) <= 1e-14


@pytest.mark.parametrize("cls", TRI_MUL, ids=lambda c: c.__name__)
def test_bfloat16_autocast_error_within_twice_reference(cls):
    """Under CPU bf16 autocast the node's output and input gradient are as accurate as
    plain autograd on the reference (the flash-attention rule, against float64)."""
    z = torch.randn(1, 24, 24, 16, dtype=torch.float64)
    mask = pair_mask(1, 24, 3, 0.1, seed=5)
    cot = torch.randn_like(z)
    o64, g64, _ = forward_backward(build(cls, 16, 8, 0, seed=6, backend="reference"), z, mask, cot)
    errs = {}
    for backend in ("reference", "torch"):
        module = build(cls, 16, 8, 0, seed=6, dtype=torch.float32, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, gz, _ = forward_backward(module, z.float(), mask.float(), cot.float())
        assert o.dtype == torch.bfloat16 and gz.dtype == torch.float32
        errs[backend] = (rel(o, o64), rel(gz, g64))
    print(cls.__name__, errs)
    for i in range(2):
        assert errs["torch"][i] <= 2 * errs["reference"][i] + 1e-6
