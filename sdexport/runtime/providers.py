"""Is a backend usable on this machine? Answered without importing torch, before anything loads."""

from __future__ import annotations

from sdexport.errors import MissingDependencyError

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
