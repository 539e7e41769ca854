"""Compile every triton triangle attention kernel for a GPU architecture, with no GPU.

``python compile_triton_kernels.py ARCH [DTYPE HEAD_DIM ...]`` (e.g. ``90 bf16 32``) runs
Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin through ptxas) for
``sm_ARCH`` and prints each kernel's shared memory; it exits 1 if any fails. Run in a
process without ``TRITON_INTERPRET`` (the interpreter replaces the kernels).
test_triton_attention.py runs it so that CI proves the GPU path compiles.
"""

from __future__ import annotations

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from genie_tk.triton import triangle_attention as ta

TYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
ATTENTION = (ta._fwd_kernel, ta._bwd_dq_kernel, ta._bwd_dkdv_kernel, ta._bwd_dbias_kernel)
GATE = (ta._gate_fwd_kernel, ta._gate_bwd_kernel)


def _signature(fn, dtype: str, constexprs: dict) -> dict:
    fp32 = {"STATS", "DELTA"}
    sizes = {"ROWS", "H", "N", "N_BUCKET", "R", "J"}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in sizes:
            sig[name] = "i32"
        elif name == "MASK":
            sig[name] = "*u8"
        elif name.isupper() or name == "BG":  # tensors
            sig[name] = "*fp32" if name in fp32 else f"*{dtype}"
        elif name in ("scale", "inf"):
            sig[name] = "fp32"
        else:  # strides may pass 2**31 on large inputs; sizes may not
            sig[name] = "i64" if name.startswith("s") else "i32"
    return sig


def compile_all(arch: int, dtype: str, head_dim: int) -> int:
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    attention = dict(HAS_MASK=True, PRECISION="ieee" if dtype == "fp32" else "tf32", INTERP=False,
                     OPERAND=TYPES[dtype], HEAD_DIM=head_dim, BLOCK_J=64, BLOCK_K=64)
    gate = dict(HEAD_DIM=head_dim, INTERP=False, BLOCK_R=32, BLOCK_C=128)
    for fn, constexprs in [(fn, attention) for fn in ATTENTION] + [(fn, gate) for fn in GATE]:
        try:
            kernel = triton.compile(ASTSource(fn, _signature(fn, dtype, constexprs), constexprs), target=target)
            print(f"sm_{arch} {dtype} D{head_dim} {fn.__name__}: ok, {kernel.metadata.shared} B shared")
        except Exception as exc:  # report every kernel, then fail
            failures += 1
            print(f"sm_{arch} {dtype} D{head_dim} {fn.__name__}: FAILED {type(exc).__name__}: {exc}")
    return failures


if __name__ == "__main__":
    if ta.INTERPRETED:
        sys.exit("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    arch, rest = int(sys.argv[1]), sys.argv[2:] or ["bf16", "32"]
    cases = list(zip(rest[::2], map(int, rest[1::2])))
    sys.exit(1 if sum(compile_all(arch, dt, d) for dt, d in cases) else 0)
