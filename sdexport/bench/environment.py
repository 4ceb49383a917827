"""What a benchmark ran on: the figures mean nothing without the device and the versions beside them."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from sdexport.console import cpu_threads_asked, usable_cpus
from sdexport.versions import installed_version


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision(module: Path = Path(__file__)) -> str | None:
    """The commit measured; ``SDEXPORT_GIT_REVISION`` names it where the tree was copied without its
    ``.git`` (a GPU server given a snapshot of the working tree). None for an installed sdexport,
    also one whose environment sits inside some other repository (a virtualenv in a project's
    folder): the repository must track ``module``, this file, or its commit is not the one measured.
    A ``git status`` that fails or times out (a slow network file system) keeps the commit, marked
    "(changes unknown)": the commit is known, only whether the tree matched it is not."""
    if os.environ.get("SDEXPORT_GIT_REVISION"):
        return os.environ["SDEXPORT_GIT_REVISION"]
    module = module.resolve()

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=module.parent)

    try:
        if git("ls-files", "--error-unmatch", "--", module.name).returncode != 0:
            return None
        result = git("rev-parse", "--short", "HEAD")
        if result.returncode != 0:
            return None
    except (OSError, subprocess.SubprocessError):
        return None
    revision = result.stdout.strip()
    try:
        status: subprocess.CompletedProcess[str] | None = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        status = None
    if status is None or status.returncode != 0:
        return revision + " (changes unknown)"
    return revision + ("-dirty" if status.stdout.strip() else "")


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
    except (ImportError, OSError):  # OSError: the wheel is there but libnvinfer is not loadable
        return None
    return getattr(tensorrt, "__version__", None)  # the stubs alone import but have no version


def _onnxruntime_version() -> str | None:
    """The version of the onnxruntime that imports: with onnxruntime-gpu put ahead on the path
    (scripts/gpu-tests.sh), the CPU package's metadata would name the wrong one."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def _cuda_provider_status() -> str:
    """"available" only when a session really runs on CUDA: onnxruntime-gpu lists its CUDA provider
    even when the CUDA or cuDNN libraries it needs are missing, and then falls back to the CPU. The
    probe runs one convolution: onnxruntime loads cuDNN only when a kernel first needs it, so a
    missing or mismatched cuDNN would otherwise pass here and fail at the first U-Net."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"not installed ({exc})"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "not in this onnxruntime build (install onnxruntime-gpu)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    from onnx import TensorProto, helper

    from sdexport.runtime.onnxruntime_backend import preload_cuda_libraries

    preload_cuda_libraries(ort)  # as the engines do before their sessions

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1, 1], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    try:
        from sdexport.console import onnxruntime_session_options

        session = ort.InferenceSession(model.SerializeToString(), onnxruntime_session_options(ort),
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                       enable_fallback=0)  # (no banner on stdout: the cause, raised)
    except Exception as exc:  # onnxruntime's own exception types
        return f"fails to start: {' '.join(str(exc).split())[:300]}"
    used = session.get_providers()
    if not used or used[0] != "CUDAExecutionProvider":
        return f"falls back to {used}"
    import numpy as np

    try:
        session.run(None, {"x": np.ones((1, 1, 4, 4), np.float32)})
    except Exception as exc:  # noqa: BLE001 - e.g. cuDNN missing: the reason is the status
        return f"fails to run a convolution (cuDNN?): {' '.join(str(exc).split())[:300]}"
    return "available"


def _tensorrt_status() -> dict[str, Any]:
    from sdexport.build.tensorrt_build import require_tensorrt
    from sdexport.errors import MissingDependencyError

    try:
        trt = require_tensorrt()
    except MissingDependencyError as exc:
        return {"status": str(exc), "version": tensorrt_version()}
    return {"status": "available", "version": str(trt.__version__)}


def gpu_facts() -> dict[str, Any]:
    """What a GPU test or benchmark run must record about the machine: the GPU, driver, CUDA and
    cuDNN, torch, the onnxruntime that imports (and whether its CUDA provider really starts), and
    whether TensorRT imports. Runs anywhere; on a CPU machine it says so."""
    cuda = torch.cuda.is_available()
    try:
        import pynvml  # noqa: F401

        nvml = True
    except ImportError:
        nvml = False
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cuda_available": cuda,
        "gpu": _gpu(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if cuda else None},
        "onnxruntime": {"version": _onnxruntime_version(), "cuda_provider": _cuda_provider_status()},
        "tensorrt": _tensorrt_status(),
        "nvml": nvml,
        "git_revision": _git_revision(),
    }


def environment() -> dict[str, Any]:
    ort_providers: list[str] = []
    try:
        import onnxruntime

        ort_providers = list(onnxruntime.get_available_providers())
    except ImportError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                 # (fewer where the run was pinned: taskset, a container's cpuset; report.cores_label)
                 "usable_cores": usable_cpus(),
                 "python": platform.python_version(),
                 # ONNX Runtime's CPU sessions and torch run on these (sdexport.console.cpu_threads_asked)
                 "cpu_threads": cpu_threads_asked() or None},
        "gpu": _gpu(),
        "versions": {
            "sdexport": installed_version("sdexport"),
            "torch": torch.__version__,
            "diffusers": installed_version("diffusers"),
            "transformers": installed_version("transformers"),
            "onnx": installed_version("onnx"),
            "onnxruntime": _onnxruntime_version(),
            "tensorrt": tensorrt_version(),
        },
        "onnxruntime_providers": ort_providers,
        "git_revision": _git_revision(),
    }
