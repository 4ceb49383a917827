"""What a benchmark ran on: the figures mean nothing without the device and the versions beside them."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
    return result.stdout.strip() + ("-dirty" if dirty else "")


def _gpu() -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "name": props.name,
        "memory_gb": round(props.total_memory / 1024**3, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "driver": None,
    }
    try:
        import pynvml  # from nvidia-ml-py, present on most GPU images

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:  # no NVML: the driver stays unknown rather than guessed
        pass
    return info


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return getattr(tensorrt, "__version__", None)  # the stubs alone import but have no version


def environment() -> dict[str, Any]:
    ort_providers: list[str] = []
    try:
        import onnxruntime

        ort_providers = list(onnxruntime.get_available_providers())
    except ImportError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                 "python": platform.python_version()},
        "gpu": _gpu(),
        "versions": {
            "sdexport": _version("sdexport"),
            "torch": torch.__version__,
            "diffusers": _version("diffusers"),
            "transformers": _version("transformers"),
            "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
            "tensorrt": tensorrt_version(),
        },
        "onnxruntime_providers": ort_providers,
        "git_revision": _git_revision(),
    }
