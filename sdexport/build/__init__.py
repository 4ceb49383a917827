"""ONNX → TensorRT: optimization profiles from the ComponentSpecs, an engine cache key, and the build.

``profiles`` and ``cache_key`` are pure Python so that they can be tested (and engines planned) on a
machine without TensorRT; ``tensorrt_build`` is the only module that touches TensorRT and polygraphy,
and it imports them inside its functions.
"""
