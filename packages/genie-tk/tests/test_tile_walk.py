"""CPU tile-walk models of every tk kernel, run in CI.

Models: the attention forward (first and in most detail), dq/dk/dv, dbias, and
the tri-mul contraction, input and output passes; the bwd_delta kernel is a
plain row reduction and is left to the GPU tests.

The kernel (csrc/triangle_attention/triangle_attention_fwd_sm90.cuh) has never
run on a GPU; this walks its schedule on the CPU, step by step, with the same
structure, so that index and phase regressions show without one:

* the same CTA decomposition: blockIdx -> (b, row group, h, query superblock),
  ``rows_per_cta x query_blocks`` consumer warpgroups, one producer;
* TMA boxes on the same 4-D global layouts, zero-filled per dimension where a
  box reaches past a dimension (rows i >= I on the depth axis I*H, queries and
  keys >= N), and TMA stores that drop what falls outside;
* mbarriers with arrival counts, expect-tx bytes and phase parity, the
  ``pipeline`` ring of ``stages`` buffers: every ``expect_bytes`` must equal the
  bytes its loads deliver (a shortfall is a hang, an excess an underflow), every
  buffer a consumer reads must hold the step it expects (a stale or overwritten
  buffer is a phase bug); the producer and consumers are coroutines run in a
  seeded random interleaving, and a state where none can move is reported as a
  hang naming the barrier, parity and step;
* the online softmax tile by tile in base 2 (row max, rescale, row sum, keys
  >= N excluded), in float64, so the result must equal the kernel's PyTorch
  emulation (``tk_attention.emulate_forward``) on float64 inputs to rounding.

The launch constants (tile size, rows per CTA, query blocks, stages) are read
from the kernel's source, so a change of configuration there is walked here.

The second model walks ``trimul_contract`` (csrc/triangle_multiplication/
trimul_contract_sm90.cu): its persistent grid (each block strides over the
output tiles), the ring of stages whose slot and parity count stage uses
across all tasks of a block (and whose producer's first wait is on the
"previous" parity of a fresh barrier), transposed operands read in place, and
the 64 x 256 output tiles stored with rows >= N dropped; it must equal
``tk_trimul.Emulation.trimul_contract`` in float64 in all three modes.
What the model cannot see: register layouts, swizzling, wgmma semantics and
real asynchrony; those are for the GPU visit (benchmarks/gpu_visit.py).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from genie_tk import tk_attention

CSRC = Path(__file__).resolve().parents[1] / "csrc" / "triangle_attention"
TRIMUL_CSRC = CSRC.parent / "triangle_multiplication"
LOG2E = 1.4426950408889634


def _constants(struct: str, path: Path, d: int) -> dict[str, int]:
    """``static constexpr int`` members of ``struct`` in ``path`` at head dim ``d``
    (the forms used there: integers, names, ``a ? b : c``, + - * /, comparisons)."""
    text = path.read_text()
    body = text[text.index(f"struct {struct}"):]
    body = body[: body.index("};")]
    values: dict[str, int] = {"D": d, "WARPGROUP_THREADS": 128, "WARPGROUP_WARPS": 4}
    for name, expr in re.findall(r"static constexpr int (\w+) = ([^;]+);", body):
        py = re.sub(r"(.+?)\s*\?\s*(.+?)\s*:\s*(.+)", r"(\2 if \1 else \3)", expr.strip())
        py = re.sub(r"//.*", "", py).replace("/", "//")
        values[name] = int(eval(py, {}, dict(values)))  # the project's own source
    return values


def fwd_config(d: int) -> dict[str, int]:
    c = _constants("fwd_config", CSRC / "triangle_attention_fwd_sm90.cuh", d)
    block = re.search(r"kTriangleAttentionBlock = (\d+);", (CSRC / "triangle_attention.h").read_text())
    c["block"] = int(block.group(1))
    return c


# ---------------------------------------------------------------- the machine


class Hang(RuntimeError):
    """No coroutine can proceed: the kernel would hang here."""


class Fault(AssertionError):
    """A state the kernel must never reach (tx underflow, stale buffer, ...)."""


@dataclass
class MBarrier:
    name: str
    arrivals: int  # expected arrivals per phase
    pending: int = 0
    tx: int = 0
    completed: int = 0  # phases completed; the current phase's parity is completed % 2

    def __post_init__(self):
        self.pending = self.arrivals

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.completed += 1
            self.pending = self.arrivals

    def arrive(self):
        if self.pending == 0:
            raise Fault(f"{self.name}: more arrivals than its count")
        self.pending -= 1
        self._maybe_complete()

    def expect_bytes(self, n: int):  # mbarrier.arrive.expect_tx: one arrival and n bytes to come
        self.tx += n
        self.arrive()

    def complete_tx(self, n: int):
        self.tx -= n
        if self.tx < 0:
            raise Fault(f"{self.name}: {-self.tx} bytes delivered beyond expect_bytes (tx underflow)")
        self._maybe_complete()

    def ready(self, parity: int) -> bool:  # try_wait.parity: the phase of that parity has completed
        return self.completed % 2 != parity


@dataclass
class Wait:
    barrier: MBarrier
    parity: int
    who: str
    step: int

    def ready(self) -> bool:
        return self.barrier.ready(self.parity)

    def describe(self) -> str:
        return f"{self.who} waits on {self.barrier.name} parity {self.parity} at step {self.step}"


@dataclass
class NamedBarrier:
    """``bar.sync id, count``: released when ``count`` warpgroups have arrived."""

    name: str
    count: int
    arrived: int = 0
    generation: int = 0

    def sync(self, who: str, step: int) -> SyncWait:
        self.arrived += 1
        generation = self.generation
        if self.arrived == self.count:
            self.arrived, self.generation = 0, self.generation + 1
        return SyncWait(self, generation, who, step)


@dataclass
class SyncWait:
    barrier: NamedBarrier
    generation: int
    who: str
    step: int

    def ready(self) -> bool:
        return self.barrier.generation > self.generation

    def describe(self) -> str:
        return f"{self.who} waits at named barrier {self.barrier.name} at step {self.step}"


def run_coroutines(coroutines: dict[str, object], seed: int) -> None:
    """Runs generator coroutines that yield ``Wait``s or ``SyncWait``s in a random interleaving."""
    rng = random.Random(seed)
    waiting: dict[str, Wait | SyncWait | None] = {name: None for name in coroutines}
    while waiting:
        runnable = [n for n, w in waiting.items() if w is None or w.ready()]
        if not runnable:
            raise Hang("; ".join(w.describe() for w in waiting.values()))
        name = rng.choice(runnable)
        try:
            waiting[name] = next(coroutines[name])
        except StopIteration:
            del waiting[name]


def tma_load(tensor: torch.Tensor, box: tuple[int, ...], coord: tuple[int, ...],
             element_bytes: int) -> tuple[torch.Tensor, int]:
    """A TMA box of ``box`` elements at tile coordinate ``coord`` of a 4-D tensor:
    elements past any dimension read as zero. Returns the box and the bytes the
    copy engine delivers: always the whole box, at ``element_bytes`` per element
    (the kernel's type; the model computes in float64)."""
    out = torch.zeros(box, dtype=tensor.dtype)
    delivered = out.numel() * element_bytes
    src, dst = [], []
    for size, b, c in zip(tensor.shape, box, coord, strict=True):
        start = c * b
        lo, hi = max(start, 0), min(start + b, size)
        if hi <= lo:
            return out, delivered
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = tensor[tuple(src)]
    return out, delivered


def tma_store(tensor: torch.Tensor, box: torch.Tensor, coord: tuple[int, ...]) -> None:
    """A TMA store: the parts of ``box`` outside ``tensor`` are dropped."""
    src, dst = [], []
    for size, b, c in zip(tensor.shape, box.shape, coord, strict=True):
        start = c * b
        lo, hi = max(start, 0), min(start + b, size)
        if hi <= lo:
            return
        dst.append(slice(lo, hi))
        src.append(slice(lo - start, hi - start))
    tensor[tuple(dst)] = box[tuple(src)]


@dataclass
class Buffer:
    """A shared-memory buffer: its tiles and the step whose loads filled it."""

    tiles: dict = field(default_factory=dict)
    step: int = -1


# ---------------------------------------------------------------- the forward walk


@dataclass
class Faults:
    """Deliberate bugs, to show the model catches each kind."""

    stage_bytes_delta: int = 0  # expect_bytes off by this much
    ready_parity_flip: bool = False  # consumers wait on the wrong parity
    skip_release: bool = False  # a consumer never frees its buffer
    key_tile_offset: int = 0  # producer loads K/V of key tile kt + offset


def walk_forward(q, k, v, bias, key_bias, scale, seed=0, faults: Faults | None = None, d_config=None):
    """The forward kernel's schedule on float64 tensors (layouts of
    triangle_attention.h, bias padded to Np): returns (o, stats) as the kernel
    writes them, NaN wherever it writes nothing."""
    faults = faults or Faults()
    b_, rows, heads, n, d = q.shape
    c = fwd_config(d) if d_config is None else d_config
    blk, rpc, qb, stages = c["block"], c["rows_per_cta"], c["query_blocks"], c["stages"]
    consumers = rpc * qb
    n_pad = bias.shape[-1]
    elem = 2  # the kernel's bf16/fp16 operands: the bytes TMA moves
    rows_tile, score_tile, key_vec = blk * d * elem, blk * blk * elem, blk * 4

    # The kernel's global layouts: (B, I*H, N, D), (B, H, N, Np), (1, B, I, Np).
    def rows_gl(t):
        return t.reshape(b_, rows * heads, n, d)

    qg, kg, vg = rows_gl(q), rows_gl(k), rows_gl(v)
    kbg = key_bias.reshape(1, b_, rows, n_pad)
    o = torch.full((b_, rows * heads, n, d), float("nan"), dtype=torch.float64)
    stats = torch.full((b_, rows, heads, n, 2), float("nan"), dtype=torch.float64)

    row_groups = math.ceil(rows / rpc)
    query_supers = math.ceil(math.ceil(n / blk) / qb)
    key_tiles = math.ceil(n / blk)
    grid = b_ * row_groups * heads * query_supers
    def run_block(block: int) -> None:
        tile = block
        query_super = tile % query_supers
        tile //= query_supers
        h = tile % heads
        tile //= heads
        row_group = tile % row_groups
        b = tile // row_groups
        i0, jb0 = row_group * rpc, query_super * qb

        q_ready = MBarrier("q_ready", 1)
        ready = [MBarrier(f"pipeline.ready[{s}]", 1) for s in range(stages)]
        free = [MBarrier(f"pipeline.free[{s}]", consumers * 4) for s in range(stages)]
        buffers = [Buffer() for _ in range(stages)]
        q_s = {}
        # Thread 0 before __syncthreads: q tiles of every consumer on q_ready.
        q_ready.expect_bytes(consumers * rows_tile)
        for ci in range(rpc):
            for cj in range(qb):
                box, moved = tma_load(qg, (1, 1, blk, d), (b, (i0 + ci) * heads + h, jb0 + cj, 0), elem)
                q_s[ci * qb + cj] = box[0, 0]
                q_ready.complete_tx(moved)

        def producer():
            stage_bytes = rpc * (2 * rows_tile + key_vec) + qb * score_tile + faults.stage_bytes_delta
            for kt in range(key_tiles):
                s = kt % stages
                if kt >= stages:  # pipeline::acquire
                    yield Wait(free[s], ((kt // stages) - 1) & 1, "producer", kt)
                ready[s].expect_bytes(stage_bytes)
                buf = buffers[s]
                buf.step = kt
                kl = kt + faults.key_tile_offset
                for ci in range(rpc):
                    kv = (b, (i0 + ci) * heads + h, kl, 0)
                    for name, g in (("k", kg), ("v", vg)):
                        box, moved = tma_load(g, (1, 1, blk, d), kv, elem)
                        buf.tiles[name, ci] = box[0, 0]
                        ready[s].complete_tx(moved)
                    box, moved = tma_load(kbg, (1, 1, 1, blk), (0, b, i0 + ci, kt), 4)  # fp32
                    buf.tiles["key", ci] = box[0, 0, 0]
                    ready[s].complete_tx(moved)
                for cj in range(qb):
                    box, moved = tma_load(bias, (1, 1, blk, blk), (b, h, jb0 + cj, kt), elem)
                    buf.tiles["bias", cj] = box[0, 0]
                    ready[s].complete_tx(moved)

        def consumer(wg):
            ci, cj = wg // qb, wg % qb
            yield Wait(q_ready, 0, f"consumer {wg}", -1)
            qt = q_s[wg]
            acc = torch.zeros(blk, d, dtype=torch.float64)
            row_max = torch.full((blk,), -math.inf, dtype=torch.float64)
            row_sum = torch.zeros(blk, dtype=torch.float64)
            for kt in range(key_tiles):
                s = kt % stages
                parity = (kt // stages) & 1
                yield Wait(ready[s], parity ^ int(faults.ready_parity_flip), f"consumer {wg}", kt)
                buf = buffers[s]
                if buf.step != kt:
                    raise Fault(f"consumer {wg} at step {kt} reads buffer {s} holding step {buf.step}")
                # biased_scores: fma(bias, log2e, fma(qk, scale*log2e, key_bias2)); keys >= N -> -inf
                sc = (qt @ buf.tiles["k", ci].T) * (scale * LOG2E) + buf.tiles["key", ci][None, :]
                sc = sc + buf.tiles["bias", cj] * LOG2E
                keys = kt * blk + torch.arange(blk)
                sc[:, keys >= n] = -math.inf
                prev = row_max
                row_max = torch.maximum(row_max, sc.amax(1))
                rescale = torch.exp2(prev - row_max)  # exp2(-inf) = 0 on the first tile
                p = torch.exp2(sc - row_max[:, None])
                row_sum = row_sum * rescale + p.sum(1)
                acc = acc * rescale[:, None] + p @ buf.tiles["v", ci]
                if not (faults.skip_release and wg == 0):
                    for _ in range(4):  # pipeline::release, one arrival per warp
                        free[s].arrive()
            i, jb = i0 + ci, jb0 + cj
            tma_store(o, (acc / row_sum[:, None])[None, None], (b, i * heads + h, jb, 0))
            if i < rows:
                for r in range(blk):
                    row = jb * blk + r
                    if row < n:
                        stats[b, i, h, row] = torch.stack([row_max[r], torch.log2(row_sum[r])])

        coroutines = {"producer": producer(), **{f"consumer {w}": consumer(w) for w in range(consumers)}}
        try:
            run_coroutines(coroutines, seed * 1_000_003 + block)
        except Hang as exc:
            raise Hang(f"block {block}: {exc}") from None
        for bar in (q_ready, *ready, *free):
            if bar.tx != 0 or bar.pending != bar.arrivals:
                raise Fault(f"block {block}: {bar.name} left with {bar.tx} bytes and "
                            f"{bar.arrivals - bar.pending} arrivals of an unfinished phase")
    for block in range(grid):
        run_block(block)
    return o.reshape(b_, rows, heads, n, d), stats


def _inputs(b, rows, h, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, rows, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(b, h, n, n, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, rows, n, generator=g) > 0.2).double()
    if n > 1:
        mask[:, rows // 2] = 0  # a fully masked row
    n_pad = tk_attention.padded_keys(n)
    bias_p = torch.nn.functional.pad(bias, (0, n_pad - n))
    kb = tk_attention.key_bias(mask, (b, rows, n), n_pad, 1e9, torch.float64, "cpu")
    return q, k, v, bias, mask, bias_p, kb, 1 / math.sqrt(d)


# (N, I): N around the 64-key tile, with odd rows I (the last row pair half empty).
WALKS = [(1, 3), (17, 5), (63, 3), (64, 5), (65, 3), (130, 5), (255, 3), (300, 3)]


@pytest.mark.parametrize("d", [32, 64], ids=lambda d: f"d{d}")
@pytest.mark.parametrize(("n", "rows"), WALKS, ids=[f"N{n}-I{i}" for n, i in WALKS])
def test_forward_walk_equals_the_emulation(n, rows, d):
    q, k, v, bias, mask, bias_p, kb, scale = _inputs(2, rows, 2, n, d, seed=n * 7 + rows)
    o, stats = walk_forward(q, k, v, bias_p, kb, scale, seed=n)
    assert torch.isfinite(o).all(), "an output element the kernel's schedule never writes"
    assert torch.isfinite(stats).all(), "a statistics element the kernel's schedule never writes"
    o_e, stats_e = tk_attention.emulate_forward(q, k, v, bias, mask, scale, 1e9)
    err = (o - o_e).abs().max().item()
    print(f"N={n} I={rows} d={d}: max |o - emulation| {err:.2e}")
    # Rounding only: the fully masked row's logits sit near -1.4e9, where one
    # float64 ulp is 2.4e-7, and the tile products may sum in another order.
    assert err < 1e-6
    torch.testing.assert_close(stats, stats_e, rtol=1e-12, atol=1e-9)


def test_config_is_read_from_the_kernel_source():
    c32, c64 = fwd_config(32), fwd_config(64)
    print(c32, c64)
    assert c32["block"] == tk_attention.KEY_PAD
    assert c32["consumers"] == c32["rows_per_cta"] * c32["query_blocks"]
    assert c32["threads"] == (c32["consumers"] + 1) * 128
    assert c64["query_blocks"] <= c32["query_blocks"]
    assert c32["stages"] >= 2


def test_interleavings_do_not_matter():
    q, k, v, _, _, bias_p, kb, scale = _inputs(1, 3, 1, 200, 32, seed=1)
    first = walk_forward(q, k, v, bias_p, kb, scale, seed=1)
    for seed in (2, 3):
        other = walk_forward(q, k, v, bias_p, kb, scale, seed=seed)
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])


@pytest.mark.parametrize(("fault", "error", "message"), [
    (Faults(stage_bytes_delta=-64), Fault, r"delivered beyond expect_bytes"),
    (Faults(stage_bytes_delta=+64), Hang, r"consumer \d waits on pipeline.ready\[0\] parity 0 at step 0"),
    # Depending on the interleaving: the consumers read buffer 0 before it is
    # filled, or wait for a phase that has already passed.
    (Faults(ready_parity_flip=True), (Fault, Hang), r"reads buffer 0 holding step -1|ready\[0\] parity 1 at step 0"),
    (Faults(skip_release=True), Hang, r"producer waits on pipeline.free\[0\] parity 0 at step 3"),
], ids=["expect-too-few-bytes", "expect-too-many-bytes", "wrong-parity", "missing-release"])
def test_the_walk_catches_phase_and_byte_bugs(fault, error, message):
    q, k, v, _, _, bias_p, kb, scale = _inputs(1, 3, 1, 300, 32, seed=2)
    with pytest.raises(error, match=message):
        walk_forward(q, k, v, bias_p, kb, scale, faults=fault)


def test_the_walk_catches_an_index_bug():
    q, k, v, bias, mask, bias_p, kb, scale = _inputs(1, 3, 1, 130, 32, seed=3)
    o, _ = walk_forward(q, k, v, bias_p, kb, scale, faults=Faults(key_tile_offset=1))
    o_e, _ = tk_attention.emulate_forward(q, k, v, bias, mask, scale, 1e9)
    assert (o - o_e).abs().max().item() > 1e-2


# ---------------------------------------------------------------- tri-mul contraction walk


def contract_config() -> dict[str, int]:
    return _constants("config", TRIMUL_CSRC / "trimul_contract_sm90.cu", d=0)


def walk_contract(a, b, scale, mode, sms, seed=0, faults: Faults | None = None):
    """``trimul_contract``'s schedule on float64 ``[B, C, N, Np]`` operands."""
    faults = faults or Faults()
    c = contract_config()
    wgs, bm, bn, bk, slices, stages = (c[k] for k in ("consumer_warpgroups", "block_m", "block_n", "block_k",
                                                      "b_slices", "stages"))
    trans_a, trans_b = mode == "AtB", mode == "ABt"
    batch, channels, n, n_pad = a.shape
    elem = 2
    tile_bytes = bk * bk * elem
    stage_bytes = (wgs + slices) * tile_bytes + faults.stage_bytes_delta
    tiles_m, tiles_n, k_iters = math.ceil(n / bm), math.ceil(n_pad / bn), n_pad // bk
    tasks = batch * channels * tiles_m * tiles_n
    grid = min(tasks, sms)
    out = torch.full_like(a, float("nan"))

    def decode(task):
        per_channel = tiles_m * tiles_n
        bc, rem = divmod(task, per_channel)
        return bc // channels, bc % channels, rem % tiles_m, rem // tiles_m

    def run_block(block: int) -> None:
        full = [MBarrier(f"contract.full[{s}]", 1) for s in range(stages)]
        empty = [MBarrier(f"contract.empty[{s}]", wgs * 4) for s in range(stages)]
        buffers = [Buffer() for _ in range(stages)]

        def producer():
            it = 0
            for task in range(block, tasks, grid):
                bb, ch, tm, tn = decode(task)
                for k in range(k_iters):
                    s = it % stages
                    yield Wait(empty[s], ((it // stages) & 1) ^ 1, "producer", it)
                    full[s].expect_bytes(stage_bytes)
                    buf = buffers[s]
                    buf.step = it
                    for w in range(wgs):
                        m = tm * wgs + w
                        box, moved = tma_load(a, (1, 1, bk, bk), (bb, ch, k, m) if trans_a else (bb, ch, m, k), elem)
                        buf.tiles["a", w] = box[0, 0]
                        full[s].complete_tx(moved)
                    for q in range(slices):
                        col = tn * slices + q
                        box, moved = tma_load(b, (1, 1, bk, bk), (bb, ch, col, k) if trans_b else (bb, ch, k, col),
                                              elem)
                        buf.tiles["b", q] = box[0, 0]
                        full[s].complete_tx(moved)
                    it += 1

        def consumer(wg):
            it = 0
            for task in range(block, tasks, grid):
                bb, ch, tm, tn = decode(task)
                acc = torch.zeros(bk, bn, dtype=torch.float64)
                for _ in range(k_iters):
                    s = it % stages
                    yield Wait(full[s], ((it // stages) & 1) ^ int(faults.ready_parity_flip), f"consumer {wg}", it)
                    buf = buffers[s]
                    if buf.step != it:
                        raise Fault(f"consumer {wg} at stage use {it} reads slot {s} holding use {buf.step}")
                    a_t = buf.tiles["a", wg].T if trans_a else buf.tiles["a", wg]  # rows i, depth k
                    # B as depth x columns: the slices side by side (or stacked, read transposed).
                    if trans_b:
                        b_t = torch.cat([buf.tiles["b", q] for q in range(slices)], 0).T
                    else:
                        b_t = torch.cat([buf.tiles["b", q] for q in range(slices)], 1)
                    acc = acc + a_t @ b_t
                    if not (faults.skip_release and wg == 0):
                        for _ in range(4):  # lane 0 of each warp arrives
                            empty[s].arrive()
                    it += 1
                tma_store(out, (acc * scale)[None, None], (bb, ch, tm * wgs + wg, tn))

        coroutines = {"producer": producer(), **{f"consumer {w}": consumer(w) for w in range(wgs)}}
        try:
            run_coroutines(coroutines, seed * 1_000_003 + block)
        except Hang as exc:
            raise Hang(f"block {block}: {exc}") from None
        for bar in (*full, *empty):
            if bar.tx != 0 or bar.pending != bar.arrivals:
                raise Fault(f"block {block}: {bar.name} left mid-phase")

    for block in range(grid):
        run_block(block)
    return out


def _channel_first(batch, channels, n, seed):
    from genie_tk import tk_trimul

    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(batch, channels, n, tk_trimul.padded(n), dtype=torch.float64)
    t[..., :n] = torch.randn(batch, channels, n, n, generator=g, dtype=torch.float64)
    return t


CONTRACT_N = [1, 17, 63, 64, 65, 130, 255, 300]


@pytest.mark.parametrize("mode", ["ABt", "AtB", "AB"])
@pytest.mark.parametrize("n", CONTRACT_N, ids=lambda n: f"N{n}")
def test_contract_walk_equals_the_emulation(n, mode):
    from genie_tk import tk_trimul

    a, b = _channel_first(1, 3, n, seed=n), _channel_first(1, 3, n, seed=n + 1)
    # Three blocks: each walks several output tiles through one ring.
    got = walk_contract(a, b, 0.37, mode, sms=3, seed=n)
    want = torch.empty_like(a)
    tk_trimul.Emulation.trimul_contract(want, a, b, torch.tensor([0.37], dtype=torch.float64), mode)
    assert torch.isfinite(got).all(), "an output element the schedule never writes"
    assert torch.all(got[..., n:] == 0), "padding columns must come out zero"
    err = (got - want).abs().max().item()
    print(f"N={n} {mode}: max |out - emulation| {err:.2e}")
    assert err < 1e-9


@pytest.mark.parametrize(("fault", "error", "message"), [
    (Faults(stage_bytes_delta=-64), Fault, r"delivered beyond expect_bytes"),
    (Faults(stage_bytes_delta=+64), Hang, r"consumer \d waits on contract.full\[0\] parity 0 at step 0"),
    (Faults(ready_parity_flip=True), (Fault, Hang), r"reads slot 0 holding use -1|full\[0\] parity 1 at step 0"),
    (Faults(skip_release=True), Hang, r"producer waits on contract.empty\[0\] parity 0 at step 3"),
], ids=["expect-too-few-bytes", "expect-too-many-bytes", "wrong-parity", "missing-release"])
def test_the_contract_walk_catches_phase_and_byte_bugs(fault, error, message):
    a, b = _channel_first(1, 2, 130, seed=5), _channel_first(1, 2, 130, seed=6)
    with pytest.raises(error, match=message):
        walk_contract(a, b, 1.0, "AB", sms=2, faults=fault)


# ---------------------------------------------------------------- attention dq/dk/dv walk


def dqkv_config() -> dict[str, int]:
    c = _constants("dqkv_config", CSRC / "triangle_attention_bwd_sm90.cuh", d=0)
    c["block"] = fwd_config(32)["block"]
    return c


@dataclass
class Shared:
    """A shared-memory tile with the (writer, step) that last wrote it."""

    data: torch.Tensor | None = None
    tag: tuple = ()


def walk_dqkv(q, k, v, dout, bias, key_bias, stats, delta, scale, seed=0, faults: Faults | None = None,
              skip_consumer_sync=False, skip_final_sync=False):
    """``dqkv_kernel``'s schedule in float64: returns (dq, dk, dv) as it writes them
    (dq added into zeros; dk, dv NaN where unwritten)."""
    faults = faults or Faults()
    c = dqkv_config()
    blk, consumers, stages = c["block"], c["consumers"], c["stages"]
    b_, rows, heads, n, d = q.shape
    n_pad = bias.shape[-1]
    elem = 2
    rows_tile, score_tile, key_vec = blk * d * elem, blk * blk * elem, blk * 4

    def rows_gl(t):
        return t.reshape(b_, rows * heads, n, d)

    qg, kg, vg, dog = rows_gl(q), rows_gl(k), rows_gl(v), rows_gl(dout)
    kbg = key_bias.reshape(1, b_, rows, n_pad)
    dq = torch.zeros(b_, rows * heads, n, d, dtype=torch.float64)
    dk = torch.full_like(dq, float("nan"))
    dv = torch.full_like(dq, float("nan"))
    key_supers = math.ceil(math.ceil(n / blk) / consumers)
    query_tiles = math.ceil(n / blk)

    def run_block(block: int) -> None:
        tile = block
        key_super = tile % key_supers
        tile //= key_supers
        h = tile % heads
        tile //= heads
        i = tile % rows
        b = tile // rows
        depth, kb0 = i * heads + h, key_super * consumers

        kv_ready = MBarrier("kv_ready", 1)
        ready = [MBarrier(f"pipeline.ready[{s}]", 1) for s in range(stages)]
        free = [MBarrier(f"pipeline.free[{s}]", consumers * 4) for s in range(stages)]
        both = NamedBarrier("consumers", consumers)
        buffers = [Buffer() for _ in range(stages)]
        k_s = [Shared() for _ in range(consumers)]
        v_s, key_s = [None] * consumers, [None] * consumers
        p_s = [[Shared() for _ in range(consumers)] for _ in range(2)]
        ds_s = [[Shared() for _ in range(consumers)] for _ in range(2)]

        kv_ready.expect_bytes(consumers * (2 * rows_tile + key_vec))
        for w in range(consumers):
            box, moved = tma_load(kg, (1, 1, blk, d), (b, depth, kb0 + w, 0), elem)
            k_s[w] = Shared(box[0, 0], ("k", -1))
            kv_ready.complete_tx(moved)
            box, moved = tma_load(vg, (1, 1, blk, d), (b, depth, kb0 + w, 0), elem)
            v_s[w] = box[0, 0]
            kv_ready.complete_tx(moved)
            box, moved = tma_load(kbg, (1, 1, 1, blk), (0, b, i, kb0 + w), 4)
            key_s[w] = box[0, 0, 0]
            kv_ready.complete_tx(moved)

        def producer():
            stage_bytes = 2 * rows_tile + consumers * score_tile + faults.stage_bytes_delta
            for qt in range(query_tiles):
                s = qt % stages
                if qt >= stages:
                    yield Wait(free[s], ((qt // stages) - 1) & 1, "producer", qt)
                ready[s].expect_bytes(stage_bytes)
                buf = buffers[s]
                buf.step = qt
                for name, g in (("q", qg), ("do", dog)):
                    box, moved = tma_load(g, (1, 1, blk, d), (b, depth, qt, 0), elem)
                    buf.tiles[name] = box[0, 0]
                    ready[s].complete_tx(moved)
                for w in range(consumers):
                    box, moved = tma_load(bias, (1, 1, blk, blk), (b, h, qt, kb0 + w), elem)
                    buf.tiles["bias", w] = box[0, 0]
                    ready[s].complete_tx(moved)

        def read(tile: Shared, expect: tuple, who: str) -> torch.Tensor:
            if tile.tag != expect:
                raise Fault(f"{who} reads a tile written by {tile.tag}, expected {expect}")
            return tile.data

        def consumer(wg):
            kb = kb0 + wg
            acc_dk = torch.zeros(blk, d, dtype=torch.float64)
            acc_dv = torch.zeros(blk, d, dtype=torch.float64)
            yield Wait(kv_ready, 0, f"consumer {wg}", -1)
            for qt in range(query_tiles):
                bf = qt % 2
                rows_q = qt * blk + torch.arange(blk)
                inside = rows_q < n
                # load_row_stats: rows >= N get max = +inf (P = 0), log_sum = delta = 0
                r_max = torch.full((blk,), math.inf, dtype=torch.float64)
                r_log = torch.zeros(blk, dtype=torch.float64)
                r_delta = torch.zeros(blk, dtype=torch.float64)
                r_max[inside] = stats[b, i, h, rows_q[inside], 0]
                r_log[inside] = stats[b, i, h, rows_q[inside], 1]
                r_delta[inside] = delta[b, i, h, rows_q[inside]]
                s = qt % stages
                yield Wait(ready[s], ((qt // stages) & 1) ^ int(faults.ready_parity_flip), f"consumer {wg}", qt)
                buf = buffers[s]
                if buf.step != qt:
                    raise Fault(f"consumer {wg} at step {qt} reads buffer {s} holding step {buf.step}")
                q_t, do_t = buf.tiles["q"], buf.tiles["do"]
                att = (q_t @ read(k_s[wg], ("k", -1), f"consumer {wg}").T) * (scale * LOG2E) + key_s[wg][None, :]
                att = att + buf.tiles["bias", wg] * LOG2E
                att[:, (kb * blk + torch.arange(blk)) >= n] = -math.inf
                dp = do_t @ v_s[wg].T
                p = torch.exp2((att - r_max[:, None]) - r_log[:, None])
                ds = p * (dp - r_delta[:, None])
                p_s[bf][wg] = Shared(p, (wg, qt))
                ds_s[bf][wg] = Shared(ds, (wg, qt))
                if not skip_consumer_sync:
                    yield both.sync(f"consumer {wg}", qt)
                acc_dv = acc_dv + read(p_s[bf][wg], (wg, qt), f"consumer {wg}").T @ do_t
                acc_dk = acc_dk + read(ds_s[bf][wg], (wg, qt), f"consumer {wg}").T @ q_t
                if wg == 0:  # dq of this query block over both key blocks
                    part = sum(read(ds_s[bf][w], (w, qt), "consumer 0 (dq)") @ read(k_s[w], ("k", -1), "consumer 0 (dq)")
                               for w in range(consumers))
                for _ in range(4):
                    free[s].arrive()
                if wg == 0:
                    box = (part * scale)[None, None]
                    region = torch.zeros_like(dq)
                    tma_store(region, box, (b, depth, qt, 0))
                    dq.add_(region)  # cp.reduce.async.bulk .add; rows >= N dropped
            if not skip_final_sync:
                yield both.sync(f"consumer {wg}", query_tiles)
            k_s[wg] = Shared(acc_dk * scale, ("dk", wg))  # the K tile now holds dk
            tma_store(dk, k_s[wg].data[None, None], (b, depth, kb, 0))
            tma_store(dv, acc_dv[None, None], (b, depth, kb, 0))

        coroutines = {"producer": producer(), **{f"consumer {w}": consumer(w) for w in range(consumers)}}
        try:
            run_coroutines(coroutines, seed * 1_000_003 + block)
        except Hang as exc:
            raise Hang(f"block {block}: {exc}") from None

    for block in range(b_ * rows * heads * key_supers):
        run_block(block)
    shape = (b_, rows, heads, n, d)
    return dq.reshape(shape), dk.reshape(shape), dv.reshape(shape)


def _backward_inputs(n, rows, d, seed):
    q, k, v, bias, mask, bias_p, kb, scale = _inputs(1, rows, 2, n, d, seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    o, stats = tk_attention.emulate_forward(q, k, v, bias, mask, scale, 1e9)
    delta = (dout * o).sum(-1)
    return q, k, v, dout, bias, mask, bias_p, kb, o, stats, delta, scale


@pytest.mark.parametrize("d", [16, 64], ids=lambda d: f"d{d}")
@pytest.mark.parametrize(("n", "rows"), WALKS, ids=[f"N{n}-I{i}" for n, i in WALKS])
def test_dqkv_walk_equals_the_emulation(n, rows, d):
    q, k, v, dout, bias, mask, bias_p, kb, o, stats, delta, scale = _backward_inputs(n, rows, d, seed=n + rows)
    dq, dk, dv = walk_dqkv(q, k, v, dout, bias_p, kb, stats, delta, scale, seed=n)
    want = tk_attention.emulate_backward(dout, q, k, v, bias, mask, o, stats, scale, 1e9)
    for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), want[:3], strict=True):
        assert torch.isfinite(got).all(), f"{name}: elements the schedule never writes"
        # At N = 1 dq and dk are zero up to rounding (one key: the softmax is constant).
        err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        print(f"N={n} I={rows} d={d} {name}: max error / max {err:.2e}")
        assert err < 1e-6, name


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"faults": Faults(stage_bytes_delta=+64)}, Hang, r"waits on pipeline.ready\[0\] parity 0 at step 0"),
    ({"faults": Faults(skip_release=False, ready_parity_flip=True)}, (Fault, Hang), r"holding step -1|parity 1"),
    # Without the barrier between writing dS and consumer 0 reading both dS tiles,
    # some interleaving reads the other consumer's tile of another step.
    ({"skip_consumer_sync": True}, Fault, r"consumer 0 \(dq\) reads a tile written by"),
    # Without the final barrier, consumer 1 may overwrite K with dk while consumer 0
    # still forms dq from it.
    ({"skip_final_sync": True}, Fault, r"reads a tile written by \('dk', 1\)"),
], ids=["expect-too-many-bytes", "wrong-parity", "missing-dS-barrier", "missing-final-barrier"])
def test_the_dqkv_walk_catches_phase_and_barrier_bugs(kwargs, error, message):
    q, k, v, dout, _, _, bias_p, kb, _, stats, delta, scale = _backward_inputs(255, 1, 16, seed=9)
    with pytest.raises(error, match=message):
        for seed in range(20):  # a race shows in some interleavings
            walk_dqkv(q, k, v, dout, bias_p, kb, stats, delta, scale, seed=seed, **kwargs)


# ---------------------------------------------------------------- attention dbias walk


def dbias_config() -> dict[str, int]:
    launch = (CSRC / "triangle_attention_launch.h").read_text()
    shared = {name: int(value) for name, value in re.findall(r"inline constexpr int (kDbias\w+) = (\d+);", launch)}
    text = (CSRC / "triangle_attention_bwd_sm90.cuh").read_text()
    body = text[text.index("struct dbias_config"):]
    body = body[: body.index("};")]
    c = dict(shared)
    for name, expr in re.findall(r"static constexpr int (\w+) = ([^;]+);", body):
        c[name] = int(eval(expr.replace("WARPGROUP_THREADS", "128"), {}, dict(c)))  # the project's own source
    c["block"] = fwd_config(32)["block"]
    return c


def dbias_splits(batch, rows, heads, n, sms, c):
    """triangle_attention_dbias_splits (triangle_attention_bwd_sm90.cpp), transcribed."""
    blocks = math.ceil(n / c["block"])
    per_split = batch * heads * math.ceil(blocks / c["kDbiasQueryBlocks"]) * math.ceil(blocks / c["kDbiasKeyBlocks"])
    wanted = max(1, math.ceil(2 * max(sms, 1) / max(per_split, 1)))
    splits = min(wanted, c["kDbiasMaxSplits"], rows)
    rows_per_split = math.ceil(rows / splits)
    return math.ceil(rows / rows_per_split)


def walk_dbias(q, k, v, dout, bias, key_bias, stats, delta, scale, sms, seed=0, faults: Faults | None = None):
    """``dbias_kernel``'s schedule in float64: returns the [S, B, H, N, Np] partial
    sums (NaN where unwritten)."""
    faults = faults or Faults()
    c = dbias_config()
    blk, qb, kbk, stages = c["block"], c["query_blocks"], c["key_blocks"], c["stages"]
    consumers = qb * kbk
    b_, rows, heads, n, d = q.shape
    n_pad = bias.shape[-1]
    elem = 2
    rows_tile, score_tile, key_vec = blk * d * elem, blk * blk * elem, blk * 4
    splits = dbias_splits(b_, rows, heads, n, sms, c)
    rows_per_split = math.ceil(rows / splits)
    query_supers, key_supers = math.ceil(math.ceil(n / blk) / qb), math.ceil(math.ceil(n / blk) / kbk)

    def rows_gl(t):
        return t.reshape(b_, rows * heads, n, d)

    qg, kg, vg, dog = rows_gl(q), rows_gl(k), rows_gl(v), rows_gl(dout)
    kbg = key_bias.reshape(1, b_, rows, n_pad)
    partial = torch.full((splits, b_, heads, n, n_pad), float("nan"), dtype=torch.float64)

    def run_block(block: int) -> None:
        tile = block
        key_super = tile % key_supers
        tile //= key_supers
        query_super = tile % query_supers
        tile //= query_supers
        h = tile % heads
        tile //= heads
        b = tile % b_
        split = tile // b_
        i_begin, i_end = split * rows_per_split, min(rows, (split + 1) * rows_per_split)
        jb0, kb0 = query_super * qb, key_super * kbk

        bias_ready = MBarrier("bias_ready", 1)
        ready = [MBarrier(f"pipeline.ready[{s}]", 1) for s in range(stages)]
        free = [MBarrier(f"pipeline.free[{s}]", consumers * 4) for s in range(stages)]
        buffers = [Buffer() for _ in range(stages)]
        bias_s = {}
        bias_ready.expect_bytes(consumers * score_tile)
        for cj in range(qb):
            for ck in range(kbk):
                box, moved = tma_load(bias, (1, 1, blk, blk), (b, h, jb0 + cj, kb0 + ck), elem)
                bias_s[cj * kbk + ck] = box[0, 0]
                bias_ready.complete_tx(moved)

        def producer():
            stage_bytes = qb * 2 * rows_tile + kbk * (2 * rows_tile + key_vec) + faults.stage_bytes_delta
            for step, i in enumerate(range(i_begin, i_end)):
                s = step % stages
                if step >= stages:
                    yield Wait(free[s], ((step // stages) - 1) & 1, "producer", step)
                ready[s].expect_bytes(stage_bytes)
                buf = buffers[s]
                buf.step = step
                depth = i * heads + h
                for cj in range(qb):
                    for name, g in (("q", qg), ("do", dog)):
                        box, moved = tma_load(g, (1, 1, blk, d), (b, depth, jb0 + cj, 0), elem)
                        buf.tiles[name, cj] = box[0, 0]
                        ready[s].complete_tx(moved)
                for ck in range(kbk):
                    for name, g in (("k", kg), ("v", vg)):
                        box, moved = tma_load(g, (1, 1, blk, d), (b, depth, kb0 + ck, 0), elem)
                        buf.tiles[name, ck] = box[0, 0]
                        ready[s].complete_tx(moved)
                    box, moved = tma_load(kbg, (1, 1, 1, blk), (0, b, i, kb0 + ck), 4)
                    buf.tiles["key", ck] = box[0, 0, 0]
                    ready[s].complete_tx(moved)

        def consumer(wg):
            cj, ck = wg // kbk, wg % kbk
            jb, kb = jb0 + cj, kb0 + ck
            acc = torch.zeros(blk, blk, dtype=torch.float64)
            yield Wait(bias_ready, 0, f"consumer {wg}", -1)
            rows_q = jb * blk + torch.arange(blk)
            inside = rows_q < n
            for step, i in enumerate(range(i_begin, i_end)):
                r_max = torch.full((blk,), math.inf, dtype=torch.float64)
                r_log = torch.zeros(blk, dtype=torch.float64)
                r_delta = torch.zeros(blk, dtype=torch.float64)
                r_max[inside] = stats[b, i, h, rows_q[inside], 0]
                r_log[inside] = stats[b, i, h, rows_q[inside], 1]
                r_delta[inside] = delta[b, i, h, rows_q[inside]]
                s = step % stages
                yield Wait(ready[s], ((step // stages) & 1) ^ int(faults.ready_parity_flip), f"consumer {wg}", step)
                buf = buffers[s]
                if buf.step != step:
                    raise Fault(f"consumer {wg} at step {step} reads buffer {s} holding step {buf.step}")
                att = (buf.tiles["q", cj] @ buf.tiles["k", ck].T) * (scale * LOG2E) + buf.tiles["key", ck][None, :]
                att = att + bias_s[wg] * LOG2E
                att[:, (kb * blk + torch.arange(blk)) >= n] = -math.inf
                dp = buf.tiles["do", cj] @ buf.tiles["v", ck].T
                if not (faults.skip_release and wg == 0):
                    for _ in range(4):
                        free[s].arrive()
                p = torch.exp2((att - r_max[:, None]) - r_log[:, None])
                acc = acc + p * (dp - r_delta[:, None])
            if kb * blk >= n_pad:
                return
            for r in range(blk):  # plain stores of rows < N
                row = jb * blk + r
                if row < n:
                    partial[split, b, h, row, kb * blk:(kb + 1) * blk] = acc[r]

        coroutines = {"producer": producer(), **{f"consumer {w}": consumer(w) for w in range(consumers)}}
        try:
            run_coroutines(coroutines, seed * 1_000_003 + block)
        except Hang as exc:
            raise Hang(f"block {block}: {exc}") from None

    for block in range(splits * b_ * heads * query_supers * key_supers):
        run_block(block)
    return partial


@pytest.mark.parametrize("sms", [1, 132], ids=lambda s: f"sms{s}")
@pytest.mark.parametrize(("n", "rows"), WALKS, ids=[f"N{n}-I{i}" for n, i in WALKS])
def test_dbias_walk_equals_the_emulation(n, rows, sms):
    q, k, v, dout, bias, mask, bias_p, kb, o, stats, delta, scale = _backward_inputs(n, rows, 32, seed=n * 3 + rows)
    partial = walk_dbias(q, k, v, dout, bias_p, kb, stats, delta, scale, sms=sms, seed=n)
    splits = partial.shape[0]
    assert 1 <= splits <= min(rows, 16) and (sms == 1) == (splits == 1)
    assert torch.isfinite(partial).all(), "dbias elements the schedule never writes"
    assert (partial[..., n:] == 0).all(), "keys past N carry no gradient"
    want = tk_attention.emulate_backward(dout, q, k, v, bias, mask, o, stats, scale, 1e9)[3]
    # At N = 1 dbias is zero up to rounding (one key: the softmax is constant).
    err = (partial.sum(0)[..., :n] - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
    print(f"N={n} I={rows} splits={splits}: max error / max {err:.2e}")
    assert err < 1e-8


@pytest.mark.parametrize(("fault", "error", "message"), [
    (Faults(stage_bytes_delta=-64), Fault, r"delivered beyond expect_bytes"),
    (Faults(skip_release=True), Hang, r"producer waits on pipeline.free\[0\] parity 0 at step 3"),
], ids=["expect-too-few-bytes", "missing-release"])
def test_the_dbias_walk_catches_phase_and_byte_bugs(fault, error, message):
    q, k, v, dout, _, _, bias_p, kb, _, stats, delta, scale = _backward_inputs(70, 5, 16, seed=4)
    with pytest.raises(error, match=message):
        walk_dbias(q, k, v, dout, bias_p, kb, stats, delta, scale, sms=1, faults=fault)


# ---------------------------------------------------------------- tri-mul input pass walk


def walk_input(z, mask, ln_w, ln_b, p_w, p_b, g_w, g_b, eps, sms, seed=0, phase_flip=False):
    """``input_kernel``'s schedule (trimul_input_sm90.cu) in float64: the persistent
    grid of blocks with two independent warpgroups, each walking pair tiles
    ``t = 2 * block + wg, + 2 * grid, ...`` with its own z_arrived barrier and
    phase bit; returns (ab [2, B, H, N, Np], moments [4])."""
    c = _constants("config", TRIMUL_CSRC / "trimul_input_sm90.cu", d=0)
    wgs, pairs = c["warpgroups"], c["pairs"]
    batch, n, _, ch = z.shape
    hidden = p_w.shape[0] // 2
    units = 2 * hidden // 64
    n_pad = math.ceil(n / pairs) * pairs
    row_tiles = n_pad // pairs
    num_tiles = batch * n * row_tiles
    grid = min(math.ceil(num_tiles / wgs), sms)
    ab = torch.full((2 * batch, hidden, n, n_pad), float("nan"), dtype=torch.float64)
    moments = torch.zeros(4, dtype=torch.float64)
    elem = 2

    def run_block(block: int) -> None:
        z_arrived = [MBarrier(f"input.z_arrived[{w}]", 1) for w in range(wgs)]

        def warpgroup(wg):
            phase = 0
            sums = torch.zeros(4, dtype=torch.float64)
            for t in range(block * wgs + wg, num_tiles, grid * wgs):
                bi, jt = divmod(t, row_tiles)
                b, i = divmod(bi, n)
                z_arrived[wg].expect_bytes(pairs * ch * elem)
                box, moved = tma_load(z, (1, 1, pairs, ch), (b, i, jt, 0), elem)
                z_arrived[wg].complete_tx(moved)
                j = jt * pairs + torch.arange(pairs)
                m = torch.zeros(pairs, dtype=torch.float64)  # the padding columns j >= N stay zero
                m[j < n] = 1.0 if mask is None else mask[b, i, j[j < n]]
                yield Wait(z_arrived[wg], phase ^ int(phase_flip), f"warpgroup {wg}", t)
                phase ^= 1
                zn = torch.nn.functional.layer_norm(box[0, 0], (ch,), ln_w, ln_b, eps)  # pairs x C
                for u in range(units):
                    f = slice(u * 64, (u + 1) * 64)
                    proj = p_w[f] @ zn.T  # features x pairs, channel-first
                    gate = g_w[f] @ zn.T
                    val = m[None, :] * torch.sigmoid(gate + g_b[f, None]) * (proj + p_b[f, None])
                    s = u // (units // 2)  # 0: a, 1: b
                    sums[2 * s] += val.sum()
                    sums[2 * s + 1] += (val * val).sum()
                    # A store along the channel axis: box (64 channels) x (64 pairs) at
                    # {s * B + b, u % (units / 2), i, jt}.
                    tma_store(ab, val[:, None, :].unsqueeze(0), (s * batch + b, u % (units // 2), i, jt))
            moments.add_(sums)

        coroutines = {f"warpgroup {w}": warpgroup(w) for w in range(wgs)}
        try:
            run_coroutines(coroutines, seed * 1_000_003 + block)
        except Hang as exc:
            raise Hang(f"block {block}: {exc}") from None

    for block in range(grid):
        run_block(block)
    return ab.reshape(2, batch, hidden, n, n_pad), moments


# One channel configuration per N (the walk visits every pair tile: B * N * Np / 64 of them).
INPUT_WALKS = [(n, 128, 64) if k % 2 else (n, 64, 128) for k, n in enumerate(CONTRACT_N)]


@pytest.mark.parametrize(("n", "c", "hidden"), INPUT_WALKS, ids=[f"N{n}-c{c}-h{h}" for n, c, h in INPUT_WALKS])
def test_input_walk_equals_the_emulation(n, c, hidden):
    from genie_tk import tk_trimul

    g = torch.Generator().manual_seed(n + c)
    batch = 2 if n < 100 else 1
    z = torch.randn(batch, n, n, c, generator=g, dtype=torch.float64)
    mask = (torch.rand(batch, n, n, generator=g) > 0.1).double()
    weights = [torch.randn(*shape, generator=g, dtype=torch.float64) * scale
               for shape, scale in (((c,), 1), ((c,), 1), ((2 * hidden, c), c ** -0.5), ((2 * hidden,), 1),
                                    ((2 * hidden, c), c ** -0.5), ((2 * hidden,), 1))]
    args = (z, mask, *weights, 1e-5)
    ab, moments = walk_input(*args, sms=5, seed=n)
    want = torch.empty_like(ab)
    want_moments = torch.zeros(4, dtype=torch.float64)
    tk_trimul.Emulation.trimul_input(want, want_moments, *args)
    assert torch.isfinite(ab).all(), "elements of a/b the schedule never writes"
    assert torch.all(ab[..., n:] == 0), "padding columns must come out zero"
    err = (ab - want).abs().max().item()
    print(f"N={n} c={c} hidden={hidden}: max |ab - emulation| {err:.2e}")
    assert err < 1e-10
    torch.testing.assert_close(moments, want_moments, rtol=1e-12, atol=1e-9)


def test_the_input_walk_catches_a_phase_bug():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 40, 40, 64, generator=g, dtype=torch.float64)
    weights = [torch.ones(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64),
               torch.randn(128, 64, generator=g, dtype=torch.float64), torch.zeros(128, dtype=torch.float64),
               torch.randn(128, 64, generator=g, dtype=torch.float64), torch.zeros(128, dtype=torch.float64)]
    with pytest.raises(Hang, match=r"warpgroup 0 waits on input.z_arrived\[0\] parity 1 at step 0"):
        walk_input(z, None, *weights, 1e-5, sms=3, phase_flip=True)


# ---------------------------------------------------------------- tri-mul output pass walk


def walk_output(x, z, ln_in_w, ln_in_b, ln_out_w, ln_out_b, z_w, z_b, g_w, g_b, eps, sms, seed=0):
    """``output_kernel``'s schedule (trimul_output_sm90.cu) in float64: two independent
    warpgroups per block striding over pair tiles, each tile's x block (channels x
    64 pairs, along the channel axis) and z block (64 pairs x C) on one
    inputs_arrived barrier, LayerNorm of z's rows and x's columns, the gated
    projection, and the 64 x C store with pairs >= N dropped."""
    c = _constants("config", TRIMUL_CSRC / "trimul_output_sm90.cu", d=0)
    wgs, pairs = c["warpgroups"], c["pairs"]
    batch, n, _, ch = z.shape
    hidden, n_pad = x.shape[1], x.shape[-1]
    row_tiles = n_pad // pairs
    num_tiles = batch * n * row_tiles
    grid = min(math.ceil(num_tiles / wgs), sms)
    out = torch.full_like(z, float("nan"))
    elem = 2

    def run_block(block: int) -> None:
        arrived = [MBarrier(f"output.inputs_arrived[{w}]", 1) for w in range(wgs)]

        def warpgroup(wg):
            phase = 0
            for t in range(block * wgs + wg, num_tiles, grid * wgs):
                bi, jt = divmod(t, row_tiles)
                b, i = divmod(bi, n)
                arrived[wg].expect_bytes((hidden * pairs + pairs * ch) * elem)
                # x along the channel axis: a (hidden) x (64 pairs) box at {b, 0, i, jt}.
                xs, moved = tma_load(x.transpose(1, 2), (1, 1, hidden, pairs), (b, i, 0, jt), elem)
                arrived[wg].complete_tx(moved)
                zs, moved = tma_load(z, (1, 1, pairs, ch), (b, i, jt, 0), elem)
                arrived[wg].complete_tx(moved)
                yield Wait(arrived[wg], phase, f"warpgroup {wg}", t)
                phase ^= 1
                zn = torch.nn.functional.layer_norm(zs[0, 0], (ch,), ln_in_w, ln_in_b, eps)  # pairs x C
                xn = torch.nn.functional.layer_norm(xs[0, 0].T, (hidden,), ln_out_w, ln_out_b, eps)  # pairs x H
                y = torch.sigmoid(zn @ g_w.T + g_b) * (xn @ z_w.T + z_b)
                tma_store(out, y[None, None], (b, i, jt, 0))

        coroutines = {f"warpgroup {w}": warpgroup(w) for w in range(wgs)}
        try:
            run_coroutines(coroutines, seed * 1_000_003 + block)
        except Hang as exc:
            raise Hang(f"block {block}: {exc}") from None

    for block in range(grid):
        run_block(block)
    return out


@pytest.mark.parametrize(("n", "c", "hidden"), INPUT_WALKS, ids=[f"N{n}-c{c}-h{h}" for n, c, h in INPUT_WALKS])
def test_output_walk_equals_the_emulation(n, c, hidden):
    from genie_tk import tk_trimul

    g = torch.Generator().manual_seed(2 * n + c)
    batch = 2 if n < 100 else 1
    z = torch.randn(batch, n, n, c, generator=g, dtype=torch.float64)
    x = _channel_first(batch, hidden, n, seed=n) * 3
    weights = [torch.randn(*shape, generator=g, dtype=torch.float64) * scale
               for shape, scale in (((c,), 1), ((c,), 1), ((hidden,), 1), ((hidden,), 1), ((c, hidden), hidden ** -0.5),
                                    ((c,), 1), ((c, c), c ** -0.5), ((c,), 1))]
    got = walk_output(x, z, *weights, 1e-5, sms=5, seed=n)
    want = torch.empty_like(z)
    tk_trimul.Emulation.trimul_output(want, x, z, *weights, 1e-5)
    assert torch.isfinite(got).all(), "output elements the schedule never writes"
    err = (got - want).abs().max().item()
    print(f"N={n} c={c} hidden={hidden}: max |out - emulation| {err:.2e}")
    assert err < 1e-10
