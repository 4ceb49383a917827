"""Is a backend usable on this machine? Answered without importing torch, before anything loads."""

from __future__ import annotations

from sdexport.errors import MissingDependencyError, SdexportError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def available_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def require_onnxruntime() -> None:
    if not available_providers():
        raise MissingDependencyError(
            "onnxruntime", "for the ONNX Runtime backend", 'pip install "sdexport[cpu]" (or [gpu] on CUDA)'
        )


def require_provider(device: str) -> None:
    require_onnxruntime()
    if PROVIDERS[device] not in available_providers():
        raise MissingDependencyError(
            "onnxruntime-gpu",
            "for --backend onnxruntime-cuda",
            'pip uninstall -y onnxruntime && pip install "sdexport[gpu]" (CUDA build of onnxruntime)',
        )


def require_backend(backend: str) -> None:
    """Raise ``MissingDependencyError`` (saying what to install) for a resolved backend name that
    cannot run here: no onnxruntime, no CUDA provider, or no TensorRT."""
    if backend.startswith("onnxruntime-"):
        require_provider(backend.split("-", 1)[1])
    elif backend == "tensorrt":
        from sdexport.build.tensorrt_build import require_tensorrt

        require_tensorrt()


MANAGED_OPTIONS = ("device_id", "user_compute_stream", "has_user_compute_stream", "enable_cuda_graph")
"""CUDA provider options sdexport sets itself: the stream and device keep calls ordered without host
waits, and CUDA graphs need buffers bound once (``--cuda-graph``), so none may come from outside."""


def check_provider_options(options: dict[str, str]) -> None:
    """Refuse, with one line, extra options that would undo what sdexport's sessions rely on."""
    managed = [k for k in options if k in MANAGED_OPTIONS]
    if managed:
        raise SdexportError(
            f"--ort-option {', '.join(managed)}: set by sdexport itself (stream, device, --cuda-graph); "
            f"leave {'it' if len(managed) == 1 else 'them'} out"
        )
