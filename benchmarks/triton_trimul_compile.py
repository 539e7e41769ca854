"""Compile the triton tri-mul kernels for NVIDIA targets on a machine without a GPU.

Triton's compiler and the ``ptxas`` bundled with the triton wheel need no driver, so
every kernel of ``genie_tk.triton.triangle_multiplication`` is lowered here exactly
as a GPU would lower it (TTIR -> TTGIR -> LLVM -> PTX -> cubin) for each autotuning
configuration, and ``ptxas -v`` reports its registers and spills. This proves that
the kernels compile (the interpreter does not type-check loops the way the compiler
does) and shows which configurations the autotuner's pruning estimate should drop.

    python benchmarks/triton_trimul_compile.py [--arch 90 80] [--dtypes bf16 fp16 fp32]
        [--c 128 --hidden 128] [--widths 32 64 128] [--warps 4 8] [--stages 2] [--quick]

One line per (arch, kernel, dtype, config): registers, spill bytes, shared memory.
Runs with ``TRITON_INTERPRET`` unset (the kernels must be real JIT functions).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from genie_tk.triton import triangle_multiplication as tm

DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
FP32_POINTERS = {"moments_ptr", "mask_ptr", "part_ptr", "norm_ptr", "ln_w", "ln_b", "lo_w", "lo_b", "p_b", "g_b",
                 "po_b", "go_b"}
INTS = {"R", "NN", "PART"}
# kernel -> (feature-tile argument, other constexprs, pairs per tile, live rows for tm.fits)
KERNELS = {
    "_input_kernel": ("BLOCK_H", {"HAS_MASK": True, "MOMENTS": True}, tm.GPU_BLOCK_M, 0.5),
    "_output_kernel": ("BLOCK_N", {"BLOCK_CH": None}, tm.GPU_BLOCK_M, 1.0),
    "_output_bwd_kernel": ("BLOCK_N", {"BLOCK_CH": None}, tm.GPU_BWD_BLOCK_M, 3.0),
    "_input_bwd_kernel": ("BLOCK_H", {"HAS_MASK": True, "NORMALISED": True}, tm.GPU_BWD_BLOCK_M, 2.5),
}


def _ptxas() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def compile_kernel(name, dtype_name, c, ch, width, warps, stages, arch):
    """``(registers, spill bytes, shared bytes, seconds)`` of one kernel configuration."""
    fn = getattr(tm, name)
    width_arg, extra, block_m, _ = KERNELS[name]
    dtype = DTYPES[dtype_name]
    consts = {"C": c, "CH": ch, "DTYPE": dtype, "BLOCK_M": block_m, "BLOCK_C": max(16, triton.next_power_of_2(c)),
              width_arg: width}
    for k, v in extra.items():
        if k == "BLOCK_CH":
            consts[k] = max(16, triton.next_power_of_2(ch))
        elif k in ("MOMENTS", "NORMALISED"):  # the float16 normalisation's branches
            consts[k] = dtype == tl.float16
        else:
            consts[k] = v
    signature = {}
    for arg in fn.arg_names:
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in INTS:
            signature[arg] = "i32"
        elif arg == "eps":
            signature[arg] = "fp32"
        else:
            signature[arg] = "*fp32" if arg in FP32_POINTERS else f"*{dtype_name}"
    src = triton.compiler.ASTSource(fn=fn, signature=signature,
                                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    start = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "num_stages": stages})
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        suffix = "a" if arch == 90 else ""
        info = subprocess.run([str(_ptxas()), f"-arch=sm_{arch}{suffix}", "-v", "-o", str(Path(tmp) / "k.cubin"),
                               str(ptx)], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    return regs, spills, kernel.metadata.shared, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--c", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--quick", action="store_true", help="sm_90, bf16, width 64, 4 warps, 2 stages")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.dtypes, args.widths, args.warps, args.stages = [90], ["bf16"], [64], [4], [2]
    print(f"triton {triton.__version__}, C = {args.c}, Ch = {args.hidden}, pairs per tile: forward "
          f"{tm.GPU_BLOCK_M}, backward {tm.GPU_BWD_BLOCK_M}")
    print("arch kernel dtype width warps stages: registers spill_bytes shared_bytes fits(estimate) compile_s")
    for arch in args.arch:
        for name in args.kernels:
            width_arg, _, block_m, rows = KERNELS[name]
            for dtype_name in args.dtypes:
                for width in args.widths:
                    for warps in args.warps:
                        for stages in args.stages:
                            regs, spills, shared, seconds = compile_kernel(name, dtype_name, args.c, args.hidden,
                                                                           width, warps, stages, arch)
                            named = {"BLOCK_C": max(16, triton.next_power_of_2(args.c)), "DTYPE": DTYPES[dtype_name],
                                     "BLOCK_M": block_m}
                            if width_arg == "BLOCK_N":
                                named["BLOCK_CH"] = max(16, triton.next_power_of_2(args.hidden))
                            config = triton.Config({width_arg: width}, num_warps=warps, num_stages=stages)
                            fits = tm.fits(config, named, shared_bytes=227 * 1024 if arch == 90 else 163 * 1024,
                                           registers=255, rows=rows)
                            print(f"sm_{arch} {name} {dtype_name} {width} {warps} {stages}: {regs} {spills} {shared} "
                                  f"{fits} {seconds:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
