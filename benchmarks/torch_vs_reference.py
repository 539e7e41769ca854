"""genie-tk's ``torch`` backend against the plain ``reference`` backend on one CPU thread.

For every op, N and pass it reports the ``torch``/``reference`` ratios of the median
time and of the peak memory, measured in one process with the two backends' calls
alternating (their order swapped every repetition), so that the load of a shared
machine falls on both alike.

Ops (fp32, batch 1, AF2 sizes):

* ``tri_att_start`` / ``tri_att_end``: the attention core ``genie_tk.triangle_attention``
  on q, k, v ``[1, N, 4, N, 32]`` (the ending node on transposed views), as in
  ``genie_bench`` (``benchmarks/genie_bench/cases.py``);
* ``tri_att_layer_start`` / ``tri_att_layer_end``: the whole
  ``TriangleAttentionStartingNode`` / ``EndingNode`` module, ``c_z = 128``, 4 heads of 32;
* ``tri_mul_out`` / ``tri_mul_in``: ``genie_tk.triangle_multiplicative_update``,
  ``c_z = c_hidden = 128``.

Passes: ``fwd`` under ``torch.no_grad()``; ``fwd+bwd`` with autograd, then the
gradients of a fixed cotangent with respect to every differentiable input (and the
module's parameters). Time: the CPU time of the calling thread (``time.thread_time``:
with one thread all of PyTorch's work runs there, and time the thread spends
descheduled by other work on a shared machine is not counted; wall-clock minima are
recorded too). The two backends' calls alternate, ``reps`` of each; the ratio reported
is that of the fastest calls, the median of the per-pair ratios beside it.
Peak memory: the largest sum of live tensor bytes that PyTorch's CPU allocator handed
out during one call (``torch.profiler`` with ``profile_memory=True``: every allocation
and free in order), beyond what was live before it, output included: deterministic,
so identical computations give identical figures. The torch backend's per-call path
(``plain`` or ``efficient``, see ``genie_tk.torch_backend.plain``) is recorded.

    python benchmarks/torch_vs_reference.py                 # N = 16 ... 384, about 10 minutes
    python benchmarks/torch_vs_reference.py --n 32 128 --ops tri_mul_out

Writes ``benchmarks/results/torch_vs_reference_cpu_<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from genie_bench.cases import OPS, tri_mul_weights  # noqa: E402
from genie_bench.env import environment  # noqa: E402

import genie_tk  # noqa: E402
from genie_tk import torch_backend  # noqa: E402

NS = (16, 32, 64, 96, 128, 192, 256, 384)
PASSES = ("fwd", "fwd+bwd")
BACKENDS = ("torch", "reference")
LAYER = {"c_z": 128, "c_hidden": 32, "heads": 4}
OP_NAMES = ("tri_att_start", "tri_att_end", "tri_att_layer_start", "tri_att_layer_end", "tri_mul_out", "tri_mul_in")


def _core_case(name: str, n: int):
    op = OPS[name]
    t = op.build(n, torch.float32, torch.device("cpu"), 0)
    diff = [t[k] for k in op.diff]
    family = "triangle_attention" if name.startswith("tri_att") else "triangle_multiplicative_update"

    def run(backend: str, grad_inputs):
        t2 = dict(t, **dict(zip(op.diff, grad_inputs)))
        if family == "triangle_attention":
            return genie_tk.triangle_attention(t2["q"], t2["k"], t2["v"], t2["bias"], t2["mask"], backend=backend)
        return genie_tk.triangle_multiplicative_update(t2["z"], t2["mask"], op.call_args["direction"],
                                                      backend=backend, **tri_mul_weights(t2))

    return family, diff, [], run


def _layer_case(name: str, n: int):
    cls = genie_tk.TriangleAttentionStartingNode if name.endswith("start") else genie_tk.TriangleAttentionEndingNode
    torch.manual_seed(0)
    module = cls(LAYER["c_z"], LAYER["c_hidden"], LAYER["heads"])
    with torch.no_grad():  # OpenFold zero-initialises the output projection: give it values
        for p in module.parameters():
            p.normal_(0, 0.1).add_(1 if p.dim() == 1 and p is module.layer_norm.weight else 0)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, n, n, LAYER["c_z"], generator=g)
    mask = (torch.rand(1, n, n, generator=g) > 0.1).float()
    mask[..., 0] = 1

    def run(backend: str, grad_inputs):
        module.backend = backend
        return module(grad_inputs[0], mask=mask)

    return "triangle_attention_layer", [z], list(module.parameters()), run


def case(name: str, n: int):
    return (_layer_case if "layer" in name else _core_case)(name, n)


def peak_mib(call) -> float:
    """Peak of live tensor bytes (MiB) allocated during ``call()``, output included."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call()
    del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def _call(run, backend: str, pass_: str, diff, params, cot):
    if pass_ == "fwd":
        with torch.no_grad():
            return run(backend, diff)
    leaves = [t.detach().requires_grad_(True) for t in diff]
    out = run(backend, leaves)
    return torch.autograd.grad(out, [*leaves, *params], cot)


def measure(name: str, n: int, pass_: str, budget_s: float, max_reps: int) -> dict:
    family, diff, params, run = case(name, n)
    with torch.no_grad():
        out = run("reference", diff)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    del out
    calls = {b: (lambda b=b: _call(run, b, pass_, diff, params, cot)) for b in BACKENDS}
    first = {}
    for b in BACKENDS:  # warm-up, and the first call's time sets the repetitions
        start = time.perf_counter()
        calls[b]()
        first[b] = time.perf_counter() - start
    path = torch_backend.last_path(family)
    floor = 2 if sum(first.values()) > 10 else 3  # the largest cases: two of each
    reps = int(max(floor, min(max_reps, budget_s / max(1e-6, sum(first.values())))))
    times: dict[str, list[float]] = {b: [] for b in BACKENDS}
    walls: dict[str, list[float]] = {b: [] for b in BACKENDS}
    for i in range(reps):
        for b in BACKENDS if i % 2 == 0 else BACKENDS[::-1]:
            start, wall = time.thread_time(), time.perf_counter()
            calls[b]()
            times[b].append(time.thread_time() - start)
            walls[b].append(time.perf_counter() - wall)
    row = {"op": name, "n": n, "pass": pass_, "reps": reps, "torch_path": path}
    for b in BACKENDS:
        row[f"{b}_ms"] = 1e3 * min(times[b])
        row[f"{b}_ms_median"] = 1e3 * statistics.median(times[b])
        row[f"{b}_wall_ms_min"] = 1e3 * min(walls[b])
        row[f"{b}_mib"] = peak_mib(calls[b])
    row["time_ratio"] = row["torch_ms"] / row["reference_ms"]
    row["time_ratio_median_of_pairs"] = statistics.median(t / r for t, r in zip(times["torch"], times["reference"]))
    row["memory_ratio"] = row["torch_mib"] / max(1e-9, row["reference_mib"])
    return row


def summary(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["op"] for r in rows):
        for pass_ in PASSES:
            sel = sorted((r for r in rows if r["op"] == name and r["pass"] == pass_), key=lambda r: r["n"])
            if not sel:
                continue
            efficient = [r["n"] for r in sel if r["torch_path"] == "efficient"]
            out[f"{name} {pass_}"] = {
                "worst_time_ratio": max(r["time_ratio"] for r in sel),
                "worst_memory_ratio": max(r["memory_ratio"] for r in sel),
                "first_efficient_n": efficient[0] if efficient else None,
                "largest_n": sel[-1]["n"], "time_ratio_at_largest": sel[-1]["time_ratio"],
                "memory_ratio_at_largest": sel[-1]["memory_ratio"],
            }
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# genie-tk `torch` backend vs `reference` (CPU, one thread, fp32)", "",
        f"{env['date'][:10]} · commit `{(env['commit'] or {}).get('hash', '?')[:10]}` · torch {env['torch']} · "
        f"{env['device']['name']} · {env['device']['threads']} thread · load {env['device']['load_avg_1min']:.1f}", "",
        f"Generated by `python benchmarks/torch_vs_reference.py {' '.join(result['argv'])}`"
        f" ({result['wall_s'] / 60:.1f} min). Ratios are torch / reference: fastest CPU time (of the calling "
        "thread) of alternating calls in one process (the median of per-pair ratios in the tables), and peak "
        "memory (live tensor bytes the allocator handed out during one call, output included; "
        "`torch.profiler` allocation events, deterministic). `path` is the torch "
        "backend's choice for the call: `plain` (the reference computation, chosen when the "
        "working set is small) or `efficient` (chunked, recomputing in backward).", "",
        "| op | pass | worst time ratio | worst memory ratio | first N on `efficient` | ratios at largest N |",
        "|---|---|---|---|---|---|",
    ]
    for key, s in result["summary"].items():
        op, pass_ = key.split(" ")
        lines.append(f"| {op} | {pass_} | {s['worst_time_ratio']:.2f} | {s['worst_memory_ratio']:.2f} | "
                     f"{s['first_efficient_n'] or '–'} | N={s['largest_n']}: time {s['time_ratio_at_largest']:.2f},"
                     f" memory {s['memory_ratio_at_largest']:.2f} |")
    for name in dict.fromkeys(r["op"] for r in result["results"]):
        lines += ["", f"## {name}", "",
                  "| N | pass | path | torch ms | reference ms | time ratio | median pair ratio | torch MiB "
                  "| reference MiB | memory ratio | reps |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in result["results"] if r["op"] == name):
            lines.append(f"| {r['n']} | {r['pass']} | {r['torch_path']} | {r['torch_ms']:.3g} | {r['reference_ms']:.3g} "
                         f"| {r['time_ratio']:.2f} | {r['time_ratio_median_of_pairs']:.2f} | {r['torch_mib']:.1f} | {r['reference_mib']:.1f} "
                         f"| {r['memory_ratio']:.2f} | {r['reps']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=list(NS))
    ap.add_argument("--ops", nargs="+", default=list(OP_NAMES), choices=OP_NAMES)
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    ap.add_argument("--budget-s", type=float, default=4.0, help="timing seconds per case (both backends)")
    ap.add_argument("--max-reps", type=int, default=25)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--name", help="file stem (default torch_vs_reference_cpu_<date>)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = {"environment": environment(torch.device("cpu")), "argv": sys.argv[1:] if argv is None else argv,
              "config": {"ns": args.n, "ops": args.ops, "passes": args.passes, "budget_s": args.budget_s,
                         "layer": LAYER}, "results": []}
    stem = args.name or f"torch_vs_reference_cpu_{datetime.date.today().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.ops:
        for n in args.n:
            for pass_ in args.passes:
                row = measure(name, n, pass_, args.budget_s, args.max_reps)
                result["results"].append(row)
                print(f"{name:20s} N={n:4d} {pass_:8s} {row['torch_path']:9s} time {row['time_ratio']:.2f} "
                      f"({row['torch_ms']:.3g} / {row['reference_ms']:.3g} ms)  memory {row['memory_ratio']:.2f} "
                      f"({row['torch_mib']:.1f} / {row['reference_mib']:.1f} MiB)", flush=True)
    result["wall_s"] = time.perf_counter() - start
    result["summary"] = summary(result["results"])
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
