"""Where a result came from: device, driver, versions, commit, date."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

import genie_tk

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMIT_VAR = "GENIE_BENCH_COMMIT"  # set where the checkout has no .git (the GPU visit)
PACKAGES = ("genie-tk", "flash-genie", "cuequivariance", "cuequivariance-torch",
            "cuequivariance-ops-torch-cu13", "trifast", "triton", "numpy", "matplotlib")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def commit() -> dict:
    """``{"hash", "dirty"}``: the checkout's HEAD and whether the tracked files that
    the figures depend on (genie-tk and the benchmarks) differ from it."""
    env = os.environ.get(COMMIT_VAR)
    head = _git("rev-parse", "HEAD")
    if env or head is None:
        return {"hash": env or "unknown", "dirty": None}
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", "packages/genie-tk", "benchmarks")
    return {"hash": head, "dirty": bool(changed)}


def _cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.machine()


def _driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        match = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
        return match.group(1) if match else None
    except OSError:
        return None


def device_info(device: torch.device) -> dict:
    """Name, kind and the properties that the figures depend on."""
    info = {"type": device.type, "threads": torch.get_num_threads(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            # Other work on the machine skews CPU timings (OpenMP threads wait on each other).
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if device.type != "cuda":
        return {**info, "name": f"CPU: {info['cpu']}"}
    props = torch.cuda.get_device_properties(device)
    return {**info, "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None), "driver": _driver()}


def _versions() -> dict:
    found = {}
    for dist in PACKAGES:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    found["genie-tk"] = found["genie-tk"] or getattr(genie_tk, "__version__", None)
    return found


def environment(device: torch.device) -> dict:
    """Everything a reader needs to place a result file."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "device": device_info(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": _versions(),
        # Round-trip through JSON so that build info of any type stays serialisable.
        "genie_tk_backends": json.loads(json.dumps(genie_tk.backends(), default=str)),
    }


def slug(device: dict) -> str:
    """File-name form of a device: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    if device["type"] != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device["name"].lower()).strip("-")
