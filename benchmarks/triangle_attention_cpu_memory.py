"""Peak memory and time of one TriangleAttention forward+backward on the CPU:
genie-tk's ``torch`` backend against the ``reference`` backend.

Each measurement runs in a fresh subprocess; peak memory is the growth of the
process's peak resident set (``ru_maxrss``) over what it held once the inputs
and the module existed, so it counts everything the pass allocates.

    python benchmarks/triangle_attention_cpu_memory.py --n 384 --c-z 128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _measure(backend: str, n: int, c_z: int, heads: int, head_dim: int, repeats: int) -> dict:
    import resource
    import time

    import torch

    import genie_tk

    torch.manual_seed(0)
    module = genie_tk.TriangleAttentionStartingNode(c_z, head_dim, heads)
    for p in module.parameters():  # zero-initialised gates would make the pass trivial
        torch.nn.init.normal_(p, std=0.1)
    module.backend = backend
    z = torch.randn(1, n, n, c_z, requires_grad=True)
    mask = (torch.rand(1, n, n) > 0.1).float()
    g = torch.randn(1, n, n, c_z)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        (module(z, mask=mask) * g).sum().backward()
        times.append(time.perf_counter() - t0)
        z.grad = None
        module.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    return {"backend": backend, "peak_mib": (peak - base) / 1024, "median_s": times[len(times) // 2],
            "times_s": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=384)
    ap.add_argument("--c-z", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(_measure(args._child, args.n, args.c_z, args.heads, args.head_dim, args.repeats)))
        return
    results = []
    for backend in ("reference", "torch"):
        cmd = [sys.executable, __file__, "--_child", backend, "--n", str(args.n), "--c-z", str(args.c_z),
               "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    ref, tor = results
    print(f"TriangleAttention fwd+bwd, CPU fp32, B=1, N={args.n}, c_z={args.c_z}, H={args.heads}, d={args.head_dim}")
    for r in results:
        print(f"  {r['backend']:9s}  peak {r['peak_mib']:8.1f} MiB   median {r['median_s']:.3f} s")
    print(f"  torch/reference: memory {tor['peak_mib'] / ref['peak_mib']:.2f}x, time {tor['median_s'] / ref['median_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args) | {"_child": None}, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
