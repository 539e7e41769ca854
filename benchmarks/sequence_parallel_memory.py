"""Peak memory per rank of flash-genie's pair stack under sequence parallelism, on the CPU.

For each sequence-parallel size ``sp`` (default 1, 2, 4) the script starts ``sp`` processes
with torchrun's launcher (gloo); each builds the same pair stack (Genie's widths by default:
``c_p = 128``, tri-mul hidden 128, triangle attention 4 heads of 32, transition ×4) and
runs one training forward+backward of its ``[1, N/sp, N, c_p]`` row block. The figure is the
growth of the process's peak resident set (``ru_maxrss``) over what it held once the inputs
and the module existed, so it counts everything the pass allocates, communication buffers
included (glibc is told to return freed tensors to the OS at once, see ``_run``). ``unsplit``
is the ordinary single-process :class:`PairTransformNet` for comparison.

    python benchmarks/sequence_parallel_memory.py --length 256 --json benchmarks/results/cpu_sequence_parallel_memory_n256.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from genie_bench.env import environment  # benchmarks/ is this script's folder, first on sys.path

from flash_genie.model.pair_stack import PairTransformNet
from flash_genie.parallel import SequenceShard, init_distributed, pair_stack


def _net(args) -> PairTransformNet:
    torch.manual_seed(0)
    return PairTransformNet(args.c_p, args.layers, include_mul_update=True, include_tri_att=not args.no_tri_att,
                            c_hidden_mul=args.c_hidden_mul, c_hidden_tri_att=32, n_head_tri=4, tri_dropout=0.25,
                            pair_transition_n=4).train()


def _inputs(rows: slice, args):
    g = torch.Generator().manual_seed(1)
    p = torch.randn(1, args.length, args.length, args.c_p, generator=g)[:, rows].clone().requires_grad_()
    mask = torch.ones(1, args.length, args.length)[:, rows].clone()
    return p, mask


def _peak_mib(step) -> tuple[float, float]:
    """``(peak growth in MiB, seconds)`` of ``step()`` (after a warm-up that loads what the
    first pass imports or initialises lazily)."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    step()
    elapsed = time.perf_counter() - t0
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, elapsed


def _child_unsplit(args) -> dict:
    net = _net(args)
    small = torch.randn(1, 4, 4, args.c_p, requires_grad=True)
    net(small, torch.ones(1, 4, 4)).sum().backward()  # warm-up
    p, mask = _inputs(slice(None), args)
    peak, seconds = _peak_mib(lambda: net(p, mask).sum().backward())
    return {"peak_mib": [peak], "seconds": [seconds]}


def _child_split(args) -> dict | None:
    init_distributed("gloo")
    shard = SequenceShard.of(args.length, dist.group.WORLD if dist.get_world_size() > 1 else None)
    net = _net(args)
    warm = SequenceShard.of(2 * shard.world, shard.group)
    small = torch.randn(1, 2, 2 * shard.world, args.c_p, requires_grad=True)
    pair_stack(net, small, torch.ones(1, 2, 2 * shard.world), warm).sum().backward()
    p, mask = _inputs(shard.rows, args)
    dist.barrier()
    peak, seconds = _peak_mib(lambda: pair_stack(net, p, mask, shard).sum().backward())
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (peak, seconds))
    dist.destroy_process_group()
    if shard.rank:
        return None
    return {"peak_mib": [g[0] for g in gathered], "seconds": [g[1] for g in gathered]}


def _run(sp: int | None, args) -> dict:
    """One measurement in fresh processes (``sp=None``: the unsplit module, one process)."""
    common = ["--length", str(args.length), "--c-p", str(args.c_p), "--c-hidden-mul", str(args.c_hidden_mul),
              "--layers", str(args.layers), *(["--no-tri-att"] if args.no_tri_att else [])]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        if sp is None:
            cmd = [sys.executable, __file__, "--child", "unsplit", "--child-out", out, *common]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={sp}",
                   __file__, "--child", "split", "--child-out", out, *common]
        # One thread per process, so that sp processes share the machine's cores alike. A fixed
        # mmap threshold makes glibc return every freed tensor to the OS: its dynamic threshold
        # (up to 32 MiB) would keep smaller tensors, those of the split runs, in a fragmenting
        # heap, and the resident set would then count memory that is no longer in use.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=256, help="residues N")
    ap.add_argument("--c-p", type=int, default=128)
    ap.add_argument("--c-hidden-mul", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--no-tri-att", action="store_true", help="tri-mul and transition only (Genie's default)")
    ap.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4], help="sequence-parallel sizes")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--child", choices=("split", "unsplit"), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = _child_unsplit(args) if args.child == "unsplit" else _child_split(args)
        if result is not None:
            with open(args.child_out, "w") as f:
                json.dump(result, f)
        return

    rows = [{"method": "unsplit", "sp": 1, **_run(None, args)}]
    rows += [{"method": "sequence parallel", "sp": sp, **_run(sp, args)} for sp in args.sp]
    base = max(next(r for r in rows if r["method"] == "sequence parallel" and r["sp"] == 1)["peak_mib"])
    print(f"pair stack fwd+bwd, CPU float32, N={args.length}, c_p={args.c_p}, tri-mul hidden {args.c_hidden_mul}, "
          f"{args.layers} layers, triangle attention {'off' if args.no_tri_att else 'on'}")
    for r in rows:
        worst = max(r["peak_mib"])
        r["max_peak_mib"], r["ratio_to_sp1"] = worst, worst / base
        print(f"  {r['method']:17s} sp={r['sp']}  peak per rank {worst:8.1f} MiB  ({worst / base:.2f} of sp=1)  "
              f"time {max(r['seconds']):.1f} s")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("json", "child", "child_out")}
        with open(args.json, "w") as f:
            json.dump({"environment": environment(torch.device("cpu")), "config": config, "results": rows}, f,
                      indent=2)


if __name__ == "__main__":
    main()
