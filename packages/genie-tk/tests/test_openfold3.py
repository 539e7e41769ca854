"""genie_tk.openfold3: OpenFold3's layouts, and cross-tests against the real OpenFold3 0.5.0.

The cross-tests (marked ``crosstest``) import OpenFold3's layer modules, which need
``pip install --no-deps openfold3==0.5.0`` plus the few packages they import
(``LAYOUT_CROSSTEST`` in noxfile.py, installed by ``nox -s crosstest``); they skip, with the import error,
where those are missing. Every comparison is float64, with padded (fully masked)
rows and random holes in the mask, on outputs, the input gradient and every
parameter gradient; ``-s`` prints the errors (the README's figures).
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch

import genie_tk
from genie_tk import openfold3 as g3
from genie_tk import tk_attention
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
# OpenFold3's attention wraps CPU code in torch.amp.autocast("cuda"), which warns without a GPU.
NO_CUDA_AUTOCAST = pytest.mark.filterwarnings(
    "ignore:(User provided device_type of 'cuda'|CUDA is not available):UserWarning")


def openfold3(module: str):
    """An OpenFold3 module, or a skip naming why it does not import."""
    try:
        with warnings.catch_warnings():  # OpenFold3 warns at import where Triton is missing
            warnings.filterwarnings("ignore", "Triton is not available", UserWarning)
            return importlib.import_module(f"openfold3.core.model.{module}")
    except ImportError as exc:
        pytest.skip(f"openfold3 is not importable ({exc}); `nox -s crosstest` installs it "
                    "(noxfile.py: LAYOUT_CROSSTEST, with --no-deps)")




def inputs(lead=(2,), n=N, c=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*lead, n, n, c, generator=g, dtype=torch.float64)
    mask = pair_mask(int(torch.tensor(lead).prod()), n, 2, 0.2, seed + 1).reshape(*lead, n, n)
    return z, mask


def ours_like(cls, theirs, backend):
    m = (cls(C, CH, H) if "Attention" in cls.__name__ else cls(C, CH)).double()
    m.load_state_dict(theirs.state_dict(), strict=True)
    m.backend = backend
    return m


ATTENTION = ["TriangleAttention", "TriangleAttentionStartingNode", "TriangleAttentionEndingNode"]
TRI_MUL = ["TriangleMultiplicationOutgoing", "TriangleMultiplicationIncoming",
           "FusedTriangleMultiplicationOutgoing", "FusedTriangleMultiplicationIncoming"]


# --- without OpenFold3 -----------------------------------------------------------------------

def test_state_dict_keys_are_openfold3s():
    att = g3.TriangleAttention(C, CH, H)
    assert {k: tuple(v.shape) for k, v in att.state_dict().items()} == {
        "layer_norm.weight": (C,), "layer_norm.bias": (C,), "linear_z.weight": (H, C),
        "mha.linear_q.weight": (H * CH, C), "mha.linear_k.weight": (H * CH, C), "mha.linear_v.weight": (H * CH, C),
        "mha.linear_o.weight": (C, H * CH), "mha.linear_g.weight": (H * CH, C)}
    mul = g3.TriangleMultiplicationIncoming(C, CH)
    assert set(mul.state_dict()) == {"linear_g.weight", "linear_z.weight", "layer_norm_in.weight", "layer_norm_in.bias",
                                     "layer_norm_out.weight", "layer_norm_out.bias", "linear_a_p.weight",
                                     "linear_a_g.weight", "linear_b_p.weight", "linear_b_g.weight"}
    fused = g3.FusedTriangleMultiplicationOutgoing(C, CH)
    assert fused.linear_ab_p.weight.shape == (2 * CH, C) and fused.linear_ab_g.bias is None
    # OpenFold3's initialisers: gates and outputs zero, projections LeCun (std 1/sqrt(C)).
    assert att.mha.linear_o.weight.abs().sum() == 0 and att.mha.linear_g.weight.abs().sum() == 0
    assert mul.linear_z.weight.abs().sum() == 0 and mul.linear_a_g.weight.abs().sum() == 0
    w = g3.TriangleAttention(64, 16, 4).mha.linear_q.weight
    assert abs(w.std().item() - 64**-0.5) < 0.1 * 64**-0.5


def test_linear_init_params():
    cfg = copy.deepcopy(g3.TRI_MUL_INIT)
    cfg["linear_g"]["bias"] = True
    cfg["linear_a_p"]["bias"] = True
    m = g3.TriangleMultiplicationOutgoing(C, CH, linear_init_params=cfg)
    assert m.linear_g.bias is not None and torch.all(m.linear_g.bias == 1)  # gating: bias 1
    assert m.linear_a_p.bias is not None and m.linear_b_p.bias is None
    z, mask = inputs()
    perturbed(m.double(), 3)
    p_w, p_b = torch.cat([m.linear_a_p.weight, m.linear_b_p.weight]), torch.cat([m.linear_a_p.bias, torch.zeros(CH)])
    params = {"layer_norm_in.weight": m.layer_norm_in.weight, "layer_norm_in.bias": m.layer_norm_in.bias,
              "linear_ab_p.weight": p_w, "linear_ab_p.bias": p_b,
              "linear_ab_g.weight": torch.cat([m.linear_a_g.weight, m.linear_b_g.weight]),
              "layer_norm_out.weight": m.layer_norm_out.weight, "layer_norm_out.bias": m.layer_norm_out.bias,
              "linear_z.weight": m.linear_z.weight, "linear_g.weight": m.linear_g.weight,
              "linear_g.bias": m.linear_g.bias}
    assert rel(m(z, mask), genie_tk.reference.triangle_multiplicative_update(z, mask, params, True)) < 1e-12
    att = copy.deepcopy(g3.TRI_ATT_INIT)
    att["linear_z"]["bias"] = True
    with pytest.raises(ValueError, match="linear_z with a bias"):
        g3.TriangleAttention(C, CH, H, linear_init_params=att)
    att = copy.deepcopy(g3.TRI_ATT_INIT)
    att["mha"]["linear_k"]["bias"] = True
    with pytest.raises(ValueError, match="linear_k with a bias"):
        g3.TriangleAttention(C, CH, H, linear_init_params=att)
    att = copy.deepcopy(g3.TRI_ATT_INIT)
    att["mha"]["linear_q"]["precision"] = torch.float32
    with pytest.raises(ValueError, match=r"linear_init_params.linear_q has \['precision'\]"):
        g3.TriangleAttention(C, CH, H, linear_init_params=att)


@pytest.mark.parametrize("starting", [True, False])
def test_transpose_bias_backends_agree_and_it_changes_the_function(starting):
    seed_all(4)
    m = perturbed(g3.TriangleAttention(C, CH, H, starting=starting).double(), 5)
    z, mask = inputs(seed=6)
    m.backend = "reference"
    ref = layer_errors(m, copy.deepcopy(m), z, mask, "self")  # sanity: identical modules
    assert max(ref.values()) == 0
    theirs = copy.deepcopy(m)
    m.backend = "torch"
    errors = layer_errors(m, theirs, z, mask, f"transpose_bias torch vs reference starting={starting}", transpose_bias=True)
    assert max(errors.values()) < 1e-12
    assert rel(m(z, mask, transpose_bias=True), m(z, mask)) > 1e-3


def test_tk_layer_glue_transposes_the_bias(monkeypatch):
    """The tk backend's layer glue (tk_attention.run_layer) honours transpose_bias; its
    attention core is the reference core here, so this runs without a GPU."""
    monkeypatch.setattr(tk_attention, "run", genie_tk.reference.triangle_attention)
    m = perturbed(g3.TriangleAttention(C, CH, H).double(), 30)
    mha, zeros = m.mha, torch.zeros(H * CH, dtype=torch.float64)
    weights = (m.layer_norm.weight, m.layer_norm.bias, m.linear_z.weight, mha.linear_q.weight, mha.linear_k.weight,
               mha.linear_v.weight, mha.linear_g.weight, zeros, mha.linear_o.weight, torch.zeros(C, dtype=torch.float64))
    z, mask = inputs(seed=31)
    m.backend = "reference"
    for transpose_bias in (False, True):
        got = tk_attention.run_layer(z, mask, weights, True, m.inf, m.layer_norm.eps, transpose_bias)
        assert rel(got, m(z, mask, transpose_bias=transpose_bias)) < 1e-12



@pytest.mark.skipif(not genie_tk.backends()["triton"]["available"], reason="triton backend not available here")
@pytest.mark.parametrize("starting", [True, False])
def test_triton_layer_honours_transpose_bias(starting):
    """OpenFold3's layer on the triton backend (float32, head dim 16) against the reference,
    with and without transpose_bias."""
    seed_all(12)
    m = perturbed(g3.TriangleAttention(C, 16, 2, starting=starting), 13)
    z, mask = inputs(n=7, seed=14)
    z = z.float()
    for transpose_bias in (False, True):
        m.backend = "reference"
        want = m(z, mask, transpose_bias=transpose_bias)
        m.backend = "triton"
        got = m(z, mask, transpose_bias=transpose_bias)
        assert genie_tk.last_backend("triangle_attention_layer") == "triton"
        assert rel(got, want) < 1e-5, (transpose_bias, rel(got, want))

# --- against OpenFold3 -----------------------------------------------------------------------

@pytest.mark.crosstest
@NO_CUDA_AUTOCAST
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transpose_bias", [False, True])
@pytest.mark.parametrize("name", ATTENTION)
def test_attention_matches_openfold3(name, transpose_bias, backend):
    layers = openfold3("layers.triangular_attention")
    seed_all(7)
    theirs = perturbed(getattr(layers, name)(C, CH, H).double(), 8)  # perturbed: no zero-initialised layer
    ours = ours_like(getattr(g3, name), theirs, backend)
    z, mask = inputs(seed=9)
    errors = layer_errors(ours, theirs, z, mask, f"openfold3 {name} transpose_bias={transpose_bias} {backend}",
                     transpose_bias=transpose_bias)
    assert max(errors.values()) < 1e-12


@pytest.mark.crosstest
@NO_CUDA_AUTOCAST
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", TRI_MUL)
def test_trimul_matches_openfold3(name, backend):
    layers = openfold3("layers.triangular_multiplicative_update")
    seed_all(10)
    theirs = perturbed(getattr(layers, name)(C, CH).double(), 11)
    ours = ours_like(getattr(g3, name), theirs, backend)
    z, mask = inputs(lead=(1, 2), seed=12)  # OpenFold3's template stack has two batch axes
    errors = layer_errors(ours, theirs, z, mask, f"openfold3 {name} {backend}")
    assert max(errors.values()) < 1e-12


@pytest.mark.crosstest
@NO_CUDA_AUTOCAST
def test_inference_keywords_match_openfold3():
    att_layers = openfold3("layers.triangular_attention")
    mul_layers = openfold3("layers.triangular_multiplicative_update")
    seed_all(13)
    z, mask = inputs(seed=14)
    theirs = perturbed(att_layers.TriangleAttentionEndingNode(C, CH, H).double(), 15)
    ours = ours_like(g3.TriangleAttentionEndingNode, theirs, "torch")
    kw = {"chunk_size": 3, "use_lma": True, "inplace_safe": True, "transpose_bias": True}
    with torch.no_grad():
        assert rel(ours(z, mask, **kw), theirs(z, mask, **kw)) < 1e-12
        for name in ("TriangleMultiplicationOutgoing", "FusedTriangleMultiplicationIncoming"):
            theirs = perturbed(getattr(mul_layers, name)(C, CH).double(), 16)
            ours = ours_like(getattr(g3, name), theirs, "torch")
            kw = {"inplace_safe": True, "_add_with_inplace": True, "_inplace_chunk_size": 4}
            z1, z2 = z.clone(), z.clone()
            out1, out2 = ours(z1, mask, **kw), theirs(z2, mask, **kw)
            assert out1 is z1 and rel(out1, out2) < 1e-12  # added into z in place, as OpenFold3 does
            cueq = ours(z, mask, inplace_safe=True, _add_with_inplace=True, use_cueq_triangle_kernels=True)
            assert rel(cueq, out2 - z) < 1e-12  # the cuEquivariance switch returns the update only


@pytest.mark.crosstest
@NO_CUDA_AUTOCAST
def test_openfold3_cuequivariance_call_sites_run_on_genie_tk(monkeypatch):
    """OpenFold3's own use_cueq_triangle_kernels paths, with cuequivariance_torch
    answered by genie_tk.cuequivariance, equal its eager paths."""
    att_layers = openfold3("layers.triangular_attention")
    mul_layers = openfold3("layers.triangular_multiplicative_update")
    attention = openfold3("primitives.attention")
    cuequivariance_stand_in(monkeypatch)
    monkeypatch.setattr(attention, "cueq_is_installed", True)
    monkeypatch.setattr(attention, "cueq_would_fall_back", lambda n_token, hidden_dim, dtype: False, raising=False)
    monkeypatch.setattr(attention, "triangle_attention", genie_tk.cuequivariance.triangle_attention, raising=False)
    monkeypatch.setattr(mul_layers, "triangle_multiplicative_update",
                        genie_tk.cuequivariance.triangle_multiplicative_update, raising=False)
    seed_all(17)
    z, mask = inputs(c=32, seed=18)  # OpenFold3's cuEquivariance tri-mul wants channels % 32 == 0
    att = perturbed(att_layers.TriangleAttention(32, CH, H).double(), 19)
    for kw in ({}, {"chunk_size": 4}, {"transpose_bias": True}):
        fast, eager = att(z, mask, use_cueq_triangle_kernels=True, **kw), att(z, mask, **kw)
        print(f"openfold3 attention cuEquivariance call site {kw}: rel err {rel(fast, eager):.2e}")
        assert rel(fast, eager) < 1e-12
    for name in TRI_MUL:
        mul = perturbed(getattr(mul_layers, name)(32, CH).double(), 20)
        fast, eager = mul(z, mask, use_cueq_triangle_kernels=True), mul(z, mask)
        print(f"openfold3 {name} cuEquivariance call site: rel err {rel(fast, eager):.2e}")
        assert rel(fast, eager) < 1e-12


def pairformer_block(latent, n):
    seed_all(n)
    block = latent.PairFormerBlock(
        c_s=8, c_z=C, c_hidden_pair_bias=4, no_heads_pair_bias=2, c_hidden_mul=CH, c_hidden_pair_att=4,
        no_heads_pair=H, transition_type="swiglu", transition_n=2, pair_dropout=0.25,
        fuse_projection_weights=False, inf=1e9,
    )
    return block.double().eval()


def block_forward(block, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, N, 8, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(1, N, N, C, generator=g, dtype=torch.float64, requires_grad=True)
    single = torch.ones(1, N, dtype=torch.float64)
    single[:, -2:] = 0
    s_out, z_out = block(s, z, single, pair_mask(1, N, 2, 0.2, seed))
    ((s_out * 0.7).sum() + (z_out * z_out.detach().sin()).sum()).backward()
    return s_out.detach(), z_out.detach(), z.grad


@pytest.mark.crosstest
@NO_CUDA_AUTOCAST
def test_pairformer_block_replace_modules_and_patch():
    latent = openfold3("latent.pairformer")
    blocks = openfold3("latent.base_blocks")
    original = perturbed(pairformer_block(latent, 21), 22)
    expected = block_forward(original, 23)

    replaced = g3.replace_modules(copy.deepcopy(original))
    stack = replaced.pair_stack
    assert [type(m) for m in (stack.tri_mul_out, stack.tri_mul_in, stack.tri_att_start, stack.tri_att_end)] == [
        g3.TriangleMultiplicationOutgoing, g3.TriangleMultiplicationIncoming, g3.TriangleAttention, g3.TriangleAttention]
    got = block_forward(replaced, 23)
    errors = [rel(a, b) for a, b in zip(got, expected)]
    print(f"openfold3 PairFormerBlock replace_modules: rel err s, z, dz/dz_in {errors}")
    assert max(errors) < 1e-12

    layer = original.pair_stack.tri_mul_in
    alone = g3.replace_modules(layer)  # a layer itself: its replacement is returned
    assert type(alone) is g3.TriangleMultiplicationIncoming and alone.linear_z.weight is layer.linear_z.weight

    params = {id(p) for p in original.parameters()}
    in_place = g3.replace_modules(original)  # in place: the same parameter objects
    assert in_place is original and {id(p) for p in original.parameters()} == params

    with g3.patch():
        assert blocks.TriangleAttention is g3.TriangleAttention
        patched = pairformer_block(latent, 24)
    assert blocks.TriangleAttention is not g3.TriangleAttention  # restored
    assert isinstance(patched.pair_stack.tri_att_end, g3.TriangleAttention)
    patched.load_state_dict(original.state_dict(), strict=True)
    got = block_forward(patched, 23)
    assert max(rel(a, b) for a, b in zip(got, expected)) < 1e-12
    assert not isinstance(pairformer_block(latent, 25).pair_stack.tri_att_end, g3.TriangleAttention)
