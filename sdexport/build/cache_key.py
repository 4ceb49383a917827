"""The engine cache key: everything a TensorRT plan depends on, so a stale plan is never reused.

A plan is only valid for the exact ONNX graph it was built from, the optimization profile, the
builder flags, the TensorRT version that serialized it and the GPU it was tuned on. All of these go
into ``EngineKey``; its ``digest()`` names the plan file (``<component>/<digest>.plan``) and the
manifest entry, so "is there an engine for this?" is a dictionary lookup, and ``diff()`` says in
words why an existing engine does not fit (for the build log and the runtime's error message).

Pure Python on purpose: planning a build, and the tests, need neither TensorRT nor a GPU.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from sdexport.build.profiles import ShapeRange

KEY_VERSION = 3
"""Bumped when the meaning of a field changes, so that older plans stop matching. 2: ``fp16`` and
``strongly_typed`` record the builder flag and typing mode actually used, not the ones requested.
3: ``tf32`` (before, polygraphy built every plan without TF32, which the key did not say)."""

DIGEST_LENGTH = 16
"""Hex characters of the sha256 kept in file names: 64 bits, plenty for a handful of plans."""

PLAN_SUFFIX = ".plan"


def onnx_files(files: dict[str, str], onnx_path: str) -> dict[str, str]:
    """The manifest entries (path → sha256) of one graph: every file beside ``onnx_path`` but plans."""
    folder = onnx_path.rsplit("/", 1)[0] + "/" if "/" in onnx_path else ""
    return {
        rel: sha
        for rel, sha in files.items()
        if rel.startswith(folder) and "/" not in rel[len(folder):] and not rel.endswith(PLAN_SUFFIX)
    }


def onnx_sha256(files: dict[str, str], onnx_path: str) -> str:
    """One hash over a component's ONNX graph and its external weights, from the manifest's hashes.

    Covers every listed file in the folder of ``onnx_path`` except plans, so ``model.onnx`` plus
    ``model.onnx.data`` (or one file per weight, as the legacy exporter writes for > 2 GB) all count,
    and a re-export with changed weights changes the key even when ``model.onnx`` itself is equal.
    """
    folder = onnx_path.rsplit("/", 1)[0] + "/" if "/" in onnx_path else ""
    parts = sorted(onnx_files(files, onnx_path).items())
    if onnx_path not in dict(parts):
        raise KeyError(f"{onnx_path} is not listed in the manifest's files")
    if len(parts) == 1:
        return parts[0][1]
    digest = hashlib.sha256()
    for rel, sha in parts:
        digest.update(f"{rel[len(folder):]}\0{sha}\n".encode())
    return digest.hexdigest()


FLAG_LABELS = {
    "fp16": "fp16 builder flag",
    "strongly_typed": "strongly typed",
    "tf32": "TF32",
    "refittable": "refittable",
    "static": "static shapes",
}
"""The key's build flags in words, for the reasons a plan is rebuilt and every listing of a plan."""


@dataclass(frozen=True)
class EngineKey:
    """What one TensorRT plan was built from and for; equal keys mean interchangeable plans."""

    component: str
    onnx_sha256: str
    inputs: tuple[tuple[str, ShapeRange], ...]
    """(input name, (min, opt, max)) in the spec's input order."""
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    """``"8.9"``: plans run only on the architecture they were built for."""
    fp16: bool = True
    """The fp16 builder flag was set (weak typing, TensorRT 10 only)."""
    strongly_typed: bool = False
    """Precisions came from the graph (always on TensorRT 11; for fp16 graphs on 10)."""
    tf32: bool = False
    """fp32 layers may use TF32 (``tensorrt_build.Precision.tf32``)."""
    refittable: bool = False
    optimization_level: int | None = None
    """TensorRT's builder optimization level (0-5); None: TensorRT's default (3)."""
    static: bool = False
    key_version: int = field(default=KEY_VERSION)

    @classmethod
    def create(
        cls,
        component: str,
        onnx_sha256: str,
        ranges: dict[str, ShapeRange],
        *,
        tensorrt_version: str,
        gpu_name: str,
        compute_capability: str,
        fp16: bool = True,
        strongly_typed: bool = False,
        tf32: bool = False,
        refittable: bool = False,
        optimization_level: int | None = None,
        static: bool = False,
    ) -> EngineKey:
        """Build a key from ``profiles.input_ranges`` output (a dict), normalizing shapes to tuples."""
        inputs = tuple(
            (name, (tuple(lo), tuple(opt), tuple(hi))) for name, (lo, opt, hi) in ranges.items()
        )
        return cls(
            component=component,
            onnx_sha256=onnx_sha256,
            inputs=inputs,
            tensorrt_version=tensorrt_version,
            gpu_name=gpu_name,
            compute_capability=compute_capability,
            fp16=fp16,
            strongly_typed=strongly_typed,
            tf32=tf32,
            refittable=refittable,
            optimization_level=optimization_level,
            static=static,
        )

    @property
    def ranges(self) -> dict[str, ShapeRange]:
        return dict(self.inputs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form stored in the manifest (shapes as lists, inputs as an ordered mapping)."""
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["inputs"] = {
            name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in self.inputs
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineKey:
        """Inverse of ``to_dict``; raises KeyError/TypeError/ValueError on a malformed entry."""
        data = dict(data)
        shapes = data.pop("inputs")
        if not isinstance(shapes, dict):  # (a hand edit: .items() was an AttributeError's traceback)
            raise TypeError(f"inputs: expected an object of shapes, got {type(shapes).__name__}")
        inputs = tuple((name, (tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))) for name, s in shapes.items())
        known = {f.name for f in fields(cls)}
        return cls(inputs=inputs, **{k: v for k, v in data.items() if k in known})

    def digest(self) -> str:
        """Short stable hex name: sha256 of the canonical JSON (sorted keys, no whitespace)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_LENGTH]

    @property
    def plan_name(self) -> str:
        """File name of the plan inside the component's folder."""
        return f"{self.digest()}{PLAN_SUFFIX}"

    def platform_reasons(self, tensorrt_version: str, gpu_name: str, compute_capability: str) -> list[str]:
        """Why this engine cannot be loaded on the given platform (empty: it can)."""
        reasons = []
        if self.tensorrt_version != tensorrt_version:
            reasons.append(f"TensorRT version {self.tensorrt_version} != {tensorrt_version}")
        if self.gpu_name != gpu_name:
            reasons.append(f"GPU {self.gpu_name} != {gpu_name}")
        if self.compute_capability != compute_capability:
            reasons.append(f"compute capability {self.compute_capability} != {compute_capability}")
        return reasons

    def build_flags(self) -> list[str]:
        """How the plan was built, in the words every listing of it uses (the build's step line,
        ``inspect``'s table): the flags set, then the optimization level where one was asked."""
        flags = [label for flag, label in FLAG_LABELS.items() if getattr(self, flag)]
        if self.optimization_level is not None:
            flags.append(f"opt level {self.optimization_level}")
        return flags

    def diff(self, other: EngineKey) -> list[str]:
        """Readable reasons why a plan built for ``self`` is not one for ``other`` (empty: same key).

        Values read "self != other": call it on the cached engine's key with the wanted key.
        """
        reasons = []
        if self.key_version != other.key_version:
            reasons.append(f"cache key format {self.key_version} != {other.key_version}")
        if self.component != other.component:
            reasons.append(f"component {self.component} != {other.component}")
        if self.onnx_sha256 != other.onnx_sha256:
            reasons.append(
                f"ONNX graph differs (sha256 {self.onnx_sha256[:12]} != {other.onnx_sha256[:12]}): re-exported"
            )
        reasons += self.platform_reasons(other.tensorrt_version, other.gpu_name, other.compute_capability)
        for flag, label in FLAG_LABELS.items():
            if getattr(self, flag) != getattr(other, flag):
                reasons.append(f"{label} {_on(getattr(self, flag))} != {_on(getattr(other, flag))}")
        if self.optimization_level != other.optimization_level:
            reasons.append(
                f"optimization level {_level(self.optimization_level)} != {_level(other.optimization_level)}"
            )
        mine, theirs = self.ranges, other.ranges
        for name in [*mine, *(n for n in theirs if n not in mine)]:
            if name not in mine or name not in theirs:
                reasons.append(f"input {name} is only in {'the first' if name in mine else 'the second'} key")
                continue
            for label, a, b in zip(("min", "opt", "max"), mine[name], theirs[name]):
                if a != b:
                    reasons.append(f"profile differs for {name} {label}: {list(a)} != {list(b)}")
        return reasons


def _on(value: bool) -> str:
    return "on" if value else "off"


def _level(value: int | None) -> str:
    return "default" if value is None else str(value)
