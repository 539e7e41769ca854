"""The triangle attention kernels on a Hopper GPU (marked ``cuda`` by file name).

What a GPU session runs before setting ``VERIFIED = True`` in tk_attention.py (and the
READMEs, which tests/test_dispatch.py holds to that flag):

* outputs and all four gradients against a float64 oracle, on fresh random
  inputs with padded (fully masked) rows and columns and random holes, for
  N in {1, 17, 128, 130, 255, 256, 300, 1000, 1024, 2048} (130 and 300: odd
  tile counts above one), H in {4, 8}, head dims 16/32/64,
  batch 1 and 3, bfloat16 and float16: the kernel's error must be at most twice
  that of the PyTorch (torch backend) implementation in the same precision;
* the layer op (starting and ending node) the same way, parameter gradients too;
* every output element written (outputs poisoned with NaN first), the
  statistics format, run-to-run determinism of dk/dv/dbias;
* opcheck, torch.compile(fullgraph=True) of a module on the tk backend,
  launches on the current stream with no synchronisation;
* fallback reasons for inputs the kernels do not take.

The float64 oracle uses a mask bias of 1e30 instead of 1e9: in float64, -1e9
does not swamp the triangle bias, so a fully masked row would follow
softmax(bias), whereas in float32 (the kernels, PyTorch in bf16/fp16, OpenFold
in fp32) it is uniform; at 1e30 float64 rounds the same way. Partially masked
rows are identical under both (exp underflows to 0).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import genie_tk
from genie_tk import _backend, openfold3, tk_attention
from genie_tk.testing import TRI_ATT, build, forward_backward, pair_mask, perturbed, rel

ORACLE_INF = 1e30
FLOOR = 1e-6  # absolute slack for errors that are zero up to rounding (N = 1)


def _hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the kernels are built for sm_90a (Hopper)")
    if not tk_attention.REGISTERED:
        pytest.skip("genie_tk._C is not built with the triangle attention kernels")
    assert _backend._C.driver_status() == ""


@pytest.fixture(autouse=True)
def hopper():
    _hopper()


def _inputs(b, n, h, d, dtype, seed, n_pad=None, drop=0.1):
    """Fresh random q, k, v, bias, dout (``dtype``, CUDA) and a 0/1 mask with the
    last ``n_pad`` rows and columns padded (fully masked rows) and holes."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)

    q, k, v, dout = (randn(b, n, h, n, d) for _ in range(4))
    bias = randn(b, h, n, n)
    n_pad = max(1, n // 8) if n_pad is None else n_pad
    mask = pair_mask(b, n, n_pad if n > 1 else 0, drop if n > 1 else 0.0, seed, dtype=torch.float32).cuda()
    return q, k, v, bias, mask, dout


def _attention(backend, q, k, v, bias, mask, dout, inf=1e9, chunk_size=None):
    """Output and gradients (dq, dk, dv, dbias) of one backend."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
    out = genie_tk.triangle_attention(*leaves, mask, inf=inf, chunk_size=chunk_size, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out.detach(), *grads]


def _oracle(q, k, v, bias, mask, dout):
    """float64, float32 mask semantics (see the module docstring)."""
    n = q.shape[-2]
    wide = [t.double() for t in (q, k, v, bias)]
    backend = "reference" if n <= 256 else "torch"
    chunk = None if n <= 256 else max(1, (1 << 27) // (q.shape[0] * q.shape[2] * n * n))
    return _attention(backend, *wide, mask, dout.double(), inf=ORACLE_INF, chunk_size=chunk)


NAMES = ("o", "dq", "dk", "dv", "dbias")


def _compare(got, pytorch, want, label, names=NAMES):
    for name, g, p, w in zip(names, got, pytorch, want, strict=True):
        e_tk, e_pt = rel(g, w), rel(p, w)
        print(f"{label} {name}: tk {e_tk:.3e}  torch {e_pt:.3e}  ratio {e_tk / max(e_pt, 1e-30):.2f}")
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        assert e_tk <= 2 * e_pt + FLOOR, f"{name}: tk error {e_tk:.3e} > 2 x torch error {e_pt:.3e}"


# (batch, N, heads, head dim, dtype)
CASES = [
    (1, 1, 4, 32, torch.bfloat16),
    (1, 17, 4, 32, torch.bfloat16),
    (3, 17, 8, 16, torch.bfloat16),
    (1, 128, 4, 64, torch.bfloat16),
    (1, 130, 4, 32, torch.bfloat16),
    (3, 130, 4, 16, torch.float16),
    (3, 255, 8, 32, torch.bfloat16),
    (1, 256, 4, 16, torch.bfloat16),
    (1, 300, 4, 32, torch.bfloat16),
    (2, 300, 8, 64, torch.float16),
    (1, 1000, 4, 32, torch.bfloat16),
    (1, 1024, 8, 32, torch.bfloat16),
    (1, 2048, 4, 32, torch.bfloat16),
    (1, 17, 4, 32, torch.float16),
    (3, 255, 4, 64, torch.float16),
    (1, 1000, 8, 16, torch.float16),
    (1, 1024, 4, 64, torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-N{c[1]}-H{c[2]}-D{c[3]}-{str(c[4])[6:]}")
def test_matches_float64_within_twice_pytorch_error(case):
    b, n, h, d, dtype = case
    q, k, v, bias, mask, dout = _inputs(b, n, h, d, dtype, seed=n * 31 + h * 7 + d)
    want = _oracle(q, k, v, bias, mask, dout)
    pytorch = _attention("torch", q, k, v, bias, mask, dout)
    got = _attention("tk", q, k, v, bias, mask, dout)
    assert genie_tk.last_backend("triangle_attention") == "tk"
    _compare(got, pytorch, want, f"B{b} N{n} H{h} D{d} {dtype}")


def test_without_mask_and_with_bool_mask():
    q, k, v, bias, mask, dout = _inputs(2, 100, 4, 32, torch.bfloat16, seed=11)
    for m in (None, mask.bool()):
        want = _oracle(q, k, v, bias, m, dout)
        _compare(_attention("tk", q, k, v, bias, m, dout), _attention("torch", q, k, v, bias, m, dout), want,
                 "mask " + ("None" if m is None else "bool"))


@pytest.mark.parametrize("cls", TRI_ATT)
@pytest.mark.parametrize("n", [37, 200])
def test_layer_matches_float64_within_twice_pytorch_error(cls, n):
    c, hidden, heads = 64, 32, 4
    oracle = build(cls, c, hidden, heads, seed=n, dtype=torch.float64, backend="torch").cuda()
    oracle.inf = ORACLE_INF
    z = torch.randn(2, n, n, c, device="cuda", dtype=torch.float64)
    mask = pair_mask(2, n, 3, 0.1, n).cuda()
    cotangent = torch.randn_like(z)
    want = forward_backward(oracle, z, mask, cotangent)
    results = {}
    for backend in ("torch", "tk"):
        m = copy.deepcopy(oracle).to(torch.bfloat16)  # the same rounded weights for both
        m.inf, m.backend = 1e9, backend
        results[backend] = forward_backward(m, z.bfloat16(), mask, cotangent.bfloat16())
    assert genie_tk.last_backend("triangle_attention_layer") == "tk"

    def flat(result):  # output, input gradient, parameter gradients
        return [result[0], result[1], *(result[2][name] for name in want[2])]

    _compare(flat(results["tk"]), flat(results["torch"]), flat(want), f"{cls.__name__} N{n}",
             names=["out", "dz", *want[2]])


def _kernel_args(b=2, n=255, h=3, d=32, dtype=torch.bfloat16, seed=5):
    q, k, v, bias, mask, dout = _inputs(b, n, h, d, dtype, seed)
    n_pad = tk_attention.padded_keys(n)
    bias_p = torch.nn.functional.pad(bias, (0, n_pad - n)).contiguous()
    kb = tk_attention.key_bias(mask, (b, n, n), n_pad, 1e9, torch.float32, q.device)
    return q, k, v, bias, bias_p, mask, kb, dout, 1 / math.sqrt(d)


def test_every_output_element_is_written():
    ext = _backend._C
    q, k, v, _, bias_p, _, kb, dout, scale = _kernel_args()
    stream = torch.cuda.current_stream().cuda_stream
    b, n, h = q.shape[0], q.shape[1], q.shape[2]
    o = torch.full_like(q, float("nan"))
    stats = torch.full((b, n, h, n, 2), float("nan"), device="cuda")
    ext.triangle_attention_fwd(o, stats, q, k, v, bias_p, kb, scale, stream)
    delta = torch.full((b, n, h, n), float("nan"), device="cuda")
    ext.triangle_attention_bwd_delta(delta, dout, o, stream)
    dq = torch.zeros(q.shape, device="cuda")
    dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    ext.triangle_attention_bwd_dqkv(dq, dk, dv, dout, q, k, v, bias_p, kb, stats, delta, scale, stream)
    splits = ext.triangle_attention_dbias_splits(b, n, h, n, torch.cuda.get_device_properties(0).multi_processor_count)
    partial = torch.full((splits, b, h, n, bias_p.shape[-1]), float("nan"), device="cuda")
    ext.triangle_attention_bwd_dbias(partial, dout, q, k, v, bias_p, kb, stats, delta, scale, stream)
    torch.cuda.synchronize()
    for name, t in (("o", o), ("stats", stats), ("delta", delta), ("dq", dq), ("dk", dk), ("dv", dv),
                    ("dbias_partial", partial)):
        unwritten = (~torch.isfinite(t)).sum().item()
        print(f"{name}: {unwritten} non-finite of {t.numel()}")
        assert unwritten == 0, name
    assert (partial[..., n:] == 0).all()  # keys past N carry no gradient


def test_forward_matches_its_emulation_and_stats_format():
    q, k, v, bias, _, mask, _, _, scale = _kernel_args(n=130, seed=6)
    o, stats = torch.ops.genie_tk.triangle_attention_fwd(q, k, v, bias, mask, scale, 1e9)
    o_e, stats_e = tk_attention.emulate_forward(q, k, v, bias, mask, scale, 1e9)
    print(f"o rel {rel(o, o_e):.2e}, max rel {rel(stats[..., 0], stats_e[..., 0]):.2e}, "
          f"log-sum rel {rel(stats[..., 1], stats_e[..., 1]):.2e}")
    assert rel(o, o_e) < 1e-2
    torch.testing.assert_close(stats, stats_e, rtol=1e-5, atol=1e-3)
    full = (mask == 0).all(-1)  # fully masked rows: uniform, log2-sum = log2(N)
    torch.testing.assert_close(stats[..., 1][full], torch.full_like(stats[..., 1][full], math.log2(130)))


def test_backward_is_deterministic_except_dq_order():
    q, k, v, bias, mask, dout = _inputs(1, 300, 4, 32, torch.bfloat16, seed=7)
    first = _attention("tk", q, k, v, bias, mask, dout)
    second = _attention("tk", q, k, v, bias, mask, dout)
    for name, a, c in zip(NAMES, first, second):
        if name == "dq":  # fp32 additions from several CTAs, in any order
            torch.testing.assert_close(a, c, rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(a, c), name


def test_opcheck():
    q, k, v, bias, mask, _ = _inputs(1, 70, 2, 32, torch.bfloat16, seed=8)
    leaves = [t.requires_grad_(True) for t in (q, k, v, bias)]
    torch.library.opcheck(torch.ops.genie_tk.triangle_attention_fwd.default, (*leaves, mask.bool(), 0.2, 1e9))
    o, stats = torch.ops.genie_tk.triangle_attention_fwd(q.detach(), k.detach(), v.detach(), bias.detach(),
                                                         mask, 0.2, 1e9)
    args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), bias.detach(), mask, o, stats, 0.2, 1e9)
    torch.library.opcheck(torch.ops.genie_tk.triangle_attention_bwd.default, args)


@pytest.mark.parametrize("cls", TRI_ATT)
def test_compiled_module_fullgraph(cls):
    module = build(cls, 32, 32, 4, seed=9, dtype=torch.bfloat16, backend="tk").cuda()
    z = torch.randn(1, 48, 48, 32, device="cuda", dtype=torch.bfloat16)
    mask = pair_mask(1, 48, 2, 0.1, 9).cuda()
    cotangent = torch.randn_like(z)
    eager = forward_backward(module, z, mask, cotangent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo's own
        compiled = torch.compile(module, fullgraph=True)
        got = forward_backward(compiled, z, mask, cotangent)
    assert rel(got[0], eager[0]) < 1e-2 and rel(got[1], eager[1]) < 2e-2


def test_launches_on_the_current_stream_without_synchronising():
    q, k, v, bias, mask, dout = _inputs(1, 200, 4, 32, torch.bfloat16, seed=10)
    expected = _attention("tk", q, k, v, bias, mask, dout)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    late_q = torch.zeros_like(q)
    with torch.cuda.stream(side):
        # The side stream is busy, then writes q: a kernel launched on any other
        # stream would read zeros.
        torch.cuda._sleep(100_000_000)
        late_q.copy_(q)
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = _attention("tk", late_q, k, v, bias, mask, dout)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
    for name, g, e in zip(NAMES, got, expected):
        if name == "dq":
            torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-3)
        else:
            assert torch.equal(g, e), name


@pytest.mark.parametrize(("dtype", "d", "reason"), [
    (torch.float32, 32, "bfloat16 or float16"),
    (torch.bfloat16, 8, "head dims"),
    (torch.bfloat16, 128, "head dims"),
])
def test_inputs_the_kernels_do_not_take(monkeypatch, dtype, d, reason):
    q, k, v, bias, mask, _ = _inputs(1, 20, 2, d, dtype, seed=12)
    with pytest.raises(RuntimeError, match=f"backend='tk' cannot run triangle_attention: .*{reason}"):
        genie_tk.triangle_attention(q, k, v, bias, mask, backend="tk")
    monkeypatch.setattr(_backend, "_WARNED", set())
    with pytest.warns(genie_tk.BackendFallbackWarning) as caught:
        genie_tk.triangle_attention(q, k, v, bias, mask)
        genie_tk.triangle_attention(q, k, v, bias, mask)
    assert len(caught) == 1
    assert genie_tk.last_backend("triangle_attention") == "torch"
    if _backend.TK_KERNELS["triangle_attention"].verified:
        assert reason in str(caught[0].message)


@pytest.mark.parametrize("transpose_bias", [False, True])
def test_openfold3_layout_matches_float64_within_twice_pytorch_error(transpose_bias):
    """genie_tk.openfold3's layer (bias-free linears, ``transpose_bias``) on the kernels."""
    c, hidden, heads, n = 64, 32, 4, 100
    torch.manual_seed(n)
    oracle = perturbed(openfold3.TriangleAttention(c, hidden, heads).double(), n).cuda()
    oracle.inf, oracle.backend = ORACLE_INF, "torch"
    z = torch.randn(2, n, n, c, device="cuda", dtype=torch.float64)
    mask = pair_mask(2, n, 3, 0.1, n).cuda()
    cotangent = torch.randn_like(z)

    def run(m, dtype):
        m.zero_grad(set_to_none=True)
        x = z.detach().to(dtype).requires_grad_(True)
        out = m(x, mask, transpose_bias=transpose_bias)
        (out * cotangent.to(dtype)).sum().backward()
        return [out.detach(), x.grad, *(p.grad for p in m.parameters())]

    want = run(oracle, torch.float64)
    results = {}
    for backend in ("torch", "tk"):
        m = copy.deepcopy(oracle).to(torch.bfloat16)
        m.inf, m.backend = 1e9, backend
        results[backend] = run(m, torch.bfloat16)
    assert genie_tk.last_backend("triangle_attention_layer") == "tk"
    names = ["out", "dz", *(name for name, _ in oracle.named_parameters())]
    _compare(results["tk"], results["torch"], want, f"openfold3 transpose_bias={transpose_bias}", names=names)
