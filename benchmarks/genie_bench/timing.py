"""Timing: warm-up, then many runs, median and spread.

On CUDA each run sits between two CUDA events and the runs are queued back to
back with no synchronisation in between (as ``triton.testing.do_bench``), so host
launch overhead is hidden exactly as far as the method itself hides it. On the
CPU each run is timed with ``time.perf_counter``. Either way:

* warm-up: at least two calls, and calls until ``warmup_s`` has passed, so that
  compilation, autotuning and allocator growth stay out of the figures (the
  first call's time is reported on its own, as ``first_call_ms``);
* the run count is ``rep_s`` over the mean time of the warm-up calls after the
  first, clamped to ``[min_runs, max_runs]``;
* run ``i`` uses input set ``i mod len(calls)``: the runner builds enough sets
  that together they exceed the cache (L2 on a GPU), so no run finds its inputs
  left in cache by the previous one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class TimingConfig:
    warmup_s: float
    rep_s: float
    min_runs: int
    max_runs: int
    rotate_bytes: int  # input sets together exceed this (cache defeat)
    max_sets: int = 32

    def to_json(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(calls: Sequence[Callable[[], object]], cfg: TimingConfig, device) -> tuple[int, float, float]:
    """Run until ``warmup_s`` has passed; ``(calls made, seconds of the first call,
    mean seconds per later call)``. The first call carries compilation and autotuning."""
    _sync(device)
    start = time.perf_counter()
    calls[0]()
    _sync(device)
    first = time.perf_counter() - start
    done = 1
    while time.perf_counter() - start < cfg.warmup_s or done < 2:
        calls[done % len(calls)]()
        done += 1
        _sync(device)
    return done, first, (time.perf_counter() - start - first) / (done - 1)


def _run_cuda(calls, runs: int, device) -> list[float]:
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    for i, (start, end) in enumerate(events):
        start.record()
        calls[i % len(calls)]()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def _run_cpu(calls, runs: int) -> list[float]:
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times_s: Sequence[float]) -> dict:
    """Median and spread in milliseconds: quartiles, extremes, mean, standard deviation."""
    ms = sorted(t * 1e3 for t in times_s)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {
        "median": statistics.median(ms), "p25": q[0], "p75": q[2], "min": ms[0], "max": ms[-1],
        "mean": statistics.fmean(ms), "std": statistics.pstdev(ms), "runs": len(ms),
    }


def measure(calls: Sequence[Callable[[], object]], cfg: TimingConfig, device: torch.device) -> dict:
    """Time ``calls`` (one closure per input set); returns :func:`summarize` plus the
    warm-up's call count (``warmup``) and first call (``first_call_ms``)."""
    warm, first, per_call = _warm_up(calls, cfg, device)
    runs = int(min(cfg.max_runs, max(cfg.min_runs, cfg.rep_s / max(per_call, 1e-9))))
    times = _run_cuda(calls, runs, device) if device.type == "cuda" else _run_cpu(calls, runs)
    return {**summarize(times), "warmup": warm, "first_call_ms": first * 1e3}


def input_sets(set_bytes: int, cfg: TimingConfig, free_bytes: int) -> int:
    """How many input sets to rotate: enough to exceed ``rotate_bytes``, at most
    ``max_sets`` and at most a tenth of the free memory."""
    want = -(-cfg.rotate_bytes // max(set_bytes, 1))
    room = max(1, free_bytes // 10 // max(set_bytes, 1))
    return int(max(1, min(want, cfg.max_sets, room)))
