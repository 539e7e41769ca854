"""The triton triangle attention kernels on a GPU (marked ``cuda`` by file name).

What a GPU session runs before setting ``verified=True`` for ``triangle_attention`` and
``triangle_attention_layer`` in ``genie_tk/triton/__init__.py`` (the same matrix as
test_tk_attention_cuda.py, on any GPU from Ampere on):

* outputs and all four gradients against a float64 oracle (mask bias 1e30, see
  test_tk_attention_cuda.py) with padded rows and columns and random holes, N up to
  2048 with odd tails (17, 130, 255, 300, 1000), H 4/8, head dims 16/32/64, batch 1
  and 3, bfloat16, float16 and float32: error at most twice the torch backend's in the
  same precision, overall and per query row (worst row);
* every element written: outputs, statistics and gradients allocated full of NaN;
* the layer op (starting and ending node), parameter gradients too;
* determinism (no atomics anywhere: every gradient bit-identical run to run), opcheck,
  torch.compile(fullgraph=True) with inductor, launches on the current stream with no
  synchronisation; autotuning keeps at least one config.

The CPU tests (test_triton_attention.py) prove the same kernels under the interpreter.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import genie_tk
from genie_tk.testing import TRI_ATT, build, forward_backward, pair_mask, rel

ta = pytest.importorskip("genie_tk.triton.triangle_attention")

ORACLE_INF = 1e30
FLOOR = 1e-6  # absolute slack for errors that are zero up to rounding (N = 1)
NAMES = ("o", "dq", "dk", "dv", "dbias")


@pytest.fixture(autouse=True)
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the triton kernels need sm_80 or newer")
    if ta.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 runs the kernels on CPU tensors")


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output allocated full of NaN: an unwritten element shows."""
    monkeypatch.setattr(ta, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                              device=device))


def _inputs(b, n, h, d, dtype, seed, n_pad=None, drop=0.1):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)

    q, k, v, dout = (randn(b, n, h, n, d) for _ in range(4))
    bias = randn(b, h, n, n)
    n_pad = max(1, n // 8) if n_pad is None else n_pad
    mask = pair_mask(b, n, n_pad if n > 1 else 0, drop if n > 1 else 0.0, seed, dtype=torch.float32).cuda()
    return q, k, v, bias, mask, dout


def _attention(backend, q, k, v, bias, mask, dout, inf=1e9, chunk_size=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
    out = genie_tk.triangle_attention(*leaves, mask, inf=inf, chunk_size=chunk_size, backend=backend)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout.to(out.dtype))]


def _oracle(q, k, v, bias, mask, dout):
    n = q.shape[-2]
    wide = [t.double() for t in (q, k, v, bias)]
    backend = "reference" if n <= 256 else "torch"
    chunk = None if n <= 256 else max(1, (1 << 27) // (q.shape[0] * q.shape[2] * n * n))
    return _attention(backend, *wide, mask, dout.double(), inf=ORACLE_INF, chunk_size=chunk)


def _row_error(t, w):
    """Worst relative error of one row (the last axis), rows whose norm is under 1e-3 of
    the mean row norm measured against that floor instead of their own norm."""
    t, w = t.double().flatten(0, -2), w.double().flatten(0, -2)
    norms = w.norm(dim=-1)
    return ((t - w).norm(dim=-1) / norms.clamp_min(1e-3 * norms.mean().item() + 1e-30)).max().item()


def _compare(got, pytorch, want, label, names=NAMES, rows=True):
    for name, g, p, w in zip(names, got, pytorch, want, strict=True):
        e_tr, e_pt = rel(g, w), rel(p, w)
        print(f"{label} {name}: triton {e_tr:.3e}  torch {e_pt:.3e}  ratio {e_tr / max(e_pt, 1e-30):.2f}")
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        assert e_tr <= 2 * e_pt + FLOOR, f"{name}: triton error {e_tr:.3e} > 2 x torch error {e_pt:.3e}"
        if rows and g.dim() > 1:
            r_tr, r_pt = _row_error(g, w), _row_error(p, w)
            print(f"{label} {name}: worst row triton {r_tr:.3e}  torch {r_pt:.3e}")
            assert r_tr <= 2 * r_pt + FLOOR, f"{name}: worst row {r_tr:.3e} > 2 x torch {r_pt:.3e}"


# (batch, N, heads, head dim, dtype)
CASES = [
    (1, 1, 4, 32, torch.bfloat16),
    (1, 17, 4, 32, torch.bfloat16),
    (3, 17, 8, 16, torch.bfloat16),
    (1, 128, 4, 64, torch.bfloat16),
    (1, 130, 4, 32, torch.bfloat16),
    (3, 255, 8, 32, torch.bfloat16),
    (1, 256, 4, 16, torch.bfloat16),
    (1, 300, 4, 64, torch.bfloat16),
    (1, 1000, 4, 32, torch.bfloat16),
    (1, 1024, 8, 32, torch.bfloat16),
    (1, 2048, 4, 32, torch.bfloat16),
    (1, 17, 4, 32, torch.float16),
    (3, 255, 4, 64, torch.float16),
    (1, 1000, 8, 16, torch.float16),
    (1, 1024, 4, 64, torch.float16),
    (1, 130, 4, 32, torch.float32),
    (1, 300, 2, 64, torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-N{c[1]}-H{c[2]}-D{c[3]}-{str(c[4])[6:]}")
def test_matches_float64_within_twice_pytorch_error(poisoned, case):
    b, n, h, d, dtype = case
    q, k, v, bias, mask, dout = _inputs(b, n, h, d, dtype, seed=n * 31 + h * 7 + d)
    want = _oracle(q, k, v, bias, mask, dout)
    pytorch = _attention("torch", q, k, v, bias, mask, dout)
    got = _attention("triton", q, k, v, bias, mask, dout)
    assert genie_tk.last_backend("triangle_attention") == "triton"
    _compare(got, pytorch, want, f"B{b} N{n} H{h} D{d} {dtype}")


def test_without_mask_and_with_bool_mask(poisoned):
    q, k, v, bias, mask, dout = _inputs(2, 100, 4, 32, torch.bfloat16, seed=11)
    for m in (None, mask.bool()):
        _compare(_attention("triton", q, k, v, bias, m, dout), _attention("torch", q, k, v, bias, m, dout),
                 _oracle(q, k, v, bias, m, dout), "mask " + ("None" if m is None else "bool"))


def test_every_output_element_is_written(poisoned):
    q, k, v, bias, mask, dout = _inputs(2, 255, 3, 32, torch.bfloat16, seed=5)
    o, stats = ta.attention_fwd(q, k, v, bias, mask, 0.2, 1e9)
    grads = ta.attention_bwd(dout, q, k, v, bias, mask, o, stats, 0.2, 1e9)
    torch.cuda.synchronize()
    for name, t in zip(("o", "stats", *NAMES[1:]), (o, stats, *grads)):
        unwritten = (~torch.isfinite(t)).sum().item()
        print(f"{name}: {unwritten} non-finite of {t.numel()}")
        assert unwritten == 0, name


@pytest.mark.parametrize("cls", TRI_ATT)
@pytest.mark.parametrize("n", [37, 200])
def test_layer_matches_float64_within_twice_pytorch_error(poisoned, cls, n):
    c, hidden, heads = 64, 32, 4
    oracle = build(cls, c, hidden, heads, seed=n, dtype=torch.float64, backend="torch").cuda()
    oracle.inf = ORACLE_INF
    z = torch.randn(2, n, n, c, device="cuda", dtype=torch.float64)
    mask = pair_mask(2, n, 3, 0.1, n).cuda()
    cotangent = torch.randn_like(z)
    want = forward_backward(oracle, z, mask, cotangent)
    results = {}
    for backend in ("torch", "triton"):
        m = copy.deepcopy(oracle).to(torch.bfloat16)
        m.inf, m.backend = 1e9, backend
        results[backend] = forward_backward(m, z.bfloat16(), mask, cotangent.bfloat16())
    assert genie_tk.last_backend("triangle_attention_layer") == "triton"

    def flat(result):
        return [result[0], result[1], *(result[2][name] for name in want[2])]

    _compare(flat(results["triton"]), flat(results["torch"]), flat(want), f"{cls.__name__} N{n}",
             names=["out", "dz", *want[2]], rows=False)


def test_backward_is_deterministic():
    q, k, v, bias, mask, dout = _inputs(1, 300, 4, 32, torch.bfloat16, seed=7)
    first = _attention("triton", q, k, v, bias, mask, dout)
    second = _attention("triton", q, k, v, bias, mask, dout)
    for name, a, c in zip(NAMES, first, second):
        assert torch.equal(a, c), name


def test_opcheck():
    q, k, v, bias, mask, _ = _inputs(1, 70, 2, 32, torch.bfloat16, seed=8)
    leaves = [t.requires_grad_(True) for t in (q, k, v, bias)]
    torch.library.opcheck(torch.ops.genie_tk.triton_attention_fwd.default, (*leaves, mask.bool(), 0.2, 1e9))
    q, k, v, bias = (t.detach() for t in leaves)
    o, stats = ta.attention_fwd(q, k, v, bias, mask, 0.2, 1e9)
    torch.library.opcheck(torch.ops.genie_tk.triton_attention_bwd.default,
                          (torch.randn_like(o), q, k, v, bias, mask, o, stats, 0.2, 1e9))


@pytest.mark.parametrize("cls", TRI_ATT)
def test_compiled_module_fullgraph(cls):
    module = build(cls, 32, 32, 4, seed=9, dtype=torch.bfloat16, backend="triton").cuda()
    z = torch.randn(1, 48, 48, 32, device="cuda", dtype=torch.bfloat16)
    mask = pair_mask(1, 48, 2, 0.1, 9).cuda()
    cotangent = torch.randn_like(z)
    eager = forward_backward(module, z, mask, cotangent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.compile(module, fullgraph=True)
        got = forward_backward(compiled, z, mask, cotangent)
    assert rel(got[0], eager[0]) < 1e-2 and rel(got[1], eager[1]) < 2e-2


def test_launches_on_the_current_stream_without_synchronising():
    q, k, v, bias, mask, dout = _inputs(1, 200, 4, 32, torch.bfloat16, seed=10)
    expected = _attention("triton", q, k, v, bias, mask, dout)  # also autotunes outside the check
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    late_q = torch.zeros_like(q)
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        late_q.copy_(q)
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = _attention("triton", late_q, k, v, bias, mask, dout)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    for name, g, e in zip(NAMES, got, expected):
        assert torch.equal(g, e), name


def test_pruning_keeps_a_config_on_this_gpu():
    q = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    for streamed, tiles in ((2, 3), (2, 4), (2, 5), (4, 4)):
        for d in ta.HEAD_DIMS:
            kept = ta._pruner(streamed, tiles)(ta._BWD_CONFIGS, {"Q": q}, HEAD_DIM=d)
            print(streamed, tiles, d, [c.kwargs for c in kept])
            assert kept
