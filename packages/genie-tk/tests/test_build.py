"""The build of genie-tk and its optional extension ``genie_tk._C``.

* Without a GPU: what the extension reports about itself, argument errors that
  are raised before anything touches CUDA, and CMake configure runs of the
  project (the pure-Python paths always; the CUDA path, marked ``slow``, where
  nvcc and ThunderKittens are present).
* With a Hopper GPU (marked ``cuda``): the TMA round-trip kernel
  ``tile_copy_sm90``, which checks the whole host/driver/TMA/stream chain the
  real kernels use.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1]
MIN_CMAKE = (3, 26)


def _extension():
    try:
        from genie_tk import _C
    except ImportError as exc:
        pytest.skip(f"genie_tk._C is not built ({exc})")
    return _C


# ---------------------------------------------------------------- extension


def test_info_describes_the_build():
    info = _extension().info()
    print(info)
    assert set(info) == {"cuda_kernels", "cuda_version", "archs", "thunderkittens_commit", "debug"}
    assert info["cuda_kernels"] is True
    assert isinstance(info["debug"], bool)
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", info["cuda_version"])
    assert info["archs"] == ["90a"]
    commit = info["thunderkittens_commit"]
    assert commit == "local" or re.fullmatch(r"[0-9a-f]{40}", commit)


def test_driver_status_is_a_string_and_does_not_raise():
    ext = _extension()
    status = ext.driver_status()
    print(repr(status))
    assert isinstance(status, str)
    assert ext.driver_status() == status  # resolved once, answered the same way after


def test_tile_copy_sm90_rejects_cpu_tensors_naming_the_argument():
    ext = _extension()
    cpu = torch.empty(64, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^dst must be a CUDA tensor, got a tensor on cpu"):
        ext.tile_copy_sm90(cpu, cpu, 0)


def test_tile_copy_sm90_rejects_non_arrays():
    with pytest.raises(TypeError):
        _extension().tile_copy_sm90([1.0], [1.0], 0)


# (kernel, threads, producer registers, consumer warpgroups, consumer registers,
# registers per thread at entry): the kernels' budgets and the count ptxas gives
# them under __launch_bounds__(threads, 1) (65536 / threads, down to a multiple of 8).
BUDGETS = [
    ("attention fwd d<=32", 640, 24, 4, 112, 96),
    ("attention fwd d=64, dq/dk/dv, dbias", 384, 24, 2, 240, 168),
    ("trimul contract", 384, 40, 2, 232, 168),
]


@pytest.mark.parametrize(("kernel", "threads", "producer", "consumers", "consumer", "regs"), BUDGETS,
                         ids=[b[0] for b in BUDGETS])
def test_register_budget_check_accepts_the_kernels_budgets(kernel, threads, producer, consumers, consumer, regs):
    check = _extension().register_budget_error
    assert check(kernel, regs, threads, 1, producer, consumers, consumer) == ""
    # Fewer registers at entry than the cap (ptxas needed fewer): the pool
    # shrinks and setmaxnreg.inc would wait forever; the launch raises instead.
    error = check(kernel, regs - 16, threads, 1, producer, consumers, consumer)
    print(error)
    assert error.startswith(f"genie_tk: {kernel}: setmaxnreg budgets need ")
    assert "would wait forever" in error


def test_register_budget_check_names_what_is_wrong():
    check = _extension().register_budget_error
    assert check("k", 40, 256, 0, 0, 0, 0) == ""  # no setmaxnreg: nothing to check
    assert "covers 3 warpgroups but the kernel launches 256 threads" in check("k", 168, 256, 1, 24, 2, 240)
    assert "24..256 registers in steps of 8" in check("k", 168, 384, 1, 20, 2, 240)
    assert "cannot raise it" in check("k", 96, 384, 1, 104, 2, 240)
    assert "cannot lower it" in check("k", 168, 384, 1, 24, 2, 160)
    # numRegs is rounded up to the allocation unit of 8 per thread.
    assert check("k", 161, 384, 1, 24, 2, 232) == check("k", 168, 384, 1, 24, 2, 232) == ""


# ------------------------------------------------------------ CMake configure


def _cmake_version(exe: str) -> tuple[int, ...]:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(x) for x in re.search(r"version (\d+)\.(\d+)", out).groups())


@pytest.fixture(scope="module")
def cmake() -> str:
    """A CMake new enough for the project (the PyPI ``cmake`` package or PATH)."""
    candidates = []
    if importlib.util.find_spec("cmake") is not None:
        import cmake as cmake_module

        candidates.append(str(Path(cmake_module.CMAKE_BIN_DIR) / "cmake"))
    if shutil.which("cmake"):
        candidates.append(shutil.which("cmake"))
    for exe in candidates:
        if _cmake_version(exe) >= MIN_CMAKE:
            return exe
    pytest.skip(f"needs CMake >= {'.'.join(map(str, MIN_CMAKE))} (pip install cmake)")


def _nvcc() -> str | None:
    return os.environ.get("CUDACXX") or shutil.which("nvcc")


def _configure(cmake: str, build_dir: Path, **defines: str) -> subprocess.CompletedProcess:
    args = [
        cmake,
        "-S",
        str(PACKAGE_DIR),
        "-B",
        str(build_dir),
        f"-DPython_EXECUTABLE={sys.executable}",
    ]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    args += [f"-D{key}={value}" for key, value in defines.items()]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
    return result


def test_configure_off_is_pure_python(cmake, tmp_path):
    result = _configure(cmake, tmp_path / "build", GENIE_TK_CUDA="OFF")
    assert result.returncode == 0
    assert "genie-tk: building WITHOUT CUDA kernels: GENIE_TK_CUDA=OFF" in result.stdout


def test_configure_auto_without_thunderkittens_falls_back(cmake, tmp_path):
    empty = tmp_path / "no-thunderkittens"
    empty.mkdir()
    result = _configure(
        cmake, tmp_path / "build", GENIE_TK_CUDA="AUTO", THUNDERKITTENS_ROOT=str(empty)
    )
    assert result.returncode == 0
    assert "genie-tk: building WITHOUT CUDA kernels:" in result.stdout
    missing = "ThunderKittens not found" if _nvcc() else "no working CUDA compiler"
    assert missing in result.stdout


def test_configure_on_names_the_missing_piece(cmake, tmp_path):
    empty = tmp_path / "no-thunderkittens"
    empty.mkdir()
    result = _configure(
        cmake, tmp_path / "build", GENIE_TK_CUDA="ON", THUNDERKITTENS_ROOT=str(empty)
    )
    assert result.returncode != 0
    assert "GENIE_TK_CUDA=ON but" in result.stderr
    missing = "ThunderKittens not found" if _nvcc() else "no working CUDA compiler"
    assert missing in " ".join(result.stderr.split())  # CMake wraps long messages


@pytest.mark.slow
def test_configure_on_with_thunderkittens(cmake, tmp_path):
    tk_root = os.environ.get("THUNDERKITTENS_ROOT", "")
    if not _nvcc():
        pytest.skip("needs nvcc (on PATH or CUDACXX)")
    if not (Path(tk_root) / "include" / "kittens.cuh").is_file():
        pytest.skip("needs THUNDERKITTENS_ROOT pointing at a tree with include/kittens.cuh")
    if importlib.util.find_spec("nanobind") is None:
        pytest.skip("needs nanobind installed in this Python")
    result = _configure(cmake, tmp_path / "build", GENIE_TK_CUDA="ON", THUNDERKITTENS_ROOT=tk_root)
    assert result.returncode == 0
    assert "genie-tk: building the CUDA kernels" in result.stdout
    assert "WITHOUT" not in result.stdout


# ------------------------------------------------------------------- GPU


def _cuda_extension():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return _extension()


def _hopper_extension():
    ext = _cuda_extension()
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("tile_copy_sm90 needs an sm_90 (Hopper) GPU")
    assert ext.driver_status() == ""
    return ext


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(64, 64), (128, 192), (320, 1024)])
def test_tile_copy_sm90_is_exact(shape):
    ext = _hopper_extension()
    torch.manual_seed(0)
    src = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    dst = torch.full_like(src, float("nan"))  # poison: a tile left unwritten fails
    # A side stream, to check that the launch goes on the stream it is given.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ext.tile_copy_sm90(dst, src, stream.cuda_stream)
    stream.synchronize()
    mismatches = (dst != src).sum().item()
    print(f"shape={shape} mismatches={mismatches}")
    assert torch.equal(dst, src)


def _bf16(*shape: int, **kwargs) -> torch.Tensor:
    return torch.empty(shape, **{"device": "cuda", "dtype": torch.bfloat16, **kwargs})


# id -> (make dst, make src, error, message); the tensors are made inside the
# test because they need a GPU.
BAD_ARGUMENTS = {
    "non-contiguous": (
        lambda: _bf16(128, 192),
        lambda: _bf16(192, 128).t(),
        ValueError,
        r"^src must be C-contiguous",
    ),
    "wrong-dtype": (
        lambda: _bf16(128, 192),
        lambda: _bf16(128, 192, dtype=torch.float32),
        TypeError,
        r"^src must have dtype bfloat16, got float32",
    ),
    "cpu": (
        lambda: _bf16(128, 192),
        lambda: _bf16(128, 192, device="cpu"),
        ValueError,
        r"^src must be a CUDA tensor, got a tensor on cpu",
    ),
    "shape-mismatch": (
        lambda: _bf16(128, 128),
        lambda: _bf16(128, 192),
        ValueError,
        r"^dst must have shape \(128, 192\), got \(128, 128\)",
    ),
    "not-tile-multiple": (
        lambda: _bf16(100, 192),
        lambda: _bf16(100, 192),
        ValueError,
        r"^src must have both dimensions positive multiples of 64",
    ),
    "wrong-rank": (
        lambda: _bf16(128, 192),
        lambda: _bf16(128, 192, 1),
        ValueError,
        r"^src must be 2-D, got 3-D",
    ),
}


@pytest.mark.cuda
@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_tile_copy_sm90_rejects_bad_arguments(case):
    ext = _cuda_extension()  # the checks run before any launch: any GPU will do
    make_dst, make_src, error, message = BAD_ARGUMENTS[case]
    with pytest.raises(error, match=message):
        ext.tile_copy_sm90(make_dst(), make_src(), torch.cuda.current_stream().cuda_stream)
