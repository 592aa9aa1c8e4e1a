"""What a record needs to be trusted: library versions, code commit, device and peak memory."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("torch", "torchvision", "timm", "hydra-core", "omegaconf", "numpy", "pandas", "ptq-bench")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_state(repo: Path) -> dict[str, Any]:
    """Commit hash and whether the work tree has uncommitted changes (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment(repo: Path, device_name: str) -> dict[str, Any]:
    """Versions, code commit and hardware of this run (``device_name`` as the task used it, e.g. "cuda:0")."""
    device = torch.device(device_name)
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git": git_state(repo),
    }


def process_peak_rss_mib() -> float:
    """The peak resident memory of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_memory_tracking(device: torch.device) -> float:
    """Reset the CUDA peak counter and return the process's peak RSS before the run (the baseline)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return process_peak_rss_mib()


def peak_memory(device: torch.device, rss_baseline_mib: float) -> dict[str, float | None]:
    """Peak CUDA memory of this run (GPU) and the process's peak RSS, with its value before the run: in a
    sequential sweep one process runs many jobs, and an RSS peak can only grow, so only a rise is this run's."""
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_cuda_mib": cuda, "process_peak_rss_mib": process_peak_rss_mib(), "process_peak_rss_before_run_mib": rss_baseline_mib}
