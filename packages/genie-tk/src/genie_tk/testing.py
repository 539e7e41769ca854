"""Helpers shared by the tests and benchmarks of genie-tk (and its users' tests)."""

from __future__ import annotations

import torch

import genie_tk


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ``||a - b|| / ||b||`` (absolute when ``b`` is zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def perturbed(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised gates and outputs are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def pair_mask(b: int, n: int, n_pad: int, drop: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    """``[b, n, n]`` 0/1 mask: the last ``n_pad`` residues padded (fully masked rows and
    columns) and a fraction ``drop`` of random holes."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, n, dtype=dtype)
    if n_pad:
        mask[:, n - n_pad :, :] = 0
        mask[:, :, n - n_pad :] = 0
    mask[torch.rand(b, n, n, generator=g) < drop] = 0
    return mask


TRI_MUL = (
    genie_tk.TriangleMultiplicationOutgoing,
    genie_tk.TriangleMultiplicationIncoming,
    genie_tk.FusedTriangleMultiplicationOutgoing,
    genie_tk.FusedTriangleMultiplicationIncoming,
)
TRI_ATT = (genie_tk.TriangleAttentionStartingNode, genie_tk.TriangleAttentionEndingNode)


def build(cls, c: int, hidden: int, heads: int, seed: int, dtype=torch.float64, backend=None):
    """A perturbed module of ``cls`` with ``c`` channels."""
    torch.manual_seed(seed)
    m = cls(c, hidden, heads) if cls in TRI_ATT else cls(c, hidden)
    m = perturbed(m.to(dtype), seed + 1)
    m.backend = backend
    return m


def forward_backward(module, z, mask, cotangent):
    """Output, input gradient and parameter gradients of ``sum(module(z, mask) * cotangent)``."""
    module.zero_grad(set_to_none=True)
    z = z.detach().clone().requires_grad_(True)
    out = module(z, mask=mask)
    (out * cotangent).sum().backward()
    return out.detach(), z.grad, {n: p.grad for n, p in module.named_parameters()}


def force_efficient(monkeypatch) -> None:
    """Make the torch backend take its chunked, memory-efficient path at every size
    (by default small calls run the plain reference computation; see
    :func:`genie_tk.torch_backend.plain`): for tests of that path on small inputs."""
    from genie_tk import torch_backend

    monkeypatch.setattr(torch_backend, "PLAIN_BYTES", dict.fromkeys(torch_backend.PLAIN_BYTES, -1))
