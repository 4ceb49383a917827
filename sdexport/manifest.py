"""The engine directory's manifest: what was exported, from what, with which tools, and proof.

The manifest is written last and atomically, so a directory that has one is complete. Every artifact
is listed with its sha256; ``load_manifest`` refuses a directory whose files no longer match, before
any engine is loaded. The runtime needs nothing else from the export: component shapes come back from
``sdexport.specs`` by family and name, never from a second copy of them.

An engine directory is a closed world: every path a manifest names is relative, stays inside the
directory (also after following symbolic links) and is hashed. ``load_manifest`` checks this, the
schema (``manifest_schema``) and the files the runtime needs besides graphs (tokenizers, scheduler
config) on every load, so ``inspect``, ``run`` and ``build`` refuse the same directories, up front.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sdexport.atomic import write_atomic
from sdexport.errors import EngineDirError, ProfileError, SdexportError, pasteable
from sdexport.graph_io import GraphIO, check_io, graph_precision, onnx_tensors
from sdexport.manifest_schema import (
    EMBEDDINGS_FORMAT_VERSION,
    FORMAT,
    FORMAT_VERSION,
    FORMAT_VERSIONS,
    SCHEDULER_CONFIG,
    SCHEMA,
    VAE_SCALING_DEFAULT,
    first_error,
    format_version_for,
)
from sdexport.output_dir import MARKER, remove_interrupted_writes, unlisted_files
from sdexport.shapes import ShapeProfile, axis_option
from sdexport.specs import (
    ADAPTER,
    MAX_ADAPTERS,
    ComponentSpec,
    ModelDims,
    adapter_names,
    check_clip_skip,
    component,
    components_for,
    controlnets_among,
    is_dynamic,
    resolve_dim,
    text_encoders,
    tokenizer_names,
)

MANIFEST_NAME = "manifest.json"
SCHEDULER_CONFIG_FILE = "scheduler/scheduler_config.json"
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
"""A CLIP tokenizer loads from either set (transformers 5 writes the first, 4.x the second)."""


@dataclass
class ComponentEntry:
    onnx: str
    """Path of model.onnx relative to the engine directory."""
    dtype: str
    parity: dict[str, Any]
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    """TensorRT plans by cache key: {"path", "key": {...}, "build_seconds"}."""
    optimized: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Graphs rewritten for one runtime, by build target (``onnxruntime-cuda``): {"onnx", "dtype",
    "source_sha256", "fusions", "parity", ...}. Beside the portable graph, never instead of it."""

    @property
    def config_file(self) -> str:
        """The diffusers/transformers ``config.json`` the export wrote beside the graph, relative to
        the engine directory (a key of ``Manifest.files`` where listed): what the loop reads of the
        component whatever runs it (a ControlNet's pooling, the U-Net's blocks, the text encoder's layers)."""
        return (PurePosixPath(self.onnx).parent / "config.json").as_posix()


@dataclass
class Manifest:
    family: str
    model: dict[str, Any]
    """label, source, random_weights"""
    prediction_type: str
    vae_scaling_factor: float
    dims: dict[str, Any]
    """``ModelDims.record()``: sizes, ``residuals`` (pairs) with ControlNets, ``adapter_features``
    (pairs) and ``A`` with a T2I-Adapter, ``K`` and ``N`` with union ControlNets."""
    profile: dict[str, list[int]]
    dtype: str
    tools: dict[str, Any]
    components: dict[str, ComponentEntry]
    files: dict[str, str]
    """Every artifact (relative path) → sha256."""
    created: str
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def shape_profile(self) -> ShapeProfile:
        return ShapeProfile.from_dict(self.profile)

    @property
    def model_dims(self) -> ModelDims:
        return ModelDims(**self.dims)

    @property
    def random_weights(self) -> bool:
        return bool(self.model.get("random_weights"))

    @property
    def controlnets(self) -> list[str]:
        """The ControlNet components, in the order their control images are given."""
        return controlnets_among(self.components)

    @property
    def adapter(self) -> bool:
        """Whether the directory has a T2I-Adapter (its U-Net then takes the adapter's features)."""
        return bool(self.model_dims.adapter_features)

    @property
    def adapters(self) -> list[str]:
        """The T2I-Adapter components the U-Net's features come from, in the order their images are
        given (``dims.adapter_channels`` counts several; empty without an adapter)."""
        count = len(self.model_dims.adapter_image_channels) or (1 if ADAPTER in self.components else 0)
        return adapter_names(count)

    def component_specs(self) -> tuple[ComponentSpec, ...]:
        """Every component this family may have, with as many ControlNets and T2I-Adapters as this
        directory has."""
        return components_for(self.family, len(self.controlnets), len(self.adapters))

    def spec(self, name: str) -> ComponentSpec:
        """Component ``name``'s spec, expanded for this model (SDXL's per-layer hidden states)."""
        return component(self.family, name).for_model(self.model_dims)

    @property
    def adopted(self) -> bool:
        """Another tool's ONNX export given this manifest by ``sdexport adopt`` (its graphs are not
        sdexport's to export again)."""
        return adopted_record(self.model)

    def built_files(self) -> set[str]:
        """The listed files ``sdexport build`` added (``built_files``)."""
        return built_files(self.files, {name: {"engines": e.engines, "optimized": e.optimized}
                                        for name, e in self.components.items()})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for entry in data["components"].values():
            if not entry["optimized"]:  # absent unless built: older sdexport reads such manifests
                del entry["optimized"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["components"] = {k: ComponentEntry(**v) for k, v in data["components"].items()}
        return cls(**data)


def select_specs(manifest: Manifest, names: list[str] | None) -> list[ComponentSpec]:
    """The specs of the directory's components in call order, or of ``names`` among them (``--components``
    of the builds); an unknown or unexported name is refused with one line."""
    specs = [manifest.spec(s.name) for s in manifest.component_specs() if s.name in manifest.components]
    if not names:
        return specs
    known = [s.name for s in specs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SdexportError(
            f"unknown or unexported component(s) {', '.join(unknown)}; this directory has {', '.join(known)}"
        )
    return [s for s in specs if s.name in names]


def sha256_file(path: Path, chunk: int = 16 * 1024**2) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path, exclude: tuple[str, ...] = (MANIFEST_NAME, MARKER)) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in exclude
    }


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def save_manifest(directory: Path, manifest: Manifest) -> None:
    """Write the manifest, refusing one that ``load_manifest`` would refuse (so an export never ends
    in a directory that cannot be used: the writer obeys the reader's schema)."""
    try:
        text = json.dumps(manifest.to_dict(), indent=2, allow_nan=False)  # strict_json refuses NaN/Infinity
    except ValueError as exc:
        raise EngineDirError(f"{directory}: refusing to write an invalid manifest: {exc}") from None
    problem = first_error(SCHEMA, json.loads(text))
    if problem:
        raise EngineDirError(f"{directory}: refusing to write an invalid manifest: {problem}")
    write_atomic(directory / MANIFEST_NAME, text + "\n")


def load_manifest(directory: Path, *, verify_files: bool = True) -> Manifest:
    """Read and check an engine directory.

    Schema, paths and required files are checked on every call (cheap); hashes only with
    ``verify_files`` (from the hash records where a file has not changed). The runtime checks the
    files it will read itself (``loading``), the TensorRT plan it picks among several.
    """
    if not directory.is_dir():
        if directory.exists():
            above = _engine_dir_above(directory)
            hint = (f" (the folder that holds it is {directory.parent})" if directory.name == MANIFEST_NAME
                    else f" (it lies in the engine directory {above})" if above else "")
            raise EngineDirError(f"{directory} is a file, not an engine directory{hint}")
        from sdexport.output_dir import writer_of

        writer = writer_of(directory)  # (an export's first minutes: it was "no such engine directory", an audit)
        if writer is not None:
            raise EngineDirError(f"{directory}: not there yet: another sdexport process (pid {writer}) is writing it; "
                                 "wait for it to finish")
        raise EngineDirError(f"{directory}: no such engine directory")
    path = directory / MANIFEST_NAME
    if (path.exists() or path.is_symlink()) and not path.is_file():  # adopt calls it a manifest: no circle
        raise EngineDirError(f"{path} is not a file (a folder, or a link to nothing?): an engine directory's "
                             "manifest is a JSON file; move it aside, then export again or adopt the directory")
    if not path.is_file():
        from sdexport.export.adopt import adoption_hint

        above = _engine_dir_above(directory)
        if above:
            raise EngineDirError(f"{directory}: a folder inside the engine directory {above}; give that directory")
        hint = adoption_hint(directory) or " (run `sdexport export` again)"
        raise EngineDirError(
            f"{directory}: no {MANIFEST_NAME}; not an sdexport engine directory, or its export did not finish{hint}"
        )
    _require_inside(directory, MANIFEST_NAME)
    try:
        data = strict_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EngineDirError(f"{path}: damaged manifest, not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        foreign = ""
        if not is_sdexport_manifest(data):  # another tool's manifest.json
            from sdexport.export.adopt import identify

            if identify(directory) == "onnx":  # (adopt refuses to write over it: say the way round)
                foreign = ("; the folder is an ONNX export of a diffusers pipeline: move that file out of it and "
                           f"adopt it with `sdexport adopt {pasteable(directory)}`")
        raise EngineDirError(f"{path}: not an sdexport manifest (format {found!r}){foreign}")
    if data.get("format_version") not in FORMAT_VERSIONS:
        raise EngineDirError(_format_refusal(directory, data))
    problem = first_error(SCHEMA, data)
    if problem:
        raise EngineDirError(f"{path}: invalid manifest: {problem}{_newer_hint(problem)}")
    manifest = Manifest.from_dict(data)
    check_layout(directory, manifest)
    if verify_files:
        verify_files_of(directory, manifest)
    return manifest


NEWER_HINT = " (a field of a newer sdexport? upgrade sdexport, or export the model again with this one)"
"""What a refusal of an unknown key, family or component adds: new features come as new keys of
format 2 (prompt chunks, clip skip, a VAE encoder came so), which an older sdexport refuses; said
only as invalid, a user re-exported where upgrading was the way (an audit)."""


def _newer_hint(problem: str) -> str:
    """``NEWER_HINT`` where the schema's refusal is of something a newer sdexport may write."""
    newer = ("Additional properties are not allowed" in problem
             or problem.startswith("family:") and "is not one of" in problem)
    return NEWER_HINT if newer else ""


def _engine_dir_above(path: Path) -> Path | None:
    """The engine directory holding ``path`` (a component's folder or file: ``unet``, ``unet/model.onnx``),
    as ``output_dir.engine_dir_above`` finds it, named relative where ``path`` was given so; None elsewhere."""
    from sdexport.output_dir import engine_dir_above

    above = engine_dir_above(path)
    return above if above is None or path.is_absolute() else Path(os.path.relpath(above))


def _format_refusal(directory: Path, data: dict[str, Any]) -> str:
    """One line for a manifest of another format version, with the command that re-exports it."""
    found = data.get("format_version")
    where = directory / MANIFEST_NAME
    whole = found if isinstance(found, int) and not isinstance(found, bool) else None  # (JSON's true is no 1)
    if whole == 1:
        return (f"{where}: written by an older sdexport (format 1), whose graphs use tensor names optimum and "
                f"this sdexport do not (VAE latent/image, SDXL's text encoders); re-export it: "
                f"{reexport_command(directory, data)}")
    if whole is not None and whole > max(FORMAT_VERSIONS):
        return (f"{where}: manifest format {found}, written by a newer sdexport than this one (which reads "
                f"{' or '.join(map(str, FORMAT_VERSIONS))}); upgrade sdexport to use it")
    return (f"{where}: manifest format {found!r} is not supported by this sdexport (expects "
            f"{' or '.join(map(str, FORMAT_VERSIONS))}); re-export")


def reexport_command(directory: Path, data: dict[str, Any]) -> str:
    """The ``sdexport export`` command that writes ``directory`` again, from what its manifest recorded
    (the source argument, dtype, profile and components), replacing it (``--force``: it is ours)."""
    import shlex

    def part(parent: dict[str, Any], key: str) -> dict[str, Any]:
        value = parent.get(key)
        return value if isinstance(value, dict) else {}

    source = part(part(data, "model"), "source")
    # a file or folder by its absolute path (the argument as typed, ./mymodel, failed pasted from
    # elsewhere, an audit), a preset by its name
    local = source.get("kind") in ("diffusers", "single_file") and source.get("path")
    argument = local or source.get("argument") or source.get("name") or source.get("path") or "<model>"
    words = ["sdexport", "export", str(argument), "-o", str(directory), "--force"]
    if data.get("dtype") in ("fp16", "fp32"):
        words += ["--dtype", str(data["dtype"])]
    profile = part(data, "profile")
    for axis in ("batch", "height", "width"):
        value = profile.get(axis)
        if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) for v in value):
            words += [f"--{axis}", ":".join(str(v) for v in value)]
    if isinstance(source.get("config"), str):
        words += ["--config", source["config"]]
    if isinstance(source.get("vae"), str):
        words += ["--vae", source["vae"]]
    seed = source.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and seed:
        words += ["--seed", str(seed)]
    components = data.get("components")
    if isinstance(components, dict) and components:
        words += ["--components", ",".join(str(c) for c in components)]
    return shlex.join(words)


CONFIG_MOST_BYTES = 1 << 20
"""A component's config.json is a few KB; a larger file is read by the file checks, not here."""


def _listed_config(directory: Path, manifest: Manifest, name: str) -> dict[str, Any]:
    """A component's ``config.json``, where it is the file the manifest lists (else empty: the file
    check then names it, where an edited config was blamed on the manifest, an audit)."""
    entry = manifest.components.get(name)
    if entry is None:
        return {}
    rel = entry.config_file
    try:  # (a pipe or /dev/zero there hung or filled memory before the file checks named it: a review)
        _require_inside(directory, rel)
        info = os.stat(directory / rel)
        if not stat.S_ISREG(info.st_mode) or info.st_size > CONFIG_MOST_BYTES:
            return {}
        data = (directory / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest.files.get(rel):
            return {}
        config = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, EngineDirError):
        return {}
    return config if isinstance(config, dict) else {}


def _text_encoder_layers(directory: Path, manifest: Manifest) -> list[int]:
    """SD's text encoder's layers, from its ``config.json`` (what a built-in clip skip must stay
    below): none where unreadable or not the listed file."""
    if not manifest.model_dims.clip_skip:
        return []
    layers = _listed_config(directory, manifest, "text_encoder").get("num_hidden_layers")
    return [layers] if isinstance(layers, int) and not isinstance(layers, bool) else []


def _check_vae_scaling(where: Path, directory: Path, manifest: Manifest) -> None:
    """The manifest's ``vae_scaling_factor`` (what the loop scales latents by) is the VAE config's:
    an edited one decoded with its own value, unsaid, where diffusers and optimum read the config
    and draw another image from the same directory (an audit)."""
    config = _listed_config(directory, manifest, "vae_decoder")
    found = config.get("scaling_factor", VAE_SCALING_DEFAULT) if config else None
    if (isinstance(found, int | float) and not isinstance(found, bool)
            and not math.isclose(found, manifest.vae_scaling_factor, rel_tol=1e-6)):
        raise EngineDirError(f"{where}: invalid manifest: vae_scaling_factor {manifest.vae_scaling_factor:g}, but "
                             f"vae_decoder/config.json's scaling_factor is {found:g}; the manifest does not describe "
                             "this VAE")


def check_layout(directory: Path, manifest: Manifest) -> None:
    """What the schema cannot say: ranges in order, the family's components, a closed set of paths,
    and the tokenizer and scheduler files the runtime needs besides the graphs."""
    where = directory / MANIFEST_NAME
    for label, profile in [("profile", manifest.profile)] + [
        (f"components.{name}.engines.{key}.profile", e["profile"])
        for name, entry in manifest.components.items() for key, e in entry.engines.items() if "profile" in e
    ]:
        for axis, (lo, opt, hi) in profile.items():
            if not lo <= opt <= hi:
                raise EngineDirError(f"{where}: invalid manifest: {label}.{axis} {[lo, opt, hi]} is not min <= opt <= max")
    try:
        manifest.shape_profile.validate(manifest.model_dims)
    except ProfileError as exc:
        raise EngineDirError(f"{where}: invalid manifest: profile {exc}") from None
    # the layer counts the family's text encoders output one hidden state per (SDXL's L1 and L2)
    layers = [t.repeat for name in text_encoders(manifest.family) for t in component(manifest.family, name).outputs
              if t.repeat]
    if layers and min(manifest.dims.get(name, 0) for name in layers) < 1:
        raise EngineDirError(f"{where}: invalid manifest: dims.{' and dims.'.join(layers)} (the text encoders' "
                             f"layers) must be at least 1 for {manifest.family}")
    if manifest.format_version != format_version_for(manifest.model):
        raise EngineDirError(f"{where}: invalid manifest: format {EMBEDDINGS_FORMAT_VERSION} goes with "
                             "model.embeddings (textual inversion), and only with them")
    try:
        check_clip_skip(f"{where}: invalid manifest: dims.clip_skip", manifest.model_dims.clip_skip,
                        [manifest.dims[name] for name in layers] or _text_encoder_layers(directory, manifest))
    except SdexportError as exc:
        raise EngineDirError(str(exc)) from None
    _check_vae_scaling(where, directory, manifest)
    known = [s.name for s in manifest.component_specs()]
    unknown = [n for n in manifest.components if n not in known]
    if unknown:
        raise EngineDirError(
            f"{where}: invalid manifest: component(s) {', '.join(unknown)} do not exist in the "
            f"{manifest.family} family ({', '.join(known)}){NEWER_HINT}"
        )
    if manifest.controlnets and not manifest.model_dims.residuals:
        raise EngineDirError(f"{where}: invalid manifest: ControlNet components but no dims.residuals (their "
                             "outputs' channels and sizes)")
    dims = manifest.model_dims
    if (ADAPTER in manifest.components or dims.adapter_features) and not (dims.adapter_features and dims.A):
        raise EngineDirError(f"{where}: invalid manifest: a T2I-Adapter needs both dims.adapter_features (its "
                             "features' channels and sizes) and dims.A (its image's channels)")
    if bool(dims.K) != bool(dims.N) or (dims.N and not dims.residuals) or dims.K > max(dims.N, 1):
        raise EngineDirError(f"{where}: invalid manifest: union ControlNets need dims.residuals, dims.N (their "
                             f"control modes) and dims.K (images per call, 1 to N); it has K {dims.K}, N {dims.N}")
    if dims.adapter_channels and not (2 <= len(dims.adapter_channels) <= MAX_ADAPTERS
                                      and dims.adapter_channels[0] == dims.A
                                      and set(dims.adapter_channels) <= {1, 3}):
        raise EngineDirError(f"{where}: invalid manifest: dims.adapter_channels {list(dims.adapter_channels)} should "
                             f"give each of 2 to {MAX_ADAPTERS} T2I-Adapters' image channels (1 or 3), the first "
                             f"dims.A ({dims.A})")
    if dims.adapter_features and dims.residuals:
        raise EngineDirError(f"{where}: invalid manifest: dims.residuals and dims.adapter_features (ControlNets "
                             "and a T2I-Adapter): sdexport runs one kind")
    missing = [n for n in manifest.adapters if n not in manifest.components]
    if "unet" in manifest.components and missing:
        raise EngineDirError(f"{where}: invalid manifest: its U-Net takes the features of {len(manifest.adapters)} "
                             f"T2I-Adapter(s) ({'dims.adapter_channels' if dims.adapter_channels else 'dims.adapter_features'}"
                             f"), but components has no {', '.join(missing)}")
    for rel in manifest.files:
        _require_inside(directory, rel)
    referenced = [(f"components.{n}.onnx", e.onnx) for n, e in manifest.components.items()] + [
        (f"components.{n}.engines.{k}.path", str(plan["path"]))
        for n, e in manifest.components.items() for k, plan in e.engines.items()
    ] + [
        (f"components.{n}.optimized.{t}.onnx", str(o["onnx"]))
        for n, e in manifest.components.items() for t, o in e.optimized.items()
    ]
    for label, rel in referenced:
        _require_inside(directory, rel)
        if rel not in manifest.files:
            raise EngineDirError(f"{where}: invalid manifest: {label} {rel!r} is not among the hashed files")
    for name in tokenizer_names(manifest.family):
        present = {rel.split("/", 1)[1] for rel in manifest.files if rel.startswith(f"{name}/")}
        if not any(set(needed) <= present for needed in TOKENIZER_FILE_SETS):
            raise EngineDirError(
                f"{directory}: {name}/ lacks its tokenizer files (tokenizer.json, or vocab.json and "
                "merges.txt); re-export"
            )
    if SCHEDULER_CONFIG_FILE not in manifest.files:
        raise EngineDirError(f"{directory}: {SCHEDULER_CONFIG_FILE} is not listed in the manifest; re-export")


def strict_json(text: str, *, infinity: bool = False) -> Any:
    """``json.loads`` for files sdexport wrote: NaN and Infinity (which Python's json accepts but JSON
    does not have) and nesting deep enough to exhaust the stack are errors (ValueError), not values.
    ``infinity``: ``Infinity`` and ``-Infinity`` are floats (diffusers writes them in scheduler configs:
    DPMSolverMultistepScheduler's ``lambda_min_clipped`` defaults to -inf); NaN stays an error."""

    def no_constants(name: str) -> Any:
        if infinity and name in ("Infinity", "-Infinity"):
            return float(name.replace("Infinity", "inf"))
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=no_constants)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_scheduler_config(directory: Path, manifest: Manifest | None = None) -> dict[str, Any]:
    """The saved scheduler config, refused with one line when it is missing, not JSON or not a scheduler's.
    With the directory's ``manifest``, its hash is checked first (a few hundred bytes): an edited
    config is named as changed, not judged (an unknown scheduler class) with advice that cannot help."""
    path = directory / SCHEDULER_CONFIG_FILE
    _require_inside(directory, SCHEDULER_CONFIG_FILE)
    if manifest is not None and SCHEDULER_CONFIG_FILE in manifest.files:
        check_files(directory, {SCHEDULER_CONFIG_FILE: manifest.files[SCHEDULER_CONFIG_FILE]},
                    adopted=manifest.adopted)
    try:
        config = strict_json(path.read_text(encoding="utf-8"), infinity=True)  # as diffusers saves it
    except FileNotFoundError:
        raise EngineDirError(f"{path}: missing; re-export") from None
    except ValueError as exc:
        raise EngineDirError(f"{path}: not valid JSON ({exc})") from None
    problem = first_error(SCHEDULER_CONFIG, config)
    if problem:
        raise EngineDirError(f"{path}: not a usable scheduler config: {problem}")
    return dict(config)


def _require_inside(directory: Path, rel: str) -> None:
    """``rel`` is a plain relative path whose target (links followed) stays inside ``directory``."""
    parts = rel.split("/")
    if (
        rel.startswith("/") or "\\" in rel or "\0" in rel or ":" in parts[0]
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise EngineDirError(
            f"{directory}: the manifest names {rel!r}, which is not a plain path inside the engine "
            "directory; refusing to read it"
        )
    try:
        root, target = directory.resolve(), (directory / rel).resolve()
    except (RuntimeError, OSError) as exc:  # a symbolic-link loop
        raise EngineDirError(f"{directory}: cannot resolve {rel} ({exc}); refusing to read it") from None
    if not target.is_relative_to(root):
        # (a Hugging Face cache's snapshot is links into its blobs/ folder: said how to make it a folder)
        copy = (f"; copy it with its links followed (cp -rL {pasteable(directory)} DIR, or snapshot_download(..., "
                "local_dir=DIR)) and use the copy" if target.parent.name == "blobs" else "")
        raise EngineDirError(
            f"{directory}: {rel} leads outside the engine directory (to {target}); refusing to read it{copy}"
        )


def built_files(files: Mapping[str, Any], components: Mapping[str, Any]) -> set[str]:
    """Of a manifest's listed ``files``, those ``sdexport build`` added: each component's TensorRT
    plans (``engines``) and the files of its rewritten graphs (``optimized``: ``COMPONENT/TARGET/``),
    what a build stopped between its manifest and its files lists and lacks. Over the manifest's JSON
    form, so that ``adopt --force`` reads them from a manifest it will replace, as it is."""
    plans = {str(p["path"]) for c in components.values() for p in c.get("engines", {}).values()}
    folders = tuple(f"{name}/{target}/" for name, c in components.items() for target in c.get("optimized", {}))
    return {str(rel) for rel in files if rel in plans or str(rel).startswith(folders)}


def verify_files_of(directory: Path, manifest: Manifest, *, rehash: bool = False) -> FilesChecked:
    """Check every file the manifest lists against its hash (``inspect``'s check: TensorRT plans for
    other GPUs too); ``rehash`` (``--verify``): read each again even where a hash record vouches for it."""
    return check_files(directory, dict(manifest.files), rehash=rehash, built=manifest.built_files(),
                       adopted=manifest.adopted)


@dataclass
class FilesChecked:
    """What ``check_files`` did: files hashed now, and files trusted from an earlier hash's record."""

    hashed: int = 0
    trusted: int = 0


def check_files(directory: Path, files: dict[str, str], *, rehash: bool = False,
                built: Collection[str] = (), adopted: bool = False) -> FilesChecked:
    """Every listed file exists and has its recorded sha256, else one error naming the file.

    A file hashed before and unchanged since (``sdexport.hash_records``) is not read again, unless
    ``rehash``; every hash made here renews its record. ``built``: files a build added
    (``Manifest.built_files``): one missing is most likely a build stopped part-way, and building
    again mends it (an error that said only "missing" left the user to guess). ``adopted``
    (``Manifest.adopted``): a changed file the build did not add is another tool's, which sdexport
    cannot export again: adopting the folder again is what mends it.
    """
    from sdexport.hash_records import HashRecords

    records = HashRecords.of(directory)
    done = FilesChecked()
    try:
        for rel, expected in files.items():
            file = directory / rel
            if not file.is_file():
                records.forget(rel)
                again = " (a build stopped part-way? run `sdexport build` again)" if rel in built else ""
                raise EngineDirError(f"{directory}: {rel} is listed in the manifest but missing{again}")
            digest, trusted = records.sha256(rel, file, expected, rehash=rehash)
            if digest != expected:
                if adopted and rel not in built:
                    raise EngineDirError(
                        f"{directory}: {rel} does not match its sha256 in the manifest (damaged, or replaced since "
                        "`sdexport adopt`); where the other tool exported it again, adopt the folder again: "
                        f"sdexport adopt --force {pasteable(directory)}"
                    )
                raise EngineDirError(
                    f"{directory}: {rel} does not match its sha256 in the manifest (damaged or replaced); "
                    "re-export or rebuild it"
                )
            if trusted:
                done.trusted += 1
            else:
                done.hashed += 1
    finally:
        records.save()
    return done


def _listed(files: Iterable[str]) -> set[str]:
    """What an engine directory holds as sdexport's: the files its manifest lists, the manifest, and a
    staging marker a kill right after a job's rename left."""
    return {*files, MANIFEST_NAME, MARKER}


def remove_leftovers(directory: Path, manifest: Manifest) -> None:
    """What writes killed mid-way left beside the directory's listed files (``remove_interrupted_writes``):
    for a build, which holds the directory's lock."""
    remove_interrupted_writes(directory, _listed(manifest.files))


def not_an_engine_dir(directory: Path) -> str | None:
    """Why ``directory`` is not (entirely) an engine directory sdexport wrote; None when it is.

    The proof ``--force`` needs before replacing it: our manifest, and no file or folder that the
    manifest does not list (temporary files of interrupted writes of listed files aside).
    """
    path = directory / MANIFEST_NAME
    if not path.is_file() or path.is_symlink():
        return f"it has no {MANIFEST_NAME}"
    try:
        data = strict_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"its {MANIFEST_NAME} is not readable JSON"
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        return f"its {MANIFEST_NAME} is not an sdexport manifest"
    if adopted_record(data.get("model")):
        return "it is another tool's ONNX export that `sdexport adopt` gave a manifest: its files are not sdexport's"
    extra = unlisted_files(directory, _listed(data["files"]))
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        return f"it holds files its manifest does not list: {', '.join(extra[:3])}{more}"
    return None


def short_weight_files(graph: Any, folder: Path) -> list[str]:
    """The external weight files of ``graph`` (beside it in ``folder``) that end before the weights
    it reads from them: a copy or download cut short, which a hash made of that copy does not
    catch (``adopt`` hashes what it finds) and ONNX Runtime meets only when a run loads it. Each
    as "NAME (N bytes, the weights need M)"; a missing file is the caller's to name."""
    from onnx.helper import tensor_dtype_to_np_dtype

    needed: dict[str, int] = {}
    for init in graph.initializer:
        data = {e.key: e.value for e in init.external_data}
        if "location" not in data:
            continue
        try:
            length = int(data["length"]) if "length" in data else (
                tensor_dtype_to_np_dtype(init.data_type).itemsize * math.prod(init.dims))
            end = int(data.get("offset", 0)) + length
        except (ValueError, TypeError, KeyError):
            continue  # (an entry onnx itself would refuse: its own error says so)
        needed[data["location"]] = max(needed.get(data["location"], 0), end)
    short = []
    for location, end in needed.items():
        try:
            size = (folder / location).stat().st_size
        except OSError:
            continue
        if size < end:
            short.append(f"{location} ({size:,} bytes, the weights need {end:,})")
    return short


def _weights_linked_away(graph_path: Path, graph: Any) -> tuple[str, Path] | None:
    """The first external weight file of ``graph`` that resolves outside the graph's folder (a link
    into git-annex's or a deduplicating store's objects) and where it leads; ONNX Runtime refuses it
    ("External data path escapes model directory") where TensorRT would read it. Either folder counts,
    the graph's as named and where the graph file itself resolves: ONNX Runtime (1.32) loads a graph
    and its weights both linked into one store folder."""
    homes = (graph_path.parent.resolve(), graph_path.resolve().parent)
    for init in graph.initializer:
        location = next((e.value for e in init.external_data if e.key == "location"), None)
        if location is None:
            continue
        real = (graph_path.parent / location).resolve()
        if not any(real.is_relative_to(home) for home in homes):
            return location, real
    return None


def adopted_record(model: object) -> bool:
    """Whether a manifest's ``model`` record (as read, unchecked) is an adopted export's: another
    tool's ONNX graphs (``source.kind`` onnx), or ones proven against a model (``adopted_from``)."""
    source = model.get("source") if isinstance(model, dict) else None
    return isinstance(source, dict) and (source.get("kind") == "onnx" or "adopted_from" in source)


def is_sdexport_manifest(data: object) -> bool:
    """Whether a manifest.json's content is sdexport's, of this format or an older one (whose
    ``format`` was its number), rather than another tool's file of that name."""
    found = data.get("format") if isinstance(data, dict) else None
    return found == FORMAT or (isinstance(found, int) and not isinstance(found, bool))


def _weightless_graph(directory: Path, rel: str) -> Any:
    """The graph at ``rel``, parsed without its external weights."""
    import onnx

    from sdexport.errors import one_line

    try:
        return onnx.load(str(directory / rel), load_external_data=False).graph
    except Exception as exc:  # protobuf decode errors, truncated files
        raise EngineDirError(f"{directory}: {rel} is not a readable ONNX graph ({one_line(exc, 200)})") from None


def _check_weight_files(directory: Path, manifest: Manifest, rel: str, graph: Any) -> None:
    """Every external weight file the graph at ``rel`` refers to is a file the manifest lists beside
    it, not a link out of its folder, and whole."""
    folder = rel.rsplit("/", 1)[0]
    for init in graph.initializer:
        location = next((e.value for e in init.external_data if e.key == "location"), None)
        if location is not None and f"{folder}/{location}" not in manifest.files:
            raise EngineDirError(
                f"{directory}: {rel}: weight {init.name!r} refers to {location!r}, which is not a file the "
                "manifest lists beside the graph; refusing to read it"
            )
    outside = _weights_linked_away(directory / rel, graph)
    if outside:
        raise EngineDirError(
            f"{directory}: {rel}: its weight file {outside[0]} is a link to {outside[1]}, outside the graph's "
            "folder, which ONNX Runtime refuses to read; put the file itself in the folder"
        )
    short = short_weight_files(graph, directory / folder)
    if short:
        raise EngineDirError(f"{directory}: {rel}: its weight file {short[0]} is cut short; copy it again, or "
                             "re-export")


def check_weight_files_once(directory: Path, manifest: Manifest, rels: Iterable[str]) -> None:
    """``_check_weight_files`` for the graphs a run reads (ONNX Runtime's, a run-time LoRA's), once
    per unchanged graph and file list (``hash_records``): a run only hashed them, and a graph's
    external weights named '../../elsewhere' or a link out of its folder were read wherever they
    pointed by the ONNX Runtime and onnx versions sdexport allows (1.19; onnx 1.14), where inspect
    and build refused them (an audit)."""
    from sdexport.hash_records import HashRecords, identity

    records = HashRecords.of(directory)
    listed = hashlib.sha256(json.dumps(sorted(manifest.files.items())).encode()).hexdigest()
    for rel in dict.fromkeys(rels):
        try:  # (the file as it is: a graph edited since the pass, unhashed by a caller, is checked again)
            now = identity(os.stat(directory / rel))
        except OSError:
            continue  # (missing: the engine's own load names it)
        check, key = f"weight-files:{rel}", f"{manifest.files.get(rel)}:{listed}:{now}"
        if records.passed(check, key):
            continue
        if _names_external_data(directory / rel):  # (else none to check: no parse of GBs of weights)
            _check_weight_files(directory, manifest, rel, _weightless_graph(directory, rel))
        records.note_passed(check, key)
    records.save()


def _names_external_data(path: Path) -> bool:
    """Whether the graph file can refer to external weights: each reference holds the key
    "location", so a file without those bytes has none (sdexport's own graphs under 2 GB keep their
    weights inside: parsing one took twice its size in memory, a review). A weight's bytes that
    happen to spell it only cost the parse."""
    import mmap

    try:
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return False
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return mapped.find(b"location") != -1
    except (OSError, ValueError):
        return True  # (not mappable: parsed, which names what is wrong)


def check_graph(directory: Path, manifest: Manifest, name: str, profile: ShapeProfile | None = None) -> GraphIO:
    """Component ``name``'s ONNX graph is the spec's and stays inside the directory; how its I/O is fed.

    Parsed without its weights. A hash only proves that a graph is the one the manifest lists; this
    proves that it is a graph of the right component: its inputs and outputs are the spec's (names,
    dtypes and ranks: ``graph_io.check_io``), its fixed sizes are the manifest's ``dims``, a size it
    fixes on an axis the spec leaves dynamic is what every call of ``profile`` gives there
    (default: the manifest's; a build's own, narrower), and every
    external weight file it refers to is a file the manifest lists beside it (TensorRT's parser,
    unlike ONNX Runtime, follows such references wherever they point) and is not a link out of the
    graph's folder (ONNX Runtime refuses those).
    """
    rel = manifest.components[name].onnx
    graph = _weightless_graph(directory, rel)
    _check_weight_files(directory, manifest, rel, graph)
    spec = manifest.spec(name)
    precision = graph_precision(graph)
    if precision != manifest.components[name].dtype:  # what the builds act on (TensorRT's typing, the fusions)
        raise EngineDirError(f"{directory}: {rel}: its weights are {precision}, but the manifest's "
                             f"components.{name}.dtype is {manifest.components[name].dtype}; the manifest "
                             "does not describe this graph")
    weights = {init.name for init in graph.initializer}
    inputs = [v for v in graph.input if v.name not in weights]
    io = check_io(spec, onnx_tensors(inputs), onnx_tensors(graph.output), f"{directory}: {rel}",
                  manifest.model_dims.sizes(1, 0, 0))
    corners = (profile or manifest.shape_profile).corners(spec, manifest.model_dims)
    for value in [*inputs, *graph.output]:
        declared = spec.tensor(value.name).dims
        shape = value.type.tensor_type.shape.dim
        params = [d.dim_param if d.HasField("dim_param") else None for d in shape]
        for symbol, param in zip(declared, params):  # check_io checked the ranks and fixed sizes
            if "/" in symbol and param and "/" in param and param != symbol:  # sdexport's own divided sides
                raise EngineDirError(
                    f"{directory}: {rel}: {value.name} has a side {param} where the manifest's dims."
                    f"{'adapter_features' if 'adapter' in value.name or 'intrablock' in value.name else 'residuals'} give "
                    f"{symbol}; the manifest does not describe this graph"
                )
        fixed = [d.dim_value if d.HasField("dim_value") else None for d in shape]
        for symbol, size in zip(declared, fixed):
            if size is not None and is_dynamic(symbol):
                _check_fixed_axis(f"{directory}: {rel}", value.name, symbol, size, corners, spec.cfg_batch)
    return io


_SYMBOL_AXES = {"B": ("batch", "its batch"), "H": ("height", "its height"), "h": ("height", "its height"),
                "W": ("width", "its width"), "w": ("width", "its width"), "X": ("chunks", "its text length")}
"""The profile axis each dynamic symbol follows (``specs.DYNAMIC_SYMBOLS``), and how a refusal names it."""


def _check_fixed_axis(where: str, tensor: str, symbol: str, size: int, corners: list[dict[str, int]],
                      cfg_batch: bool) -> None:
    """A size the graph fixes where the spec's axis is dynamic (a tracer specialised it, or another
    exporter fixed it: a U-Net's text length at 77) must be what every call of the profile gives
    there, else the engines fail at the first call of another size, long after the directory loaded.

    A component that runs twice the images under CFG (``cfg_batch``) is held to its CFG calls (the
    opt and max corners): a U-Net fixed at batch 2 serves one image with guidance, as other
    exporters' static U-Nets do, and fails only a call without guidance, at the engine."""
    from sdexport.setting_names import option

    axis, named = _SYMBOL_AXES[symbol.split("/", 1)[0]]
    under_cfg = axis == "batch" and cfg_batch
    given = sorted({resolve_dim(symbol, corner) for corner in (corners[1:] if under_cfg else corners)})
    if given != [size]:
        calls = f"{given[0]} to {given[-1]}" if len(given) > 1 else f"{given[0]}"
        if under_cfg and size % 2:  # (a static text encoder at 1: no --batch makes it fit)
            otherwise = (f"under CFG the negatives and the prompts go in one call of twice the images, which "
                         f"a graph fixed at {size} cannot take")
        else:
            otherwise = "or narrow " + (f"{option('--batch')} to half of it: twice the images run under CFG"
                                        if under_cfg else f"{option(axis_option(axis))} to what it takes")
        raise ProfileError(
            f"{where}: {tensor} fixes {named} ({symbol}) at {size}, but the profile's calls "
            f"{'under CFG ' if under_cfg else ''}give {calls}; export the graph with that axis dynamic "
            f"({otherwise})"
        )
