"""Datasheet floors, all in one place, and the fraction of the floor a run reaches.

A case's floor is the largest of three times, each a lower bound no kernel can
beat on that card:

* arithmetic: FLOP / the dense peak for the dtype (tensor cores for bf16/fp16;
  the IEEE fp32 CUDA-core rate for float32, so a method that uses TF32 can
  exceed 1.0 of the floor, which then tells that it did);
* memory: bytes / HBM bandwidth, each input read once and each output written once;
* exponentials: exp count / the special-function unit rate (16 per SM per clock
  on sm_90, CUDA C++ Programming Guide, arithmetic throughput table). At head dim
  32, triangle attention's forward is bound by this, not by the tensor cores.
  (Kernels that emulate part of their exponentials on the FMA units can beat it.)

The fraction is reported only on a GPU whose name matches an entry below; a CPU
or another GPU gets ``null`` rather than a figure for the wrong chip.
"""

from __future__ import annotations

TFLOPS = 1e12

# NVIDIA H100 datasheet (SXM5, dense, no sparsity) and H200 (same GH100 die and
# clocks, HBM3e). Boost clock 1.98 GHz, 132 SMs.
_HOPPER_RATES = {"bfloat16": 989.4 * TFLOPS, "float16": 989.4 * TFLOPS,
                 "float32": 66.9 * TFLOPS, "float64": 66.9 * TFLOPS}
_HOPPER_EXP_PER_S = 132 * 16 * 1.98e9

FLOORS = {
    "H100 SXM": {"name_has": ("H100", "HBM3"), "flop_per_s": _HOPPER_RATES,
                 "bytes_per_s": 3.35e12, "exp_per_s": _HOPPER_EXP_PER_S},
    "H200": {"name_has": ("H200",), "flop_per_s": _HOPPER_RATES,
             "bytes_per_s": 4.8e12, "exp_per_s": _HOPPER_EXP_PER_S},
}


def for_device(name: str) -> tuple[str, dict] | None:
    """The floor entry whose name fragments all occur in the device ``name``."""
    for key, entry in FLOORS.items():
        if all(part in name for part in entry["name_has"]):
            return key, entry
    return None


def floor(entry: dict, dtype: str, flop: float, nbytes: float, exps: float) -> dict:
    """The three lower bounds in ms and which one binds."""
    parts = {
        "compute_ms": 1e3 * flop / entry["flop_per_s"][dtype],
        "memory_ms": 1e3 * nbytes / entry["bytes_per_s"],
        "exp_ms": 1e3 * exps / entry["exp_per_s"],
    }
    bound = max(parts, key=parts.get)
    return {**parts, "floor_ms": parts[bound], "bound": bound.removesuffix("_ms")}
