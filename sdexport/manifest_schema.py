"""JSON Schema of ``manifest.json``: the types and ranges a manifest must have before anything reads it.

A manifest is input like any other: a hand-edited, truncated or hostile one must be refused with one
line naming the offending field, not crash deep inside the runtime. The schema covers types, ranges
and known values; what a schema cannot say (min <= opt <= max, paths staying inside the directory,
components of the right family) is checked in ``sdexport.manifest``.
"""

from __future__ import annotations

from typing import Any

from sdexport.specs import FAMILY_COMPONENTS

FORMAT = "sdexport-engine-dir"
FORMAT_VERSION = 2
"""2: optimum's tensor names (VAE ``latent_sample``/``sample``, SDXL text encoders' ``hidden_states.{i}``),
``model_index.json`` and per-component ``config.json``. Version 1 directories are refused with the
command that re-exports them (``manifest.load_manifest``)."""
EMBEDDINGS_FORMAT_VERSION = 3
"""3: as 2, with textual inversion embeddings added to the text encoders (``model.embeddings``),
whose words the runtime spells out as several tokens. Written only for such a directory, so that
an sdexport that predates them refuses it, rather than read each word as its first vector (or fail
on the Torch backend, which adds them again)."""
FORMAT_VERSIONS = (FORMAT_VERSION, EMBEDDINGS_FORMAT_VERSION)
WORD = r"[^\s:]+"
"""A textual inversion embedding's word: one token of text, as ``FILE:WORD`` can give it."""
VAE_SCALING_DEFAULT = 0.18215
"""A VAE config's ``scaling_factor`` where it gives none (diffusers' ``AutoencoderKL`` default): what
export and adopt record as the manifest's ``vae_scaling_factor``, and what its check reads the config as."""


def format_version_for(model: dict[str, Any]) -> int:
    """The format a manifest's ``model`` record is written in (and must be read in)."""
    return EMBEDDINGS_FORMAT_VERSION if model.get("embeddings") else FORMAT_VERSION

_SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_PATH = {"type": "string", "minLength": 1, "maxLength": 4096}
"""A path relative to the engine directory; what it may point at is checked in code."""
_RANGE = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 1 << 20}, "minItems": 3, "maxItems": 3}
_PROFILE = {
    "type": "object",
    "required": ["batch", "height", "width"],
    "properties": {"batch": _RANGE, "height": _RANGE, "width": _RANGE, "chunks": _RANGE},
    "additionalProperties": False,
}


def _size(maximum: int, minimum: int = 1) -> dict[str, Any]:
    """A model size: bounded far above any real model, so nonsense is refused, not allocated."""
    return {"type": "integer", "minimum": minimum, "maximum": maximum}

_NUMBER = {"type": "number"}
_PARITY = {
    "type": "object",
    "properties": {
        "status": {"type": "string"},
        "reason": {"type": "string"},
        "tolerance": _NUMBER,
        "points": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "status": {"type": "string"},
                    "reason": {"type": "string"},
                    "outputs": {"type": "object", "additionalProperties": {
                        "type": "object", "required": ["max_abs", "rel_l2"],
                        "properties": {"max_abs": _NUMBER, "rel_l2": _NUMBER}}},
                },
            },
        },
    },
}
"""A parity report (``export.verify.ParityReport``, ``onnxruntime_build.parity``): what inspect
formats as numbers is held to be numbers; other keys are free (written by several versions)."""
_EXPORT_MEMORY = {
    "type": "object",
    "properties": {
        "machine_memory_mb": _NUMBER,
        "stages": {"type": "array", "items": {
            "type": "object", "properties": {"stage": {"type": "string"}, "peak_rss_mb": _NUMBER}}},
    },
}
"""``tools.export_memory`` (``export.memory``): the stages inspect tabulates."""

_ENGINE = {
    "type": "object",
    "required": ["path", "key"],
    "properties": {
        "path": _PATH,
        "key": {"type": "object"},
        "build_seconds": {"type": "number", "minimum": 0},
        "built": {"type": "string"},
        "chosen": {"type": "string"},
        "profile": _PROFILE,
    },
}
_OPTIMIZED = {
    "type": "object",
    "required": ["onnx", "dtype", "source_sha256"],
    "properties": {
        "onnx": _PATH,
        "dtype": {"enum": ["fp32", "fp16"]},
        "source_sha256": _SHA256,
        "onnxruntime": {"type": "string"},
        "fusion_model": {"enum": ["clip", "unet", "vae"]},
        "fusions": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
        "left_out": {"type": "object", "additionalProperties": {"type": "string"}},
        "parity": _PARITY,
        "build_seconds": {"type": "number", "minimum": 0},
        "built": {"type": "string"},
    },
}
"""A graph rewritten for one runtime (``sdexport build --target onnxruntime-cuda``)."""
_COMPONENT = {
    "type": "object",
    "required": ["onnx", "dtype", "parity"],
    "properties": {
        "onnx": _PATH,
        "dtype": {"enum": ["fp32", "fp16"]},
        "parity": _PARITY,
        "engines": {"type": "object", "additionalProperties": _ENGINE},
        "optimized": {"type": "object", "propertyNames": {"enum": ["onnxruntime-cuda"]},
                      "additionalProperties": _OPTIMIZED},
    },
    "additionalProperties": False,
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sdexport engine directory manifest",
    "type": "object",
    "required": [
        "format", "format_version", "family", "model", "prediction_type", "vae_scaling_factor", "dims",
        "profile", "dtype", "tools", "components", "files", "created",
    ],
    "properties": {
        "format": {"const": FORMAT},
        "format_version": {"enum": list(FORMAT_VERSIONS)},
        "family": {"enum": sorted(FAMILY_COMPONENTS)},
        "model": {
            "type": "object",
            "required": ["label", "source", "random_weights"],
            "properties": {
                "label": {"type": "string"},
                "source": {
                    "type": "object",
                    "required": ["kind"],
                    "properties": {
                        "kind": {"enum": ["preset", "diffusers", "single_file", "onnx"]},
                        # the weight files the export read, by absolute path (models.source_files)
                        "files": {"type": "object", "additionalProperties": _SHA256},
                    },
                },
                "random_weights": {"type": "boolean"},
                "pipeline_config": {"type": "object"},
                "loras": {  # fused at export (sdexport export --lora), in the order applied
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["path", "sha256", "scale"],
                        "properties": {"path": {"type": "string"}, "sha256": _SHA256, "scale": {"type": "number"}},
                    },
                },
                "embeddings": {  # textual inversion, added at export (--textual-inversion), in order
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["path", "sha256", "word"],
                        "properties": {"path": {"type": "string"}, "sha256": _SHA256,
                                       "word": {"type": "string", "pattern": f"^{WORD}$"}},
                    },
                },
            },
        },
        "prediction_type": {"enum": ["epsilon", "v_prediction", "sample"]},
        "vae_scaling_factor": {"type": "number", "exclusiveMinimum": 0},
        "dims": {
            "type": "object",
            "required": ["S", "E", "P", "C", "vae_scale_factor", "unet_downsample"],
            "properties": {
                "S": _size(4096), "E": _size(65536), "P": _size(65536), "C": _size(256),
                "vae_scale_factor": _size(64), "unet_downsample": _size(64),
                "E1": _size(65536, 0), "E2": _size(65536, 0), "T": _size(64, 0),
                "L1": _size(1024, 0), "L2": _size(1024, 0), "U": _size(513, 0),
                "residuals": {  # with ControlNets: [channels, latent downscale] per residual
                    "type": "array", "minItems": 2, "maxItems": 256,
                    "items": {"type": "array", "minItems": 2, "maxItems": 2,
                              "prefixItems": [_size(65536), {"enum": [1, 2, 4, 8, 16, 32, 64]}]},
                },
                "adapter_features": {  # with a T2I-Adapter: [channels, latent downscale] per feature
                    "type": "array", "minItems": 1, "maxItems": 64,
                    "items": {"type": "array", "minItems": 2, "maxItems": 2,
                              "prefixItems": [_size(65536), {"enum": [1, 2, 4, 8, 16, 32, 64]}]},
                },
                "A": {"enum": [1, 3]},
                "adapter_channels": {  # with several T2I-Adapters (specs.MAX_ADAPTERS): each one's image channels
                    "type": "array", "minItems": 2, "maxItems": 4, "items": {"enum": [1, 3]},
                },
                "K": _size(8, 0),  # with union ControlNets: images per call (specs.MAX_UNION_IMAGES)
                "N": _size(64, 0),  # and the control modes they know
                "G": _size(65536, 4),  # a latent consistency model: its guidance embedding's size
                "clip_skip": _size(1023),  # export --clip-skip (below the text encoders' layers, L1/L2's bound)
            },
            "additionalProperties": False,
        },
        "profile": _PROFILE,
        "dtype": {"enum": ["fp32", "fp16"]},
        "tools": {"type": "object", "properties": {"export_memory": _EXPORT_MEMORY}},
        "components": {"type": "object", "minProperties": 1, "additionalProperties": _COMPONENT},
        "files": {"type": "object", "additionalProperties": _SHA256},
        "created": {"type": "string"},
    },
    "additionalProperties": False,
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "type": "object",
    "required": ["_class_name"],
    "properties": {
        "_class_name": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*Scheduler$"},
        "num_train_timesteps": {"type": "integer", "minimum": 1, "maximum": 100_000},
        "prediction_type": {"enum": ["epsilon", "v_prediction", "sample"]},
    },
}
"""What the runtime relies on in ``scheduler/scheduler_config.json`` before diffusers reads it."""


def first_error(schema: dict[str, Any], data: Any) -> str | None:
    """The most relevant violation as ``field.path: message``, or None when ``data`` is valid. An
    ``integer`` is an int here, not JSON Schema's any number with no fraction: a TOML or JSON ``2.0``
    is refused where a count goes, not passed on to fail as a float deep inside the work."""
    import jsonschema

    whole = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=whole)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is None:
        return None
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
    return f"{where}: {message}"
