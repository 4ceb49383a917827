"""ONNX → ONNX Runtime CUDA graphs: onnxruntime's own Stable Diffusion fusions, beside the portable graph.

``sdexport build --target onnxruntime-cuda`` runs onnxruntime's transformer optimizer
(``onnxruntime.transformers.optimizer.optimize_model``) on each component, with the model type its
spec names (``ComponentSpec.fusion_model``: clip, unet or vae), in the order onnxruntime's own SD
tool uses: the fusions on the **fp32** graph (an fp16 export is widened first, exactly), then the
conversion to fp16 with float32 graph I/O and the float32 timestep projection, as in every sdexport
export. The fused graph (MultiHeadAttention with packed QKV/KV, GroupNorm and SkipGroupNorm in NHWC,
NhwcConv, BiasSplitGelu, BiasAdd) is written to ``<component>/onnxruntime-cuda/model.onnx``; the
portable graph stays as it was, because TensorRT and other runtimes cannot read these contrib ops.

The manifest records, per component, the artifact and its hashes, the fused-operator counts
(``get_fused_operator_statistics``), the portable graph it came from (so a re-export makes it stale)
and its parity against the fp32 reference: on the CUDA provider where there is one; where there is
none, a CPU build of the same fusions minus the GPU-only ones is compared instead, and the record says so.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sdexport.build import keep_built
from sdexport.build.cache_key import onnx_files, onnx_sha256
from sdexport.build.vae_upcast import specs_to_build
from sdexport.console import console, step
from sdexport.errors import EngineDirError, SdexportError, one_line
from sdexport.graph_io import check_io, onnxruntime_tensors
from sdexport.manifest import (
    Manifest,
    check_files,
    check_graph,
    load_manifest,
    remove_leftovers,
    save_manifest,
    sha256_file,
)
from sdexport.specs import ComponentSpec

if TYPE_CHECKING:
    import onnx

TARGET = "onnxruntime-cuda"
"""The build target's name: the manifest key of its artifacts and the folder they live in."""

GPU_ONLY_FUSIONS = (
    "enable_group_norm", "enable_skip_group_norm", "enable_nhwc_conv", "enable_bias_splitgelu",
    "enable_bias_add", "enable_packed_qkv", "enable_packed_kv",
)
"""FusionOptions flags whose operators onnxruntime implements for CUDA only."""

CONTRIB_DOMAIN = "com.microsoft"

SAMPLE_VOCAB = 256
"""Token ids of parity inputs are drawn below this: the byte tokens every CLIP vocabulary has."""


def artifact_path(component: str) -> str:
    """Where a component's fused graph lives, relative to the engine directory."""
    return f"{component}/{TARGET}/model.onnx"


# ---------------------------------------------------------------------------------------------------
# Fusing one graph


def fusion_options(model_type: str, *, fp16: bool, gpu: bool = True, off: Collection[str] = ()) -> Any:
    """onnxruntime's defaults for the model type, as its SD tool sets them: packed QKV/KV only for fp16
    graphs (their fused kernels are fp16); ``gpu=False`` turns off the fusions whose operators have
    no CPU kernel, for a variant that can be run and compared on any machine; ``off``: FusionOptions
    flags turned off besides (``kernel_limits``)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(model_type)
    if model_type == "unet" and not fp16:
        options.enable_packed_qkv = options.enable_packed_kv = False
    for flag in [*(GPU_ONLY_FUSIONS if not gpu else ()), *off]:
        setattr(options, flag, False)
    return options


def fuse(model: onnx.ModelProto, model_type: str, *, fp16: bool, gpu: bool = True,
         off: Collection[str] = ()) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Run onnxruntime's fusions on an fp32 graph (no session: ``opt_level=0``), returning the fused
    graph and the fused-operator counts. The graph is changed in place."""
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet(), numpy_scalar_compat(), weightless_shape_inference():
        optimized = optimize_model(
            model, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
            optimization_options=fusion_options(model_type, fp16=fp16, gpu=gpu, off=off), use_gpu=gpu,
        )
        statistics = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items()}
    fused = optimized.model
    # onnxruntime adds the contrib domain to the opsets only in its own save; onnx needs it declared.
    if any(n.domain == CONTRIB_DOMAIN for n in fused.graph.node) and not any(
        o.domain == CONTRIB_DOMAIN for o in fused.opset_import
    ):
        fused.opset_import.add(domain=CONTRIB_DOMAIN, version=1)
    return fused, statistics


BIAS_SPLIT_GELU_SIZES = (2560, 5120, 10240)
"""The hidden sizes onnxruntime's BiasSplitGelu CUDA kernel takes (``bias_split_gelu.cc``): Stable
Diffusion's feed-forward widths (4 × 2 × 320, 640, 1280)."""

BIAS_ADD_CHANNELS = (320, 640, 1280)
"""The channel counts onnxruntime's BiasAdd CUDA kernel takes (``bias_add.cc``)."""

GROUP_NORM_MAX_CHANNELS_PER_GROUP = 512
"""onnxruntime's GroupNorm CUDA kernel reads two channels a thread and a group within one block of
at most 512 channels (``group_norm_common_base.h``): a group's channels even, and at most this."""


PACKED_HEAD_MULTIPLE, PACKED_HEAD_MAX = 8, 256
"""The head sizes onnxruntime's MultiHeadAttention surely reads packed Q/K/V at: earlier releases
refuse packed inputs outside its flash and memory-efficient kernels (``attention_prepare_qkv.cu``:
"packed QKV format is not implemented"), which take multiples of 8, flash's up to 256; later ones
unpack them for the unfused kernel (seen in 1.31's library, not run). Other heads are fused
unpacked (a self-attention unpacked is onnxruntime's ``Attention`` node, not MultiHeadAttention), which
costs nothing SD has: its heads are 40, 64, 80 or 160 wide."""


def _packed_head_size(node: Any, shapes: dict[str, list[int]], producers: dict[str, Any]) -> tuple[str, int] | None:
    """("enable_packed_qkv" or "enable_packed_kv", head size) of a MultiHeadAttention that reads Q, K
    and V packed in one input (or K and V in one), from the Reshape onnxruntime's fusion puts in
    front of it (to ``[0, 0, heads, 3 or 2, head size]``); None where it reads them apart."""
    packed = [name for name in node.input[:2] if name]
    for name in packed:
        reshape = producers.get(name)
        shape = shapes.get(reshape.input[1]) if reshape is not None and reshape.op_type == "Reshape" else None
        if shape is not None and len(shape) == 5 and shape[3] in (2, 3):
            return ("enable_packed_qkv" if shape[3] == 3 else "enable_packed_kv"), int(shape[4])
    return None


def kernel_limits(fused: onnx.ModelProto) -> dict[str, str]:
    """The GPU-only fusions of ``fused`` whose CUDA kernels refuse the sizes it hands them, as
    {FusionOptions flag: why}. Those kernels serve Stable Diffusion's widths only, and refuse others
    at run time ("GroupNorm in CUDA does not support the input"): a model of other widths (a
    distilled one; the tests' tiny one) is fused again without them. The CPU variant, which a build
    without CUDA runs, has none of them, so nothing else would notice before a GPU did."""
    from onnx import TensorProto, numpy_helper

    sizes = {t.name: list(t.dims) for t in fused.graph.initializer}
    # the values of small integer constants (Reshape targets), read without touching the weights
    shapes = {t.name: [int(v) for v in numpy_helper.to_array(t).ravel()] for t in fused.graph.initializer
              if t.data_type == TensorProto.INT64 and len(t.dims) == 1 and t.dims[0] <= 8
              and t.data_location != TensorProto.EXTERNAL}
    producers = {out: n for n in fused.graph.node for out in n.output}
    limits: dict[str, str] = {}
    for node in fused.graph.node:
        if node.domain != CONTRIB_DOMAIN:
            continue
        if node.op_type == "MultiHeadAttention" and (packed := _packed_head_size(node, shapes, producers)):
            flag, head = packed
            if head % PACKED_HEAD_MULTIPLE or head > PACKED_HEAD_MAX:
                limits.setdefault(flag, f"MultiHeadAttention reading {'Q, K and V' if flag.endswith('qkv') else 'K and V'} "
                                        f"packed, of head size {head} (its kernels for that take a multiple of "
                                        f"{PACKED_HEAD_MULTIPLE}, at most {PACKED_HEAD_MAX})")
            continue
        width = (sizes.get(node.input[1]) or [None])[0] if len(node.input) > 1 else None
        if width is None:
            continue  # (not a constant: the kernel's own check is all there is)
        if node.op_type in ("GroupNorm", "SkipGroupNorm"):
            groups = next((a.i for a in node.attribute if a.name == "groups"), 0)
            per_group = width // groups if groups and width % groups == 0 else 0
            if not per_group or per_group % 2 or per_group > GROUP_NORM_MAX_CHANNELS_PER_GROUP:
                why = (f"{node.op_type} of {width} channels in {groups} groups (the kernel takes an even number of "
                       f"channels per group, at most {GROUP_NORM_MAX_CHANNELS_PER_GROUP})")
                for flag in ("enable_group_norm", "enable_skip_group_norm"):  # one kernel: without the skip
                    limits.setdefault(flag, why)  # fusion, the same norm would be fused as a GroupNorm
        elif node.op_type == "BiasSplitGelu" and width not in BIAS_SPLIT_GELU_SIZES:
            limits.setdefault("enable_bias_splitgelu", f"BiasSplitGelu of hidden size {width} (the kernel takes "
                                                       f"{', '.join(map(str, BIAS_SPLIT_GELU_SIZES))})")
        elif node.op_type == "BiasAdd" and width not in BIAS_ADD_CHANNELS:
            limits.setdefault("enable_bias_add", f"BiasAdd of {width} channels (the kernel takes "
                                                 f"{', '.join(map(str, BIAS_ADD_CHANNELS))})")
    return limits


def to_fp16_fused(model: onnx.ModelProto, keep_fp32: list[str]) -> onnx.ModelProto:
    """fp16 conversion of a fused graph: as ``export.graph.to_fp16`` (float32 graph I/O, the float32
    cone after ``keep_fp32`` inputs), with the element types of every tensor first taken from
    onnxruntime's symbolic shape inference, which knows its contrib operators (onnx's does not,
    and without types the converter casts around them). As onnxruntime's own
    ``OnnxModel.convert_float_to_float16`` does, but inferring on the weightless graph."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    from sdexport.export.graph import fp32_cone, skip_edge_round_trip

    blocked = fp32_cone(model, keep_fp32)
    types = _inferred_types(model)
    known = {v.name for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    model.graph.value_info.extend(v for name, v in types.items() if name not in known)
    with _quiet():
        converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                             node_block_list=blocked or None)
    wrapped = OnnxModel(converted)
    with _quiet(), weightless_shape_inference():
        wrapped.remove_cascaded_cast_nodes()
        wrapped.remove_useless_cast_nodes()
    skip_edge_round_trip(wrapped.model, keep_fp32)
    OnnxModel.graph_topological_sort(wrapped.model.graph, is_deterministic=True)
    return wrapped.model


def _inferred_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Element types (no shapes) of the graph's tensors from symbolic shape inference; refuses a
    graph it cannot type completely (the fp16 conversion would be wrong, not just slower)."""
    import onnx

    from sdexport.export.graph import symbolic_shapes

    try:
        with _quiet():
            inferred = symbolic_shapes(weightless(model), auto_merge=True)
        why = "incomplete: some tensors' types stay unknown"
    except Exception as exc:  # an operator's inference may raise anything
        inferred, why = None, one_line(exc, 200)
    if inferred is None:
        raise SdexportError(f"onnxruntime's symbolic shape inference failed on the fused graph ({why}); "
                            "nothing was kept. Please report this with the model and onnxruntime version")
    types = {}
    for value in inferred.graph.value_info:
        if value.type.tensor_type.elem_type != onnx.TensorProto.UNDEFINED:
            typed = onnx.ValueInfoProto()
            typed.CopyFrom(value)
            typed.type.tensor_type.ClearField("shape")
            types[value.name] = typed
    return types


WEIGHTLESS_ABOVE = 1024
"""Float initializers with more elements than this may lose their data in ``weightless``..."""

WEIGHT_READERS = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "InstanceNormalization", "LayerNormalization",
    "NhwcConv", "MultiHeadAttention", "Attention", "GroupNorm", "SkipGroupNorm", "SkipLayerNormalization",
    "BiasSplitGelu", "BiasAdd", "BiasGelu", "FastGelu", "QuickGelu",
})
"""...when only these read them: operators whose output shape never depends on a weight's values
(symbolic shape inference reads the values of every input of Add, Mul, Where, ... in case they
are shape arithmetic)."""


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large float initializers keep their names, types and dims but not
    their data: what shape inference needs, without a second copy of gigabytes of weights
    (onnxruntime's symbolic shape inference copies the whole model it is given)."""
    import onnx

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    skeleton = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(skeleton, name, getattr(model, name))
    skeleton.opset_import.extend(model.opset_import)
    graph, source = skeleton.graph, model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    readers: dict[str, set[str]] = {}
    for node in source.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    for tensor in source.initializer:
        count = 1
        for d in tensor.dims:
            count *= d
        if (tensor.data_type in floats and count > WEIGHTLESS_ABOVE
                and readers.get(tensor.name, {"?"}) <= WEIGHT_READERS):
            graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
        else:
            graph.initializer.append(tensor)
    return skeleton


@contextlib.contextmanager
def weightless_shape_inference() -> Iterator[None]:
    """Make onnxruntime's fusion passes infer shapes on ``weightless`` copies: each inference
    otherwise copies the whole model, which for an SD 1.5 U-Net (3.4 GB in fp32) exhausts 24 GB."""
    import importlib

    import onnxruntime.transformers  # noqa: F401  (puts its folder on sys.path, as its modules expect)

    # onnxruntime's modules import it both as a top-level module and as part of the package: two classes.
    helpers = {id(c): c for c in (importlib.import_module(m).SymbolicShapeInferenceHelper
                                  for m in ("shape_infer_helper", "onnxruntime.transformers.shape_infer_helper"))}
    originals = [(helper, helper.__dict__["__init__"]) for helper in helpers.values()]
    for helper, original in originals:
        helper.__init__ = _weightless_init(original)
    try:
        yield
    finally:
        for helper, original in originals:
            helper.__init__ = original


def _weightless_init(original: Any) -> Any:
    @functools.wraps(original)
    def init(self: Any, model: Any, *args: Any, **kwargs: Any) -> None:
        original(self, weightless(model), *args, **kwargs)

    return init


class _Scalarish:
    """Numpy 2.4 refuses ``int()`` of a one-element array that is not 0-d; onnxruntime's UNet and VAE
    attention fusions (through 1.32 at least) call it on ``[num_heads]`` shape constants, and the
    fusion pass dies with a TypeError. ``numpy_scalar_compat`` hands those methods arrays that convert."""

    cls: Any = None

    @classmethod
    def view(cls, value: Any) -> Any:
        import numpy as np

        if cls.cls is None:
            class ScalarishArray(np.ndarray):
                def __int__(self) -> int:
                    return int(np.asarray(self).reshape(-1)[0]) if self.size == 1 else int(np.asarray(self))

            cls.cls = ScalarishArray
        return value.view(cls.cls) if isinstance(value, np.ndarray) else value


@contextlib.contextmanager
def numpy_scalar_compat() -> Iterator[None]:
    """Patch onnxruntime's two ``num_heads`` readers for the duration of a fusion pass, where this
    numpy refuses or deprecates ``int()`` of a one-element array (1.25 and later: CI's numpy runs the
    patched readers too, as the GPU image's numpy 2.5 must); the methods themselves run unchanged,
    reading constants that ``int()`` accepts."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        try:
            int(np.ones(1))
            refused = False  # numpy before 1.25: nothing to do
        except (TypeError, DeprecationWarning):
            refused = True
    if not refused:
        yield
        return
    from onnxruntime.transformers import onnx_model_unet, onnx_model_vae

    patched = [
        (onnx_model_unet.FusionAttentionUnet, "get_num_heads"),
        (onnx_model_vae.FusionAttentionVae, "get_num_heads_and_hidden_size"),
    ]
    originals = [(owner, name, owner.__dict__[name]) for owner, name in patched if name in owner.__dict__]
    for owner, name, method in originals:
        setattr(owner, name, _reading_scalarish(method))
    try:
        yield
    finally:
        for owner, name, method in originals:
            setattr(owner, name, method)


def _reading_scalarish(method: Any) -> Any:
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        original = model.get_constant_value
        model.get_constant_value = lambda name: _Scalarish.view(original(name))
        try:
            return method(self, *args, **kwargs)
        finally:
            del model.get_constant_value  # the class's method shows again

    return call


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's optimizer prints warnings to stdout, which is kept for results, and a progress bar
    (tqdm) to stderr beside sdexport's own: both are dropped; errors still raise."""
    import logging

    loggers = [logging.getLogger(n) for n in ("onnxruntime", "fusion_base", "onnx_model", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---------------------------------------------------------------------------------------------------
# Parity


def parity(
    spec: ComponentSpec, reference: Path, candidate: Path, *, manifest: Manifest, provider: str, dtype: str,
    variant: str,
) -> dict[str, Any]:
    """Run ``candidate`` on ``provider`` and the fp32 ``reference`` graph on the CPU at the profile's
    min point (and opt on CUDA); the relative-L2 error of every output against the tolerance."""
    import onnxruntime as ort

    from sdexport.export.inputs import sample_inputs
    from sdexport.export.verify import TOLERANCE, compare

    tolerance = TOLERANCE[dtype]  # against the fp32 reference graph, as the export's own parity check
    profile, dims = manifest.shape_profile, manifest.model_dims
    lo, opt, _ = profile.component_batch(spec)
    points = [("min", lo, profile.height[0], profile.width[0], profile.chunks[0])]
    if provider == "CUDAExecutionProvider":
        points.append(("opt", opt, profile.height[1], profile.width[1], profile.chunks[1]))
    from sdexport.console import onnxruntime_session_options
    from sdexport.runtime.onnxruntime_backend import cuda_provider_options, require_cuda_session

    options = onnxruntime_session_options(ort)
    providers: list[Any] = ["CPUExecutionProvider"]
    if provider == "CUDAExecutionProvider":  # as the runtime makes its sessions, but in exact fp32: the
        # check is of the fusions, and TF32 (the provider's default) would move fp32 matrix products
        # by about the fp32 tolerance on its own
        providers = [(provider, {**cuda_provider_options(0, 0, fused=True), "use_tf32": "0"}), "CPUExecutionProvider"]
    try:
        want_session = ort.InferenceSession(str(reference), options, providers=["CPUExecutionProvider"])
        got_session = ort.InferenceSession(str(candidate), options, providers=providers,
                                           enable_fallback=0)  # (as the runtime's: no silent CPU session)
    except Exception as exc:  # onnxruntime raises its own types
        raise SdexportError(f"{spec.name}: onnxruntime cannot load the graphs to compare them "
                            f"({one_line(exc, 300)}); nothing was kept") from None
    if provider == "CUDAExecutionProvider":
        require_cuda_session(got_session, candidate)
    # Each graph fed as it takes its inputs (an adopted optimum graph: int64 ids, float16 I/O).
    want_io, got_io = (check_io(spec, onnxruntime_tensors(s.get_inputs()), onnxruntime_tensors(s.get_outputs()),
                                str(path)) for s, path in ((want_session, reference), (got_session, candidate)))
    results = []
    for i, (label, batch, height, width, chunks) in enumerate(points):
        feed = sample_inputs(spec, dims.sizes(batch, height, width, chunks), vocab_size=SAMPLE_VOCAB, seed=i)
        want = want_session.run(spec.output_names, want_io.numpy_feed(feed))
        try:
            got = got_session.run(spec.output_names, got_io.numpy_feed(feed))
        except Exception as exc:  # a fused kernel that refuses these sizes (kernel_limits knows those it can)
            raise SdexportError(f"{spec.name}: {variant} does not run at {label} ({one_line(exc, 300)}); nothing "
                                "was kept") from None
        outputs = {n: vars(compare(g, w)) for n, g, w in zip(spec.output_names, got, want)}
        ok = all(e["rel_l2"] <= tolerance for e in outputs.values())
        results.append({"label": label, "status": "passed" if ok else "failed",
                        "shapes": {n: list(v.shape) for n, v in feed.items()}, "outputs": outputs})
    status = "failed" if any(p["status"] == "failed" for p in results) else "passed"
    if status == "passed" and provider != "CUDAExecutionProvider":
        status = "passed-cpu-variant"  # the fused graph itself has not run yet
    return {"status": status, "provider": provider, "variant": variant, "reference": "fp32 graph",
            "dtype": dtype, "tolerance": tolerance, "points": results}


def _require_parity(component: str, report: dict[str, Any]) -> None:
    if report["status"] != "failed":
        return
    bad = [f"{p['label']}: {name} rel-L2 {e['rel_l2']:.2e}" for p in report["points"] if p["status"] == "failed"
           for name, e in p["outputs"].items() if not e["rel_l2"] <= report["tolerance"]]
    raise SdexportError(
        f"{component}: the fused graph disagrees with the fp32 reference on {report['provider']} beyond "
        f"the {report['dtype']} tolerance (rel-L2 {report['tolerance']:g}): " + "; ".join(bad)
        + "; nothing was kept. Please report this with the model and onnxruntime version"
    )


def cuda_provider_here() -> bool:
    """Whether a CUDA session can really start here (onnxruntime-gpu lists it even without a GPU)."""
    from sdexport.runtime.providers import available_providers

    if "CUDAExecutionProvider" not in available_providers():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------------
# Building an engine directory's artifacts


@dataclass
class OrtBuildResult:
    """What ``build_onnxruntime`` did for one component."""

    component: str
    status: Literal["built", "cached"]
    path: Path
    seconds: float
    fusions: dict[str, int] = field(default_factory=dict)
    parity: str = ""
    reasons: list[str] = field(default_factory=list)


def build_onnxruntime(
    engine_dir: Path, *, components: list[str] | None = None, fp16: bool = True, force: bool = False,
) -> list[OrtBuildResult]:
    """Write (or reuse) one ONNX Runtime CUDA graph per component of an exported engine directory.

    ``fp16``: convert the fused graph to fp16 (the fallback VAE stays fp32). A fused graph is reused
    when it was made from the same portable graph, with the same precision and onnxruntime version,
    and its files are intact, unless ``force``.
    """
    import onnxruntime  # noqa: F401  (one clear line below when it is missing)

    load_manifest(engine_dir, verify_files=False)  # one clear line for a bad directory, before locking
    from sdexport.export.plan import ENGINE_DIR
    from sdexport.output_dir import updating

    with updating(engine_dir, ENGINE_DIR):
        return _build_locked(engine_dir, components=components, fp16=fp16, force=force)


def _build_locked(engine_dir: Path, *, components: list[str] | None, fp16: bool, force: bool) -> list[OrtBuildResult]:
    import onnxruntime as ort

    manifest = load_manifest(engine_dir, verify_files=False)  # again, under the lock
    specs = specs_to_build(engine_dir, manifest, components, fp16=fp16)
    on_cuda = cuda_provider_here()
    if not on_cuda:
        console.print("[yellow]note:[/] no CUDA provider here: each fused graph is checked by running its "
                      "CPU variant (the same fusions minus the CUDA-only ones) against the fp32 reference")
    remove_leftovers(engine_dir, manifest)  # (this build holds the lock)
    wanted = {spec.name: {"source_sha256": onnx_sha256(manifest.files, manifest.components[spec.name].onnx),
                          "dtype": "fp32" if spec.always_fp32 or not fp16 else "fp16", "onnxruntime": ort.__version__}
              for spec in specs}
    reasons = {spec.name: _rebuild_reasons(engine_dir, manifest, spec.name, wanted[spec.name], force, on_cuda)
               for spec in specs}
    if any(reasons.values()):
        from sdexport.output_dir import require_writable

        require_writable(engine_dir)
    for name in [name for name, why in reasons.items() if why]:  # before any is built: minutes each on SD
        _refuse_stray_files(engine_dir, manifest, name)
        graph_rel = manifest.components[name].onnx
        check_files(engine_dir, onnx_files(manifest.files, graph_rel), adopted=manifest.adopted)  # built from what the manifest says
        check_graph(engine_dir, manifest, name)  # and is what it says: its I/O, sizes and precision
    results = []
    for spec in specs:
        entry = manifest.components[spec.name]
        dtype = wanted[spec.name]["dtype"]
        rel = artifact_path(spec.name)
        if not reasons[spec.name]:
            done = entry.optimized[TARGET]
            console.print(f"[green]✓[/] {spec.name}: cached {rel}")
            results.append(OrtBuildResult(spec.name, "cached", engine_dir / rel, 0.0, dict(done.get("fusions", {})),
                                          str(done.get("parity", {}).get("status", ""))))
            continue
        start = time.perf_counter()
        with step(f"Fusing {spec.name} for ONNX Runtime CUDA ({spec.fusion_model}, {dtype})"):
            record = _build_one(engine_dir, manifest, spec, dtype, on_cuda)
        record.update(wanted[spec.name], build_seconds=round(time.perf_counter() - start, 2),
                      built=datetime.now(UTC).isoformat(timespec="seconds"))
        from sdexport import stopping

        # (a stop between the manifest's save and the folder's move left the manifest listing files
        # not in place, an audit: held until the component is in place and said as built)
        with stopping.deferred():
            _install(engine_dir, manifest, spec.name, record)
            results.append(OrtBuildResult(spec.name, "built", engine_dir / rel, record["build_seconds"],
                                          record["fusions"], record["parity"]["status"], reasons[spec.name]))
            keep_built(results)
    return results


def _build_one(engine_dir: Path, manifest: Manifest, spec: ComponentSpec, dtype: str, on_cuda: bool) -> dict[str, Any]:
    """Fuse, convert, save and check one component into a staging folder beside its final place;
    returns the manifest record (with ``_staging``: the folder to move in)."""
    import onnx

    from sdexport.export import graph

    engine_dir = engine_dir.absolute()  # the work below runs in a scratch working directory
    entry = manifest.components[spec.name]
    folder = engine_dir / spec.name
    staging = folder / f".{TARGET}.{os.getpid()}.tmp"
    _discard(staging)
    staging.mkdir()
    try:
        # onnxruntime's symbolic shape inference saves its model into the working directory when it
        # cannot finish: let that land in the scratch folder, never in the user's. The scratch folder
        # (the fp32 reference: a whole U-Net) is in the staging folder, which the next build removes
        # should this one be killed, on the engine directory's disk (not a /tmp that may be memory).
        with tempfile.TemporaryDirectory(prefix="scratch-", dir=staging) as scratch, contextlib.chdir(scratch):
            # The fp32 reference: the portable graph itself, or the fp16 export widened exactly.
            reference = Path(scratch) / "reference.onnx"
            model = onnx.load(str(engine_dir / entry.onnx))
            if entry.dtype == "fp16":
                model = graph.to_fp32(model)
            if len(graph.save(model, reference)) > 1:
                # Saving over 2 GB moved the weights out of ``model`` into the data file: back in.
                from onnx.external_data_helper import load_external_data_for_model

                load_external_data_for_model(model, str(reference.parent))
            keep_fp32 = [t.name for t in spec.inputs if t.dtype == "float32"]
            fused, statistics = fuse(model, spec.fusion_model, fp16=dtype == "fp16")
            del model
            left_out: dict[str, str] = {}
            while more := {k: v for k, v in kernel_limits(fused).items() if k not in left_out}:
                left_out |= more  # fused again without them (the graph above was changed in place), until
                del fused  # what is left is what the kernels take (each pass turns fusions off: it ends)
                fused, statistics = fuse(onnx.load(str(reference)), spec.fusion_model, fp16=dtype == "fp16",
                                         off=left_out)
            if left_out:
                console.print(f"[yellow]note:[/] {spec.name}: fused without {', '.join(dict.fromkeys(left_out.values()))}: "
                              "onnxruntime's CUDA kernels for them take Stable Diffusion's sizes only")
            if dtype == "fp16":
                fused = to_fp16_fused(fused, keep_fp32)
            path = staging / "model.onnx"
            graph.save(fused, path)
            del fused
            _check_saved(path)
            if on_cuda:
                report = parity(spec, reference, path, manifest=manifest, provider="CUDAExecutionProvider",
                                dtype=dtype, variant="the fused graph")
            else:
                variant = Path(scratch) / "cpu-variant.onnx"
                cpu_model, _ = fuse(onnx.load(str(reference)), spec.fusion_model, fp16=False, gpu=False)
                graph.save(cpu_model, variant)
                del cpu_model
                report = parity(spec, reference, variant, manifest=manifest, provider="CPUExecutionProvider",
                                dtype="fp32", variant="CPU variant (CUDA-only fusions off, fp32)")
        _require_parity(spec.name, report)
    except BaseException:
        _discard(staging)
        raise
    return {"onnx": artifact_path(spec.name), "dtype": dtype, "fusion_model": spec.fusion_model,
            "fusions": {k: v for k, v in statistics.items() if v}, "parity": report, "_staging": str(staging),
            **({"left_out": left_out} if left_out else {})}


def _check_saved(path: Path) -> None:
    """The structural check onnx can make of a graph with contrib operators (its full check runs
    strict shape inference, which knows no com.microsoft operator)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise SdexportError(f"{path}: the fused graph is not valid ONNX ({one_line(exc, 300)}); nothing was kept") from None


def _install(engine_dir: Path, manifest: Manifest, component: str, record: dict[str, Any]) -> None:
    """Move a finished staging folder into ``<component>/onnxruntime-cuda``.

    The manifest lists the new files first (as the TensorRT build lists a plan before it takes its
    name): an interruption leaves listed files that are missing or do not match, which the next
    build rebuilds and the runtime refuses, never an unlisted file. An existing folder is replaced
    only when the manifest lists every file in it."""
    from sdexport.manifest import sha256_file

    staging = Path(record.pop("_staging"))
    final = engine_dir / component / TARGET
    prefix = f"{component}/{TARGET}/"
    try:
        _refuse_stray_files(engine_dir, manifest, component)  # again: one may have come during the build
    except EngineDirError:
        _discard(staging)
        raise
    for rel in [r for r in manifest.files if r.startswith(prefix)]:
        del manifest.files[rel]
    for file in sorted(staging.iterdir()):
        manifest.files[f"{prefix}{file.name}"] = sha256_file(file)
    manifest.components[component].optimized[TARGET] = record
    try:
        save_manifest(engine_dir, manifest)
    except BaseException:  # (its staging folder stayed until the next build otherwise)
        _discard(staging)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)


def _refuse_stray_files(engine_dir: Path, manifest: Manifest, component: str) -> None:
    """Refuse a ``<component>/onnxruntime-cuda`` folder holding files the manifest does not list: a
    rebuild replaces that folder whole, and what sdexport did not write is not its to delete."""
    from sdexport.output_dir import unlisted_files

    final = engine_dir / component / TARGET
    prefix = f"{component}/{TARGET}/"
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        # (refused before the fusing: it was found after the manifest listed the new graph, when the
        # old folder was to go, leaving a directory every command then refused; an audit)
        what = "a symbolic link" if final.is_symlink() else "a file"
        raise EngineDirError(f"{final} is {what}, not a folder sdexport wrote; move it away and build again")
    if not final.exists():
        return
    stray = unlisted_files(final, {rel[len(prefix):] for rel in manifest.files if rel.startswith(prefix)})
    if stray:
        raise EngineDirError(
            f"{final} holds files sdexport did not write ({', '.join(stray[:3])}); move them away and build again"
        )


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)


def _rebuild_reasons(engine_dir: Path, manifest: Manifest, component: str, wanted: dict[str, str], force: bool,
                     on_cuda: bool = False) -> list[str]:
    """Empty when an intact fused graph made the way ``wanted`` says is listed; else why a build is
    needed. ``on_cuda``: a graph fused where there was no CUDA provider, checked through its CPU
    variant only, is built again and checked itself (it was "cached" on the GPU server, never run
    against its reference there)."""
    existing = manifest.components[component].optimized.get(TARGET)
    if force:
        return ["--force"]
    if existing is None:
        return ["no fused graph yet"]
    if on_cuda and existing.get("parity", {}).get("status") == "passed-cpu-variant":
        return ["checked through its CPU variant only (fused without a CUDA provider): checked on CUDA now"]
    reasons = [f"{key} {existing.get(key)!s:.12} != {value:.12}" for key, value in wanted.items()
               if existing.get(key) != value]
    if reasons:
        return reasons
    for rel, sha in onnx_files(manifest.files, existing["onnx"]).items():
        file = engine_dir / rel
        if not file.is_file():
            return [f"{rel} is missing"]
        if sha256_file(file) != sha:
            return [f"{rel} does not match its sha256 (damaged)"]
    import onnx

    # (fused before kernel_limits: it would fail on the first GPU; graphs of SD's widths stay cached)
    refused = kernel_limits(onnx.load(str(engine_dir / existing["onnx"]), load_external_data=False))
    if refused:
        return [f"fused with {next(iter(refused.values()))}, which onnxruntime's CUDA kernel refuses"]
    return []
