"""The peer adapters map genie-tk's layout onto each peer's documented API, and
failures become rows instead of stopping the sweep.

The peers need CUDA, so stand-ins implement their documented contracts on the CPU:
trifast's ``triangle_attention(q, k, v, b, mask)`` (head-major, mask True = masked,
masked logits replaced by the dtype's minimum) and cuEquivariance's
``triangle_attention`` (bias ``[B, 1, H, Q, K]``, mask ``[B, N, 1, 1, K]`` True = keep)
and ``triangle_multiplicative_update`` (genie-tk's keyword names).
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the genie_bench package

from genie_bench import cases, kernels, methods, timing
from genie_bench.errors import compare, fp64_reference

import genie_tk

N = 9


def _softmax_attention(q, k, v, logits_bias, keep):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + logits_bias
    s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
    return torch.softmax(s, -1) @ v


def _fake_trifast(q, k, v, b, mask):  # q [B, H, I, J, D], b [B, H, J, K], mask [B, I, K] True = masked
    return _softmax_attention(q, k, v, b[:, :, None], ~mask[:, None, :, None, :])


def _fake_cueq_attention(q, k, v, bias, mask=None, scale=None):  # q [B, N, H, Q, D], bias [B, 1, H, Q, K]
    return _softmax_attention(q, k, v, bias, mask.bool())


def _fake_cueq_tri_mul(x, direction, mask, **weights):
    return genie_tk.triangle_multiplicative_update(x, mask, direction, backend="reference", **weights)


@pytest.fixture
def peers(monkeypatch):
    monkeypatch.setitem(sys.modules, "trifast", types.SimpleNamespace(triangle_attention=_fake_trifast))
    cuet = types.SimpleNamespace(triangle_attention=_fake_cueq_attention,
                                 triangle_multiplicative_update=_fake_cueq_tri_mul)
    monkeypatch.setitem(sys.modules, "cuequivariance_torch", cuet)
    monkeypatch.setitem(sys.modules, "cuequivariance_ops_torch", types.SimpleNamespace())
    cuda = torch.device("cuda")  # only the device check reads it; nothing is allocated there
    return {"trifast": methods.trifast_method(cuda), "cuequivariance": methods.cuequivariance_method(cuda)}


@pytest.mark.parametrize("op_name", list(cases.OPS))
@pytest.mark.parametrize("peer", ["trifast", "cuequivariance"])
def test_peer_adapter_matches_the_reference(peers, peer, op_name):
    op, m = cases.OPS[op_name], peers[peer]
    assert m.available, m.reason
    if op.family not in m.calls:
        pytest.skip(f"{peer} has no {op.family}")
    t = op.build(N, torch.float64, torch.device("cpu"), seed=3)
    cot = torch.randn(t[op.out_like].shape, dtype=torch.float64)
    ref, _ = fp64_reference(op, t, cot, want_grads=False)
    err = compare(m.calls[op.family](op, t), ref)
    print(peer, op_name, err)
    assert err["rel_fro"] < 1e-12


def _broken_method(name: str, exc: BaseException) -> methods.Method:
    def fail(op, t):
        raise exc

    return methods.Method(name, "none", None, calls={cases.ATTENTION: fail, cases.TRI_MUL: fail})


def test_failing_methods_are_recorded_and_the_sweep_goes_on(monkeypatch):
    broken = {
        "oom": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"),
        "error": ValueError("head dim 32 is not supported"),
        "unavailable": methods.Unsupported("no kernel for this dtype"),
    }
    found = [_broken_method(name, exc) for name, exc in broken.items()]
    found += [m for m in methods.genie_methods() if m.name == "torch"]
    monkeypatch.setattr(kernels, "discover", lambda device, only: found)
    cfg = kernels.Config(ops=("tri_att_start", "tri_mul_in"), ns=(4,), dtypes=("float32",),
                         passes=cases.PASSES, device=torch.device("cpu"),
                         timing=timing.TimingConfig(0, 0, 1, 1, 0))
    rows = kernels.run(cfg, log=lambda line: None)["results"]
    for status in broken:  # each broken method is named after the status it must get
        mine = [r for r in rows if r["method"] == status]
        assert len(mine) == 4 and all(r["status"] == status and r["reason"] for r in mine), mine
    assert [r["status"] for r in rows if r["method"] == "torch"] == ["ok"] * 4
