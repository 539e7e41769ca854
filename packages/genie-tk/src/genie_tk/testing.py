"""Helpers shared by the tests and benchmarks of genie-tk (and its users' tests)."""

from __future__ import annotations

import sys
import types

import torch

import genie_tk
from genie_tk import cuequivariance


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ``||a - b|| / ||b||`` (absolute when ``b`` is zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def row_error(got: torch.Tensor, want: torch.Tensor, row_dims: int = 1, floor: float = 1e-3):
    """Worst per-row relative error of ``got`` against ``want`` and where it is.

    A row is one index of all axes but the last ``row_dims`` (e.g. ``(b, i, h, j)``
    of a ``[B, I, H, N, D]`` output). Per row: ``max |got - want| / max(max |want|,
    floor * max |want over the tensor|)``; the floor keeps rows that are zero up
    to rounding from dividing by nothing. Returns ``(error, index)``: the largest
    row error and that row's index tuple, so a failure names the row (a
    Frobenius norm over a whole tensor can hide one wrong row). A row with a
    non-finite value in ``got`` scores ``inf``.
    """
    if got.shape != want.shape:
        raise ValueError(f"got has shape {tuple(got.shape)}, want {tuple(want.shape)}")
    if got.numel() == 0:
        return 0.0, ()
    lead = got.shape[: got.dim() - row_dims]
    g = got.detach().double().reshape(*lead, -1) if row_dims else got.detach().double().unsqueeze(-1)
    w = want.detach().double().reshape(g.shape)
    scale = w.abs().amax(-1)
    den = scale.clamp_min(floor * scale.max().item()).clamp_min(torch.finfo(torch.float64).tiny)
    err = (g - w).abs().amax(-1) / den
    err = torch.where(torch.isfinite(g).all(-1), err, torch.full_like(err, float("inf")))
    worst = int(err.argmax().item())
    index = tuple(int(x) for x in torch.unravel_index(torch.tensor(worst), tuple(lead))) if lead else ()
    return float(err.flatten()[worst].item()), index


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


def cuequivariance_stand_in(monkeypatch) -> None:
    """Make ``cuequivariance_torch`` (and ``cuequivariance_torch.primitives.triangle``)
    resolve to :mod:`genie_tk.cuequivariance` for the rest of a test (``monkeypatch``
    is pytest's fixture), so Boltz's and OpenFold3's own cuEquivariance call sites
    run genie-tk's functional API as they would run the real package's."""
    for name in ("cuequivariance_torch", "cuequivariance_torch.primitives", "cuequivariance_torch.primitives.triangle"):
        module = types.ModuleType(name)
        module.triangle_attention = cuequivariance.triangle_attention
        module.triangle_multiplicative_update = cuequivariance.triangle_multiplicative_update
        monkeypatch.setitem(sys.modules, name, module)


def seed_all(n: int) -> None:
    """Seed torch and, where installed, numpy (OpenFold3 and Boltz draw their LeCun
    initialisations with scipy, from numpy's global generator)."""
    torch.manual_seed(n)
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with every project compared against
        return
    numpy.random.seed(n)  # noqa: NPY002 (scipy.stats draws from this global generator)


def layer_errors(ours, theirs, z, mask, label: str, **kwargs) -> dict[str, float]:
    """Relative errors of layer ``ours`` against ``theirs`` (same ``state_dict``) on
    ``layer(z, mask, **kwargs)``: the output (``"out"``), the input gradient (``"dz"``)
    and every parameter gradient (by name), for one random cotangent; prints the worst."""
    results, cotangent = [], None
    for layer in (ours, theirs):
        layer.zero_grad(set_to_none=True)
        x = z.detach().clone().requires_grad_(True)
        out = layer(x, mask, **kwargs)
        if cotangent is None:
            cotangent = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(99))
        (out * cotangent).sum().backward()
        results.append((out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (o1, dz1, g1), (o2, dz2, g2) = results
    if g1.keys() != g2.keys():
        raise AssertionError(f"{label}: parameter names differ: {sorted(g1)} vs {sorted(g2)}")
    errors = {"out": rel(o1, o2), "dz": rel(dz1, dz2)} | {n: rel(g1[n], g2[n]) for n in g1}
    worst = max(errors, key=errors.get)
    print(f"{label}: max abs err out {(o1 - o2).abs().max().item():.2e}; max rel err {errors[worst]:.2e} ({worst}) "
          f"over out, dz and {len(g1)} parameter gradients")
    return errors


def force_efficient(monkeypatch) -> None:
    """Make the torch backend take its chunked, memory-efficient path at every size
    (by default small calls run the plain reference computation; see
    :func:`genie_tk.torch_backend.plain`): for tests of that path on small inputs."""
    from genie_tk import torch_backend

    monkeypatch.setattr(torch_backend, "PLAIN_BYTES", dict.fromkeys(torch_backend.PLAIN_BYTES, -1))
