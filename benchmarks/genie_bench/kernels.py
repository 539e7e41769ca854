"""The kernel suite: every (dtype, op, N) case, every method, forward and forward+backward.

Per case the runner builds enough deterministic input sets to rotate past the
cache, computes the fp64 reference once, then for each method and pass times
it, measures its peak memory and (once per method) its error against the
reference. Nothing stops the sweep: a method that is unavailable, raises, runs
out of memory or would exceed the time budget is recorded with that status.

* ``fwd``: the forward pass under ``torch.no_grad()`` (inference).
* ``fwd+bwd``: forward with autograd, then ``torch.autograd.grad`` of a fixed
  random cotangent with respect to every differentiable input.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import SCHEMA, floors, memory, timing
from .cases import OPS, PASSES, Op, Tensors, nbytes
from .env import environment
from .errors import compare_all, fp64_reference
from .methods import Method, Unsupported, discover

OOM_ERRORS = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


@dataclass(frozen=True)
class Config:
    ops: tuple[str, ...]
    ns: tuple[int, ...]
    dtypes: tuple[str, ...]
    passes: tuple[str, ...]
    device: torch.device
    timing: timing.TimingConfig
    methods: tuple[str, ...] | None = None  # None: every method found
    errors: bool = True
    budget_s: float | None = None
    quick: bool = False

    def to_json(self) -> dict:
        return {"suite": "kernels", "ops": list(self.ops), "n": list(self.ns), "dtypes": list(self.dtypes),
                "passes": list(self.passes), "methods": None if self.methods is None else list(self.methods),
                "device": str(self.device), "timing": self.timing.to_json(), "errors": self.errors,
                "budget_s": self.budget_s, "quick": self.quick,
                "params": {name: OPS[name].params for name in self.ops}}


def _classify(exc: BaseException) -> tuple[str, str]:
    """``(status, reason)`` for a failed call."""
    text = f"{type(exc).__name__}: {exc}".strip()[:600]
    if isinstance(exc, Unsupported):
        return "unavailable", str(exc)
    lowered = text.lower()
    if isinstance(exc, OOM_ERRORS) or "out of memory" in lowered or "can't allocate memory" in lowered:
        return "oom", text
    return "error", text


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _park(t: torch.Tensor) -> torch.Tensor:
    """Hold a reference tensor in (pinned) host memory while the methods run, so
    that it takes no device memory from them: an OOM must be the method's own."""
    return t.cpu().pin_memory() if t.is_cuda else t


def _differentiable(op: Op, t: Tensors) -> Tensors:
    # detach() keeps a view's strides (the ending-node layout) and makes it a leaf.
    return {k: (v.detach().requires_grad_(True) if k in op.diff else v) for k, v in t.items()}


@dataclass
class _Inputs:
    """The rotated input sets of one case and their cotangents."""

    sets: list[Tensors]
    cots: list[torch.Tensor]

    @classmethod
    def build(cls, op: Op, n: int, dtype: torch.dtype, cfg: Config) -> _Inputs:
        def one(i: int) -> tuple[Tensors, torch.Tensor]:
            seed = 7919 * i + n
            t = _differentiable(op, op.build(n, dtype, cfg.device, seed))
            g = torch.Generator(device=cfg.device).manual_seed(seed + 1)
            shape = t[op.out_like].shape
            return t, torch.randn(shape, generator=g, device=cfg.device).to(dtype)

        first = one(0)
        set_bytes = nbytes(first[0].values()) + nbytes([first[1]])
        count = timing.input_sets(set_bytes, cfg.timing, memory.free_bytes(cfg.device))
        pairs = [first] + [one(i) for i in range(1, count)]
        return cls([p[0] for p in pairs], [p[1] for p in pairs])

    def pass_bytes(self, op: Op, pass_: str) -> float:
        """Bytes a pass must move at least: inputs read, output written; the
        backward reads inputs, output and cotangent and writes the gradients."""
        t, cot = self.sets[0], self.cots[0]
        fwd = nbytes(t.values()) + nbytes([cot])
        if pass_ == "fwd":
            return float(fwd)
        return float(2 * fwd + nbytes([cot]) + nbytes(t[k] for k in op.diff))


def _closure(m: Method, op: Op, t: Tensors, cot: torch.Tensor, pass_: str) -> Callable[[], object]:
    call = m.calls[op.family]
    if pass_ == "fwd":
        def fwd():
            with torch.no_grad():
                return call(op, t)
        return fwd
    inputs = [t[k] for k in op.diff]
    return lambda: torch.autograd.grad(call(op, t), inputs, cot)


class _Sweep:
    """State of one run of the suite: methods, reference, budget, rows."""

    def __init__(self, cfg: Config, log: Callable[[str], None], progress: Callable[[dict], None] | None):
        self.cfg, self.log, self.progress = cfg, log, progress
        self.methods = discover(cfg.device, cfg.methods)
        self.memory_method, self.memory_reason = memory.method(cfg.device)
        self.env = environment(cfg.device)
        found = floors.for_device(self.env["device"]["name"]) if cfg.device.type == "cuda" else None
        self.floor_name, self.floor_entry = found if found else (None, None)
        self.start = time.perf_counter()
        self.rows: list[dict] = []

    def over_budget(self) -> bool:
        return self.cfg.budget_s is not None and time.perf_counter() - self.start > self.cfg.budget_s

    def run(self) -> dict:
        for dtype in self.cfg.dtypes:
            for name in self.cfg.ops:
                for n in self.cfg.ns:
                    self.case(OPS[name], n, dtype)
                    if self.progress:
                        self.progress(self.document())
        return self.document()

    def document(self) -> dict:
        floor = None
        if self.floor_entry:
            floor = {"name": self.floor_name, **{k: v for k, v in self.floor_entry.items() if k != "name_has"}}
        return {
            "schema": SCHEMA,
            "environment": self.env,
            "config": self.cfg.to_json(),
            "methods": {m.name: m.describe() for m in self.methods},
            "memory_method": {"name": self.memory_method, "reason": self.memory_reason},
            "floor": floor,
            "elapsed_s": time.perf_counter() - self.start,
            "results": self.rows,
        }

    def case(self, op: Op, n: int, dtype_name: str) -> None:
        runnable = [m for m in self.methods if m.available]
        if not runnable:
            return
        base = {"suite": "kernels", "op": op.name, "family": op.family, "n": n, "dtype": dtype_name,
                "params": op.params}
        if self.over_budget():
            for m in runnable:
                for p in self.cfg.passes:
                    self.add({**base, "pass": p, "method": m.name, "status": "skipped",
                              "reason": f"time budget of {self.cfg.budget_s:g} s spent"})
            return
        try:
            inputs = _Inputs.build(op, n, getattr(torch, dtype_name), self.cfg)
        except Exception as exc:  # inputs too large for the device: every method alike
            _release(self.cfg.device)
            status, reason = _classify(exc)
            for m in runnable:
                for p in self.cfg.passes:
                    self.add({**base, "pass": p, "method": m.name, "status": status,
                              "reason": f"building the inputs failed: {reason}"})
            return
        ref, ref_reason = self.reference(op, n, inputs)
        for m in runnable:
            rows = [self.measure(m, op, n, p, inputs, {**base, "pass": p, "method": m.name})
                    for p in self.cfg.passes]
            self.attach_errors(m, op, inputs, rows, ref, ref_reason)
            for row in rows:
                self.add(row)
        del inputs, ref
        _release(self.cfg.device)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        t = row.get("time_ms")
        figure = f"{t['median']:.3f} ms" if t else f"{row['status']}: {row.get('reason', '')[:90]}"
        self.log(f"{row['dtype']:>8} {row['op']:13} N={row['n']:<5} {row['pass']:7} {row['method']:14} {figure}")

    def reference(self, op: Op, n: int, inputs: _Inputs):
        """fp64 ``(out, grads)`` on input set 0, or ``(None, reason)``."""
        if not self.cfg.errors:
            return None, "error check disabled (--no-errors)"
        need, free = op.ref_bytes(n, op.params), memory.free_bytes(self.cfg.device)
        if need > 0.8 * free:
            return None, f"the fp64 reference needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        try:
            out, grads = fp64_reference(op, inputs.sets[0], inputs.cots[0], "fwd+bwd" in self.cfg.passes)
            return (_park(out), {k: _park(g) for k, g in grads.items()}), ""
        except Exception as exc:  # an OOM here must not end the sweep
            _release(self.cfg.device)
            status, reason = _classify(exc)
            return None, f"the fp64 reference failed ({status}): {reason}"

    def precheck(self, m: Method, op: Op, n: int, dtype: torch.dtype) -> tuple[str, str] | None:
        """A status that rules the call out before it runs, or ``None``."""
        if op.family not in m.calls:
            return "unavailable", f"{m.library} has no {op.family} here"
        if self.over_budget():
            return "skipped", f"time budget of {self.cfg.budget_s:g} s spent"
        if m.naive and self.cfg.device.type == "cpu":
            # On the CPU running out of memory kills the process instead of raising.
            need = op.naive_bytes(n, op.params, torch.finfo(dtype).bits // 8)
            free = memory.free_bytes(self.cfg.device)
            if need > 0.8 * free:
                return "skipped", f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"
        return None

    def measure(self, m: Method, op: Op, n: int, pass_: str, inputs: _Inputs, row: dict) -> dict:
        """Time and peak memory of one method and pass."""
        ruled_out = self.precheck(m, op, n, inputs.sets[0][op.out_like].dtype)
        if ruled_out:
            return {**row, "status": ruled_out[0], "reason": ruled_out[1]}
        calls = [_closure(m, op, t, c, pass_) for t, c in zip(inputs.sets, inputs.cots)]
        try:
            stats = timing.measure(calls, self.cfg.timing, self.cfg.device)
            peak = None if self.memory_reason else memory.peak_mib(calls[0], self.cfg.device)
        except Exception as exc:  # recorded, never fatal: peers fail in their own ways
            del calls
            _release(self.cfg.device)
            status, reason = _classify(exc)
            return {**row, "status": status, "reason": reason}
        return {**row, **self.figures(op, n, pass_, row["dtype"], inputs, stats), "peak_memory_mib": peak}

    def figures(self, op: Op, n: int, pass_: str, dtype: str, inputs: _Inputs, stats: dict) -> dict:
        flop, exps, moved = op.flop(n, pass_), op.exps(n, pass_), inputs.pass_bytes(op, pass_)
        seconds = stats["median"] / 1e3
        out = {"status": "ok", "time_ms": stats, "input_sets": len(inputs.sets), "flop": flop,
               "tflops": flop / seconds / 1e12, "bytes": moved, "exps": exps,
               "floor": None, "fraction_of_floor": None}
        if self.floor_entry:
            out["floor"] = floors.floor(self.floor_entry, dtype, flop, moved, exps)
            out["fraction_of_floor"] = out["floor"]["floor_ms"] / stats["median"]
        return out

    def attach_errors(self, m: Method, op: Op, inputs: _Inputs, rows: list[dict], ref, ref_reason: str) -> None:
        """One run on input set 0 against the fp64 reference; each row gets the
        tensors its pass produces (``out``; plus ``grad_*`` for fwd+bwd)."""
        ok = [r for r in rows if r["status"] == "ok"]
        if not ok:
            return
        if ref is None:
            for r in ok:
                r["errors"] = {"status": "skipped", "reason": ref_reason}
            return
        with_grads = any(r["pass"] == "fwd+bwd" for r in ok)
        t, cot = inputs.sets[0], inputs.cots[0]
        try:
            with torch.set_grad_enabled(with_grads):
                out = m.calls[op.family](op, t)
            grads = dict(zip(op.diff, torch.autograd.grad(out, [t[k] for k in op.diff], cot))) if with_grads else {}
            errs = compare_all(out.detach(), grads, ref[0], ref[1])
        except Exception as exc:  # the timing passed, so this is rare; record it
            _release(self.cfg.device)
            status, reason = _classify(exc)
            for r in ok:
                r["errors"] = {"status": "error", "reason": f"{status}: {reason}"}
            return
        for r in ok:
            keep = errs if r["pass"] == "fwd+bwd" else {"out": errs["out"]}
            r["errors"] = {"status": "ok", "reference": "genie_tk.reference, float64", "tensors": keep}


def run(cfg: Config, log: Callable[[str], None] = print,
        progress: Callable[[dict], None] | None = None) -> dict:
    """Run the suite; returns the result document (see ``result.schema.json``).
    ``log`` gets one line per row; ``progress`` the document so far after each
    case (the CLI saves it, so a run killed at a time limit keeps what it measured)."""
    unknown = [p for p in cfg.passes if p not in PASSES] + [o for o in cfg.ops if o not in OPS]
    if unknown:
        raise ValueError(f"unknown ops or passes: {unknown}; ops: {sorted(OPS)}, passes: {PASSES}")
    return _Sweep(cfg, log, progress).run()
