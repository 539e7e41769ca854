"""The triton backend of triangle attention under Triton's interpreter (CPU tensors).

The root conftest sets ``TRITON_INTERPRET=1`` when no GPU is present, so the same
kernel code that runs on a GPU runs here, program by program, in NumPy. Covered:

* the core op (``backend="triton"``) and both modules (``module.backend = "triton"``)
  against a float64 oracle, outputs and every gradient, with padded (fully masked)
  rows and columns and random holes: the kernel's error must be at most twice that of
  the torch backend in the same precision (float32, bfloat16);
* ``GENIE_TK_BACKEND=triton``; eligibility reasons; registration (unverified);
* opcheck of both custom ops, torch.compile(fullgraph=True) of a module;
* every output element written (allocations poisoned with NaN), and a kernel that
  writes nothing failing the comparison;
* the autotuner's pruning of configurations a GPU cannot hold;
* the GPU path compiling to cubin for sm_90 and sm_80 (compile_triton_kernels.py).

The interpreter's cost is per program and operation, so the shapes are small and
chosen to cover, between them, N in {1, 5, 17, 33, 65} (one partial key block; two at
65), heads 1-4, head dims 16/32/64, batch 1 and 3. The float64 oracle uses a mask bias
of 1e30: in float64, -1e9 does not swamp the triangle bias, so a fully masked row would
follow softmax(bias), whereas in float32 and below it is uniform (see
test_tk_attention_cuda.py).

Cost: 56 s of CPU on one thread (user time of ``time pytest -q`` on this file, the compile
subprocesses included); 1 min 56 s wall on the shared 2-core machine at load 8.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import genie_tk
from genie_tk import _backend
from genie_tk.testing import TRI_ATT, build, forward_backward, pair_mask, rel

ta = pytest.importorskip("genie_tk.triton.triangle_attention")

pytestmark = pytest.mark.skipif(not _backend.triton_interpreted(),
                                reason="CPU tests of the triton kernels need TRITON_INTERPRET=1 (set by conftest without a GPU)")

ORACLE_INF = 1e30
# Slack for errors at rounding level in both backends: four float32 ulps (relative). The
# kernels accumulate in float32, so no result is closer than that to float64; the torch
# backend's plain path at these small N can be (its reductions sum pairwise).
FLOOR = {torch.float32: 4 * torch.finfo(torch.float32).eps, torch.bfloat16: 1e-5}
# Where the exact result is zero (dq, dk, dbias at N = 1, where the softmax has a single
# key), rel() is the absolute error: torch's happens to cancel exactly, the kernels'
# delta = rowsum(dO·O) and dO·v sum in different orders and leave fp32 rounding.
ZERO_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
NAMES = ("o", "dq", "dk", "dv", "dbias")


def _inputs(b, n, h, d, dtype, seed, n_pad=None, drop=0.15):
    """q, k, v, bias, dout in ``dtype`` and a 0/1 float mask with the last ``n_pad``
    rows and columns padded (fully masked rows) and random holes."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(b, n, h, n, d, generator=g).to(dtype) for _ in range(4))
    bias = torch.randn(b, h, n, n, generator=g).to(dtype)
    n_pad = max(1, n // 8) if n_pad is None else n_pad
    mask = pair_mask(b, n, n_pad if n > 1 else 0, drop if n > 1 else 0.0, seed, dtype=torch.float32)
    return q, k, v, bias, mask, dout


def _attention(backend, q, k, v, bias, mask, dout, inf=1e9):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
    out = genie_tk.triangle_attention(*leaves, mask, inf=inf, backend=backend)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype))]


def _oracle(q, k, v, bias, mask, dout):
    return _attention("reference", *(t.double() for t in (q, k, v, bias)), mask, dout.double(), inf=ORACLE_INF)


def _compare(got, pytorch, want, label, dtype, names=NAMES):
    for name, g, p, w in zip(names, got, pytorch, want, strict=True):
        e_tr, e_pt = rel(g, w), rel(p, w)
        err = (g.double() - w.double()).abs()
        print(f"{label} {name}: triton rel {e_tr:.3e} (max abs {err.max().item():.2e}, mean {err.mean().item():.2e})"
              f"  torch rel {e_pt:.3e}  ratio {e_tr / max(e_pt, 1e-30):.2f}")
        assert torch.isfinite(g).all(), f"{label} {name} has non-finite values"
        floor = ZERO_FLOOR[dtype] if w.norm() == 0 else FLOOR[dtype]
        assert e_tr <= 2 * e_pt + floor, f"{label} {name}: triton error {e_tr:.3e} > 2 x torch error {e_pt:.3e}"


# (batch, N, heads, head dim, dtype): together N 1/5/17/33/65, H 1-4, D 16/32/64, B 1 and 3.
CASES = [
    (1, 1, 1, 16, torch.float32),
    (3, 5, 1, 32, torch.float32),
    (1, 5, 4, 16, torch.bfloat16),
    (1, 17, 2, 64, torch.bfloat16),
    (1, 33, 1, 32, torch.float32),
    (1, 65, 1, 16, torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-N{c[1]}-H{c[2]}-D{c[3]}-{str(c[4])[6:]}")
def test_core_matches_float64_within_twice_pytorch_error(case):
    b, n, h, d, dtype = case
    q, k, v, bias, mask, dout = _inputs(b, n, h, d, dtype, seed=n * 31 + h * 7 + d)
    want = _oracle(q, k, v, bias, mask, dout)
    pytorch = _attention("torch", q, k, v, bias, mask, dout)
    got = _attention("triton", q, k, v, bias, mask, dout)
    assert genie_tk.last_backend("triangle_attention") == "triton"
    _compare(got, pytorch, want, f"B{b} N{n} H{h} D{d} {dtype}", dtype)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), n=st.integers(1, 12), h=st.integers(1, 2), d=st.sampled_from([16, 32]),
       n_pad=st.integers(0, 3), drop=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**16))
def test_core_hypothesis_float32(b, n, h, d, n_pad, drop, seed):
    """Random small shapes and masks (drop = 1.0 masks every key of every row)."""
    q, k, v, bias, mask, dout = _inputs(b, n, h, d, torch.float32, seed, n_pad=min(n_pad, n - 1), drop=drop)
    _compare(_attention("triton", q, k, v, bias, mask, dout), _attention("torch", q, k, v, bias, mask, dout),
             _oracle(q, k, v, bias, mask, dout), f"B{b} N{n} H{h} D{d} pad {n_pad} drop {drop}", torch.float32)


def test_bool_mask_no_mask_and_env_var(monkeypatch):
    """A bool mask and ``mask=None`` take their own paths; GENIE_TK_BACKEND=triton picks the kernels."""
    q, k, v, bias, mask, dout = _inputs(1, 6, 1, 16, torch.float32, seed=3)
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    for m in (mask.bool(), None):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
        out = genie_tk.triangle_attention(*leaves, m)
        assert genie_tk.last_backend("triangle_attention") == "triton"
        got = [out.detach(), *torch.autograd.grad(out, leaves, dout)]
        want = _oracle(q, k, v, bias, m, dout)
        _compare(got, _attention("torch", q, k, v, bias, m, dout), want, f"mask {m is not None}", torch.float32)


def test_fully_masked_rows_are_uniform_and_stats_keep_max_and_sum_apart():
    n = 9
    q, k, v, bias, _, _ = _inputs(1, n, 2, 16, torch.float32, seed=4)
    mask = torch.ones(1, n, n)
    mask[:, 3] = 0  # row i = 3 masks every key
    o, stats = ta.attention_fwd(q, k, v, bias, mask, 0.25, 1e9)
    assert stats.shape == (1, n, 2, n, 2) and stats.dtype == torch.float32
    assert torch.equal(stats[0, 3, :, :, 1], torch.full((2, n), math.log2(n)))
    assert (stats[0, 3, :, :, 0] < -1e9).all()
    torch.testing.assert_close(o[0, 3], v[0, 3].mean(-2, keepdim=True).expand(2, n, 16))


@pytest.mark.parametrize(("cls", "dtype"), [(TRI_ATT[0], torch.float32), (TRI_ATT[1], torch.bfloat16)],
                         ids=["starting-float32", "ending-bfloat16"])
def test_module_matches_float64_within_twice_pytorch_error(cls, dtype):
    """TriangleAttention on ``module.backend = "triton"``: output, input gradient and
    every parameter gradient (gate and output layers perturbed away from zero init)."""
    c, hidden, heads, n = 8, 16, 2, 7
    oracle = build(cls, c, hidden, heads, seed=n, dtype=torch.float64, backend="reference")
    oracle.inf = ORACLE_INF
    z = torch.randn(1, n, n, c, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    mask = pair_mask(1, n, 1, 0.15, n)
    cotangent = torch.randn_like(z)
    want = forward_backward(oracle, z, mask, cotangent)
    results = {}
    for backend in ("torch", "triton"):
        m = copy.deepcopy(oracle).to(dtype)  # the same rounded weights for both
        m.inf, m.backend = 1e9, backend
        results[backend] = forward_backward(m, z.to(dtype), mask, cotangent.to(dtype))
        assert genie_tk.last_backend("triangle_attention_layer") == backend

    def flat(result):
        return [result[0], result[1], *(result[2][name] for name in want[2])]

    assert len(want[2]) == 10  # layer norm (2), bias projection, q, k, v, gate (2), output (2)
    _compare(flat(results["triton"]), flat(results["torch"]), flat(want), cls.__name__, dtype,
             names=["out", "dz", *want[2]])


# ------------------------------------------------------------ writes and seams


def _poisoned(monkeypatch):
    monkeypatch.setattr(ta, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))


def test_every_output_element_is_written(monkeypatch):
    """Outputs, statistics and gradients allocated full of NaN come back finite and right."""
    _poisoned(monkeypatch)
    q, k, v, bias, mask, dout = _inputs(1, 33, 1, 16, torch.float32, seed=5)
    o, stats = ta.attention_fwd(q, k, v, bias, mask, 0.25, 1e9)
    grads = ta.attention_bwd(dout, q, k, v, bias, mask, o, stats, 0.25, 1e9)
    for name, t in zip(("o", "stats", *NAMES[1:]), (o, stats, *grads)):
        assert torch.isfinite(t).all(), name
    _compare(_attention("triton", q, k, v, bias, mask, dout), _attention("torch", q, k, v, bias, mask, dout),
             _oracle(q, k, v, bias, mask, dout), "poisoned", torch.float32)


def test_a_kernel_that_writes_nothing_fails_the_comparison(monkeypatch):
    _poisoned(monkeypatch)
    monkeypatch.setattr(ta, "_launch", lambda kernel, grid, *args, **meta: None)
    q, k, v, bias, mask, dout = _inputs(1, 5, 1, 16, torch.float32, seed=6)
    with pytest.raises(AssertionError, match="non-finite"):
        _compare(_attention("triton", q, k, v, bias, mask, dout), _attention("torch", q, k, v, bias, mask, dout),
                 _oracle(q, k, v, bias, mask, dout), "unlaunched", torch.float32)


# ------------------------------------------------------------ custom ops


def _op_args(n=4, seed=7):
    q, k, v, bias, mask, _ = _inputs(1, n, 1, 16, torch.float32, seed=seed, n_pad=0)
    return [t.requires_grad_(True) for t in (q, k, v, bias)], mask.bool()


def test_forward_op_passes_opcheck():
    leaves, mask = _op_args()
    torch.library.opcheck(torch.ops.genie_tk.triton_attention_fwd.default, (*leaves, mask, 0.25, 1e9))
    torch.library.opcheck(torch.ops.genie_tk.triton_attention_fwd.default, (*leaves, None, 0.25, 1e9))


def test_backward_op_passes_opcheck():
    leaves, mask = _op_args()
    q, k, v, bias = (t.detach() for t in leaves)
    o, stats = ta.attention_fwd(q, k, v, bias, mask, 0.25, 1e9)
    torch.library.opcheck(torch.ops.genie_tk.triton_attention_bwd.default,
                          (torch.randn_like(o), q, k, v, bias, mask, o, stats, 0.25, 1e9))


def test_fake_ops_give_shapes_on_meta():
    q = torch.empty(2, 3, 4, 5, 16, device="meta", dtype=torch.bfloat16)
    bias = torch.empty(2, 4, 5, 5, device="meta", dtype=torch.bfloat16)
    o, stats = torch.ops.genie_tk.triton_attention_fwd(q, q, q, bias, None, 0.25, 1e9)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert stats.shape == (2, 3, 4, 5, 2) and stats.dtype == torch.float32
    grads = torch.ops.genie_tk.triton_attention_bwd(q, q, q, q, bias, None, o, stats, 0.25, 1e9)
    assert [g.shape for g in grads] == [q.shape, q.shape, q.shape, bias.shape]


def test_compiled_module_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) traces the custom ops (aot_eager: the CPU here has
    no C++ toolchain for inductor to rely on; the GPU test compiles with inductor)."""
    module = build(TRI_ATT[1], 8, 16, 1, seed=8, dtype=torch.float32, backend="triton")
    z = torch.randn(1, 4, 4, 8, generator=torch.Generator().manual_seed(8))
    mask = pair_mask(1, 4, 1, 0.0, 8, dtype=torch.float32)
    cotangent = torch.randn_like(z)
    eager = forward_backward(module, z, mask, cotangent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo's own
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        got = forward_backward(compiled, z, mask, cotangent)
    torch.testing.assert_close(got[0], eager[0])
    torch.testing.assert_close(got[1], eager[1])
    compiled_grads = {name.removeprefix("_orig_mod."): g for name, g in got[2].items()}
    assert compiled_grads.keys() == eager[2].keys()
    for name, g in eager[2].items():
        torch.testing.assert_close(compiled_grads[name], g, msg=name)


# ------------------------------------------------------------ eligibility and registration


def test_registered_unverified_and_reported():
    for op, check in (("triangle_attention", ta.check), ("triangle_attention_layer", ta.check_layer)):
        kernel = _backend.TRITON_KERNELS[op]
        assert kernel.check is check and kernel.verified is False
    info = genie_tk.backends()["triton"]
    assert info["available"] and info["interpreter"]
    assert info["ops"]["triangle_attention"]["verified"] is False
    assert "never run on a GPU" in info["ops"]["triangle_attention"]["note"]
    assert "triangle_attention_layer" in info["note"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [16, 32, 64])
def test_check_accepts_kernel_dtypes_and_head_dims(dtype, head_dim):
    q = torch.empty(1, 2, 1, 2, head_dim, dtype=dtype)
    assert ta.check(q, q, q, None, None, head_dim=head_dim) == ""
    assert ta.check_layer(torch.empty(1, 2, 2, 4, dtype=dtype), None, head_dim=head_dim) == ""


@pytest.mark.parametrize(("dtype", "d", "reason"), [(torch.float64, 16, "float16, bfloat16 or float32"),
                                                    (torch.float32, 8, "head dims"),
                                                    (torch.float32, 128, "head dims")])
def test_inputs_the_kernels_do_not_take(dtype, d, reason):
    q, k, v, bias, mask, _ = _inputs(1, 3, 1, d, dtype, seed=9)
    with pytest.raises(RuntimeError, match=f"backend='triton' cannot run triangle_attention: .*{reason}"):
        genie_tk.triangle_attention(q, k, v, bias, mask, backend="triton")
    # auto never picks an unverified kernel: torch runs it.
    genie_tk.triangle_attention(q, k, v, bias, mask)
    assert genie_tk.last_backend("triangle_attention") == "torch"


class _Config:
    def __init__(self, bj, bk, warps, stages):
        self.kwargs = {"BLOCK_J": bj, "BLOCK_K": bk}
        self.num_warps, self.num_stages = warps, stages


@pytest.mark.parametrize(("smem", "kept"), [(232448, [0, 1]), (101376, [0]), (49152, [0])])
def test_pruning_drops_configs_a_gpu_cannot_hold(monkeypatch, smem, kept):
    """H100 (227 KiB a block), RTX 4090 (99 KiB) and a 48 KiB part: 128x128 tiles need
    more than 192 registers a thread anywhere, 3-stage 128x64 more shared memory than an
    RTX 4090 has, and where nothing fits the smallest config stays."""
    monkeypatch.setattr(ta, "_device_limits", lambda: (smem, 65536))
    configs = [_Config(64, 64, 4, 2), _Config(128, 64, 8, 3), _Config(128, 128, 8, 3)]
    q = torch.empty(1, dtype=torch.bfloat16)
    pruned = ta._pruner(streamed=2, tiles=4)(configs, {"Q": q}, HEAD_DIM=64)
    print([(c.kwargs, c.num_stages) for c in pruned])
    assert pruned == [configs[i] for i in kept]


# ------------------------------------------------------------ the fused gate of the layer


def _gate_inputs(dtype=torch.float32, b=2, n_i=3, h=3, n=5, d=16, seed=10):
    """Attention output ``[B, I, H, J, D]``, the gate slice of a wider projection (a
    strided view, as the layer passes it; H·D = 48 leaves a column tail) and its bias."""
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(b, n_i, h, n, d, generator=g).to(dtype)
    proj = torch.randn(b, n_i, n, 3 * h * d, generator=g).to(dtype)
    gate = proj[..., h * d: 2 * h * d]
    return o, gate, torch.randn(h * d, generator=g).to(dtype)


def test_fused_gate_is_the_gated_head_merge_with_its_gradients(monkeypatch):
    _poisoned(monkeypatch)
    o, g, b_g = _gate_inputs()
    leaves = [t.clone().requires_grad_(True) for t in (o, g, b_g)]
    y = ta.gate_fwd(*leaves)
    dy = torch.randn_like(y)
    got = [y.detach(), *torch.autograd.grad(y, leaves, dy)]
    wide = [t.double().requires_grad_(True) for t in (o, g, b_g)]
    y64 = wide[0].transpose(2, 3).flatten(-2) * torch.sigmoid(wide[1] + wide[2])
    want = [y64.detach(), *torch.autograd.grad(y64, wide, dy.double())]
    for name, a, w in zip(("y", "do", "dg", "db_g"), got, want):
        print(f"gate {name}: rel {rel(a, w):.2e}")
        assert torch.isfinite(a).all() and a.shape == w.shape and rel(a, w) < 1e-6, name


def test_fused_gate_ops_pass_opcheck():
    o, g, b_g = _gate_inputs(n=3, n_i=2, b=1)
    leaves = [t.clone().requires_grad_(True) for t in (o, g, b_g)]
    torch.library.opcheck(torch.ops.genie_tk.triton_gate_fwd.default, tuple(leaves))
    y = ta.gate_fwd(o, g, b_g)
    torch.library.opcheck(torch.ops.genie_tk.triton_gate_bwd.default, (torch.randn_like(y), o, g, b_g))


# ------------------------------------------------------------ the GPU path compiles


@pytest.mark.parametrize(("arch", "dtype", "head_dim"), [(90, "bf16", 32), (80, "fp16", 64)])
def test_kernels_compile_for_gpus_without_one(arch, dtype, head_dim):
    """Triton's whole GPU pipeline (to cubin through ptxas) for every kernel, in a
    process without the interpreter: Hopper with bf16, Ampere with fp16."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_triton_kernels.py")
    done = subprocess.run([sys.executable, str(script), str(arch), dtype, str(head_dim)], env=env,
                          capture_output=True, text=True, timeout=600)
    print(done.stdout, done.stderr)
    assert done.returncode == 0
    assert done.stdout.count(": ok,") == 6
