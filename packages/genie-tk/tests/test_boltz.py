"""genie_tk.boltz: Boltz 2's layouts, and cross-tests against the real Boltz 2.2.1.

The cross-tests (marked ``crosstest``) import Boltz's layer modules, which need
``pip install --no-deps boltz==2.2.1`` plus ``scipy einops`` (``LAYOUT_CROSSTEST``
in noxfile.py, installed by ``nox -s crosstest``); they skip, with the import error, where those are
missing. Triangle attention is compared in float64; the tri-mul in float32, the
only precision Boltz's layer runs in (it casts ``a`` and ``b`` to float32); masks
have padded (fully masked) rows and random holes; outputs, the input gradient and
every parameter gradient are compared; ``-s`` prints the errors.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from genie_tk import boltz as gb
from genie_tk.testing import (
    cuequivariance_stand_in,
    layer_errors,
    pair_mask,
    perturbed,
    rel,
    seed_all,
)

BACKENDS = ("torch", "reference")

C, CH, H, N = 12, 5, 3, 10
NO_CUDA_AUTOCAST = pytest.mark.filterwarnings(
    "ignore:(User provided device_type of 'cuda'|CUDA is not available):UserWarning")


def boltz(module: str):
    """A Boltz module, or a skip naming why it does not import."""
    try:
        return importlib.import_module(f"boltz.model.layers.{module}")
    except ImportError as exc:
        pytest.skip(f"boltz is not importable ({exc}); `nox -s crosstest` installs it "
                    "(noxfile.py: LAYOUT_CROSSTEST, with --no-deps)")


def inputs(dtype, seed, c=C):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, N, N, c, generator=g, dtype=dtype)
    return z, pair_mask(2, N, 2, 0.2, seed + 1, dtype=dtype)



def test_state_dict_keys_are_boltzs():
    mul = gb.TriangleMultiplicationOutgoing(C)
    assert {k: tuple(v.shape) for k, v in mul.state_dict().items()} == {
        "norm_in.weight": (C,), "norm_in.bias": (C,), "p_in.weight": (2 * C, C), "g_in.weight": (2 * C, C),
        "norm_out.weight": (C,), "norm_out.bias": (C,), "p_out.weight": (C, C), "g_out.weight": (C, C)}
    assert gb.TriangleMultiplicationIncoming().p_in.weight.shape == (256, 128)  # Boltz's default dim
    assert mul.g_in.weight.abs().sum() == 0 and mul.p_out.weight.abs().sum() == 0  # gating / final init
    att = gb.TriangleAttentionEndingNode(C, CH, H)
    assert not att.starting and set(att.state_dict()) == {
        "layer_norm.weight", "layer_norm.bias", "linear.weight", "mha.linear_q.weight", "mha.linear_k.weight",
        "mha.linear_v.weight", "mha.linear_o.weight", "mha.linear_g.weight"}


@pytest.mark.crosstest
@NO_CUDA_AUTOCAST
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["TriangleMultiplicationOutgoing", "TriangleMultiplicationIncoming"])
def test_trimul_matches_boltz_float32(name, backend):
    layers = boltz("triangular_mult")
    seed_all(1)
    theirs = perturbed(getattr(layers, name)(C), 2)  # perturbed: no zero-initialised gate or output
    ours = getattr(gb, name)(C)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.backend = backend
    z, mask = inputs(torch.float32, 3)
    errors = layer_errors(ours, theirs, z, mask, f"boltz {name} float32 {backend}")
    assert max(errors.values()) < 1e-5


@pytest.mark.crosstest
@NO_CUDA_AUTOCAST
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("name", ["TriangleAttention", "TriangleAttentionStartingNode", "TriangleAttentionEndingNode"])
def test_attention_matches_boltz(name, chunk_size, backend):
    layers = boltz("triangular_attention.attention")
    seed_all(4)
    theirs = perturbed(getattr(layers, name)(C, CH, H).double(), 5)
    ours = getattr(gb, name)(C, CH, H).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.backend = backend
    z, mask = inputs(torch.float64, 6)
    errors = layer_errors(ours, theirs, z, mask, f"boltz {name} chunk_size={chunk_size} {backend}", chunk_size=chunk_size)
    assert max(errors.values()) < 1e-12


@pytest.mark.crosstest
@NO_CUDA_AUTOCAST
def test_boltz_cuequivariance_call_sites_run_on_genie_tk(monkeypatch):
    """Boltz's own use_kernels=True paths, with cuequivariance_torch answered by
    genie_tk.cuequivariance, equal its eager paths."""
    mul_layers, att_layers = boltz("triangular_mult"), boltz("triangular_attention.attention")
    cuequivariance_stand_in(monkeypatch)
    seed_all(7)
    z, mask = inputs(torch.float64, 8)
    att = perturbed(att_layers.TriangleAttentionEndingNode(C, CH, H).double(), 9)
    assert rel(att(z, mask, use_kernels=True), att(z, mask)) < 1e-12
    z, mask = z.float(), mask.float()
    for cls in (mul_layers.TriangleMultiplicationOutgoing, mul_layers.TriangleMultiplicationIncoming):
        mul = perturbed(cls(C), 10)
        fast, eager = mul(z, mask, use_kernels=True), mul(z, mask)
        print(f"boltz {cls.__name__} cuEquivariance call site (float32): rel err {rel(fast, eager):.2e}")
        assert rel(fast, eager) < 1e-5


@pytest.mark.crosstest
@NO_CUDA_AUTOCAST
def test_trimul_under_bfloat16_autocast_is_as_accurate_as_boltz():
    """Boltz's float32 cast before the contraction does not survive autocast (its einsum
    runs in bfloat16 there); genie-tk's error against the float64 truth is at most 2x Boltz's."""
    layers = boltz("triangular_mult")
    seed_all(11)
    theirs = perturbed(layers.TriangleMultiplicationOutgoing(C), 12)
    ours = gb.TriangleMultiplicationOutgoing(C)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    z, mask = inputs(torch.float32, 13)
    truth = copy.deepcopy(ours).double()(z.double(), mask.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        err_boltz, err_ours = rel(theirs(z, mask), truth), rel(ours(z, mask), truth)
    print(f"boltz tri-mul under bf16 autocast: rel err vs float64, boltz {err_boltz:.2e}, genie-tk {err_ours:.2e}")
    assert err_boltz > 1e-3  # autocast rounds Boltz's contraction too: a bf16-size error
    assert err_ours <= 2 * err_boltz


def pairformer_layer(pairformer, n):
    seed_all(n)
    layer = pairformer.PairformerLayer(token_s=8, token_z=C, num_heads=2, dropout=0.25, pairwise_head_width=4,
                                       pairwise_num_heads=H, v2=True)
    return perturbed(layer.eval(), n + 1)


@pytest.mark.crosstest
@NO_CUDA_AUTOCAST
def test_pairformer_layer_replace_modules_and_patch():
    pairformer = boltz("pairformer")
    original = pairformer_layer(pairformer, 14)
    g = torch.Generator().manual_seed(15)
    s, z = torch.randn(1, N, 8, generator=g), torch.randn(1, N, N, C, generator=g)
    mask = torch.ones(1, N)
    mask[:, -2:] = 0
    pair = pair_mask(1, N, 2, 0.2, 16, dtype=torch.float32)
    expected = original(s, z, mask, pair)

    replaced = gb.replace_modules(copy.deepcopy(original))
    assert [type(replaced.tri_mul_out), type(replaced.tri_att_end)] == [
        gb.TriangleMultiplicationOutgoing, gb.TriangleAttentionEndingNode]
    got = replaced(s, z, mask, pair)
    errors = [rel(a, b) for a, b in zip(got, expected)]
    print(f"boltz PairformerLayer (float32) replace_modules: rel err s, z {errors}")
    assert max(errors) < 1e-5

    with gb.patch():
        patched = pairformer_layer(pairformer, 17)
    assert isinstance(patched.tri_att_start, gb.TriangleAttention)
    assert not isinstance(pairformer_layer(pairformer, 18).tri_att_start, gb.TriangleAttention)  # restored
    patched.load_state_dict(original.state_dict(), strict=True)
    assert max(rel(a, b) for a, b in zip(patched(s, z, mask, pair), expected)) < 1e-5
