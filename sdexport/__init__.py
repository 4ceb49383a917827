"""sdexport: Stable Diffusion checkpoints to verified ONNX, TensorRT engines and a slim runtime."""

__version__ = "0.1.0"
