"""Components → verified ONNX: tracing, graph passes, parity checks and the export job."""
