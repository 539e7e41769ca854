"""Peak memory and time of one TriangleAttention forward+backward on the CPU:
genie-tk's ``torch`` backend against the ``reference`` backend.

Peak memory: each backend runs once in a fresh subprocess, and the figure is the
growth of the process's peak resident set (``ru_maxrss``) over what it held once
the inputs and the module existed, so it counts everything the pass allocates.
Time: both backends in this process, alternating, median of ``--repeats`` rounds,
so that load from other processes affects both alike.

    python benchmarks/triangle_attention_cpu_memory.py --n 384 --c-z 128
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

import genie_tk

BACKENDS = ("reference", "torch")


def _setup(backend: str, n: int, c_z: int, heads: int, head_dim: int):
    torch.manual_seed(0)
    module = genie_tk.TriangleAttentionStartingNode(c_z, head_dim, heads)
    with torch.no_grad():  # zero-initialised gates would make the pass trivial
        for p in module.parameters():
            p.normal_(std=0.1)
    module.backend = backend
    z = torch.randn(1, n, n, c_z, requires_grad=True)
    mask = (torch.rand(1, n, n) > 0.1).float()
    cotangent = torch.randn(1, n, n, c_z)
    return module, z, mask, cotangent


def _step(module, z, mask, cotangent) -> float:
    t0 = time.perf_counter()
    (module(z, mask=mask) * cotangent).sum().backward()
    elapsed = time.perf_counter() - t0
    z.grad = None
    module.zero_grad(set_to_none=True)
    return elapsed


def _peak_mib(backend: str, args) -> float:
    """Run in a child process: the pass's peak memory in MiB."""
    case = _setup(backend, args.n, args.c_z, args.heads, args.head_dim)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _step(*case)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--c-z", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_peak_mib(args.child, args)))
        return

    peak = {}
    for backend in BACKENDS:
        cmd = [sys.executable, __file__, "--child", backend, "--n", str(args.n), "--c-z", str(args.c_z),
               "--heads", str(args.heads), "--head-dim", str(args.head_dim)]
        peak[backend] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    cases = {b: _setup(b, args.n, args.c_z, args.heads, args.head_dim) for b in BACKENDS}
    times = {b: [] for b in BACKENDS}
    for b in BACKENDS:  # warm-up
        _step(*cases[b])
    for _ in range(args.repeats):
        for b in BACKENDS:
            times[b].append(_step(*cases[b]))
    median = {b: sorted(t)[len(t) // 2] for b, t in times.items()}

    print(f"TriangleAttention fwd+bwd, CPU {torch.get_default_dtype()}, B=1, N={args.n}, "
          f"c_z={args.c_z}, H={args.heads}, d={args.head_dim}")
    for b in BACKENDS:
        print(f"  {b:9s}  peak {peak[b]:8.1f} MiB   median {median[b]:.3f} s")
    print(f"  torch/reference: memory {peak['torch'] / peak['reference']:.2f}x, "
          f"time {median['torch'] / median['reference']:.2f}x")
    if args.json:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        env = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "commit": commit,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        config = {k: v for k, v in vars(args).items() if k not in ("json", "child")}
        results = [{"backend": b, "peak_mib": peak[b], "median_s": median[b], "times_s": times[b]}
                   for b in BACKENDS]
        with open(args.json, "w") as f:
            json.dump({"environment": env, "config": config, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
