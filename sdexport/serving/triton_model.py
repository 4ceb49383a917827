"""The Triton Python-backend model: one engine directory, loaded once, serving batches of requests.

Triton's dynamic batcher hands ``execute`` the requests that arrived within the queue delay. Each is
decoded into per-image rows and checked with the CLI's checks; a bad request gets its own error and
the others go on. Rows of every request that share their settings are generated in one call (up to
the engines' batch), the rest one call after another, and each request gets its images back.
With a refiner (``serve --refiner``), each call is the base model's up to ``denoising_end`` and
the refiner's from its latents, as ``run --refiner`` makes it (``runtime.ensemble``).

``ServedModel`` is plain Python over numpy inputs (``generate``), so it is tested without a server;
``TritonAdapter`` is the thin part that speaks ``triton_python_backend_utils``.
"""

from __future__ import annotations

import io
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from sdexport.errors import EngineDirError, EngineRunError, ProfileError, SdexportError, one_line
from sdexport.runtime.ensemble import DENOISING_END_DEFAULT, check_denoising_end
from sdexport.runtime.request import CONTROL_SCALE_DEFAULTS
from sdexport.serving.protocol import INPUT_NAMES, OUTPUTS
from sdexport.serving.requests import (
    DEFAULTS,
    ImageLimits,
    Row,
    decode_rows,
    generation_request,
    group_rows,
    image_of_request,
    settings_apart,
    shared_init_apart,
    union_control_apart,
)
from sdexport.setting_names import input_name, settings_named
from sdexport.shapes import Range, ShapeProfile, overlap, parse_range
from sdexport.specs import SDXL_REFINER

if TYPE_CHECKING:
    from sdexport.manifest import Manifest
    from sdexport.runtime.ensemble import Ensemble
    from sdexport.runtime.request import GenerationRequest

SERVED_AXES = ("batch", "height", "width")
"""The profile axes ``serve --batch/--height/--width`` narrow. Prompt chunks stay the engines' (a
plan reads a text as far as it reads, cutting the rest with the warning)."""

MAX_STEPS = 200
"""A served request's step limit by default: far above the usual 20-50, far below the 1000 a
scheduler would accept, so one request cannot hold the queue for minutes."""


@dataclass(frozen=True)
class ServeSettings:
    """What the served model is told through config.pbtxt's ``parameters`` (all strings there)."""

    engine_dir: str
    backend: str = "onnxruntime"
    cuda_graph: bool = False
    graphs: str = "auto"
    max_steps: int = MAX_STEPS
    verify: bool = True
    """Hash the files the backend reads once at load (``sdexport run`` does the same per run)."""
    refiner: str = ""
    """An sdxl-refiner engine directory that refines every image of this SDXL base model ("": none)."""
    denoising_end: float = DENOISING_END_DEFAULT
    """With ``refiner``: the base model's share of the schedule for a request that gives none."""
    engine_name: str = ""
    """What the log and the images' records call ``engine_dir`` where that is a link to it
    (``serving.names.ascii_links``); "": ``engine_dir`` itself."""
    refiner_name: str = ""
    """The same for ``refiner``."""
    emphasis: str = DEFAULTS["emphasis"]
    """How brackets are read in a request that sends no ``emphasis`` (``serve --emphasis``)."""
    shapes: tuple[tuple[str, Range], ...] = ()
    """(axis, min:opt:max) of the ``SERVED_AXES`` the server is told to take (``serve --height``):
    TensorRT loads the newest plan that covers them, and requests outside are refused. Empty:
    whatever the loaded engines take."""
    hashed: str = ""
    """``checked_digest`` of the engine directories' file lists as ``serve`` hashed their files (then
    ``verify`` is off): a directory replaced before the model loads (an ``export --force`` while
    Triton starts) is refused, not loaded unhashed. "": not checked before (``verify`` says)."""
    set_by: str = "config.pbtxt"
    """Where this server's operator sets the settings above, so that a refusal names the lever:
    ``serve`` (its options: the repository it writes is a temporary one), ``triton-repo`` (its
    options, while it writes the repository), or ``config.pbtxt`` (the repository's parameters,
    which the stock server reads and its operator edits)."""

    def option(self, name: str) -> str:
        """This server's setting ``name`` (``max_steps``) as its operator changes it."""
        if self.set_by == "config.pbtxt":
            return f"config.pbtxt parameter {name}"
        return f"sdexport {self.set_by} --{name.replace('_', '-')}"

    def to_parameters(self) -> dict[str, str]:
        return {"engine_dir": self.engine_dir, "backend": self.backend, "cuda_graph": str(self.cuda_graph).lower(),
                "graphs": self.graphs, "max_steps": str(self.max_steps), "verify": str(self.verify).lower(),
                **({"refiner": self.refiner, "denoising_end": repr(self.denoising_end)} if self.refiner else {}),
                **{name: value for name, value in (("engine_name", self.engine_name),
                                                   ("refiner_name", self.refiner_name)) if value},
                **({"emphasis": self.emphasis} if self.emphasis != DEFAULTS["emphasis"] else {}),
                **{axis: ":".join(map(str, values)) for axis, values in self.shapes},
                **({"hashed": self.hashed} if self.hashed else {}),
                **({"set_by": "serve"} if self.set_by == "serve" else {})}  # (triton-repo's: config.pbtxt now)

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> ServeSettings:
        if "engine_dir" not in parameters:
            raise SdexportError("config.pbtxt has no engine_dir parameter: write the repository with `sdexport triton-repo`")
        def read(name: str, default: str, parse: Callable[[str], Any], expected: str) -> Any:
            """One parameter, refused naming it and what it takes (the whole dict was printed)."""
            text = parameters.get(name, default)
            try:
                return parse(text)
            except (KeyError, ValueError):
                raise SdexportError(f"config.pbtxt parameter {name} {text!r}: expected {expected}") from None

        def flag(text: str) -> bool:
            return {"true": True, "false": False}[text.strip().lower()]  # (protobuf's True, a YAML habit: taken)

        from sdexport.runtime.emphasis import EMPHASIS

        return cls(engine_dir=parameters["engine_dir"], backend=parameters.get("backend", cls.backend),
                   cuda_graph=read("cuda_graph", "false", flag, "true or false"), graphs=parameters.get("graphs", "auto"),
                   max_steps=read("max_steps", str(MAX_STEPS), _at_least_one, "a whole number, 1 or more"),
                   verify=read("verify", "true", flag, "true or false"),
                   refiner=parameters.get("refiner", ""),
                   denoising_end=read("denoising_end", repr(DENOISING_END_DEFAULT), float, "a number"),
                   engine_name=parameters.get("engine_name", ""), refiner_name=parameters.get("refiner_name", ""),
                   emphasis=read("emphasis", DEFAULTS["emphasis"], _emphasis, f"one of {', '.join(EMPHASIS)}"),
                   shapes=tuple((axis, parse_range(parameters[axis], axis, f"config.pbtxt parameter {axis}"))
                                for axis in SERVED_AXES if axis in parameters),
                   hashed=parameters.get("hashed", ""),
                   set_by=read("set_by", "config.pbtxt", {"serve": "serve", "config.pbtxt": "config.pbtxt"}.__getitem__,
                               "serve or config.pbtxt"))

    @classmethod
    def unread(cls, parameters: dict[str, str]) -> list[str]:
        """The keys of ``parameters`` no one reads: an operator's misspelling (``Height``) that would
        change nothing, said in the log. Upper-case keys are Triton's Python backend's
        (``EXECUTION_ENV_PATH``), not sdexport's."""
        read = {f.name for f in fields(cls) if f.name != "shapes"} | set(SERVED_AXES)
        return [key for key in parameters if key not in read and not key.isupper()]

    @staticmethod
    def checked_digest(manifest: Manifest, refiner: Manifest | None = None) -> str:
        """One digest of the directories' listed files and their sha256 (``hashed``)."""
        import hashlib

        listed = [manifest.files, refiner.files if refiner is not None else None]
        return hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()

    def served_profile(self, manifest: Manifest, refiner: Manifest | None = None) -> ShapeProfile:
        """The shapes this server takes: the engine directory's profile (with a ``refiner``, the
        batches and sizes both profiles take), the axes of ``shapes`` narrowed. Refused in one line
        where those reach outside either profile, are not multiples the U-Net takes, or leave out
        calls of one image (the batcher makes them). Prompt chunks are the engine directory's: each
        pipeline reads a text as far as its engines read."""
        exported = manifest.shape_profile
        common = exported
        if refiner is not None:
            common = taken_by_all(exported, [("the refiner", refiner.shape_profile)], self.option)
        if not self.shapes:
            return common
        profile = replace(common, **dict(self.shapes))
        if "batch" in dict(self.shapes) and profile.batch[0] != 1:
            raise ProfileError(f"served batch min {profile.batch[0]}: a served call may hold a single image, "
                               f"so the batch starts at 1 (e.g. 1:{profile.batch[1]}:{profile.batch[2]})")
        profile.validate(manifest.model_dims)
        for read, whose in ((manifest, "the engine directory's"), *([(refiner, "the refiner's")] if refiner else [])):
            profile.check_inside(read.shape_profile, f"the served shapes reach outside {whose} profile",
                                 "serve inside it, or re-export with a wider", chunks=False)
        return profile

    def plan_profile(self, served: ShapeProfile) -> ShapeProfile | None:
        """What the engines are loaded for (``load_pipeline``'s ``request_profile``): the ``served``
        shapes at the fewest prompt chunks, so that TensorRT loads the newest plan that covers the
        batch and sizes (a plan that reads fewer chunks than the export cuts a longer text, with the
        warning, as a plan does where none were given). None where no shapes were: the newest plan."""
        if not self.shapes:
            return None
        fewest = served.chunks[0]
        return replace(served, chunks=(fewest, fewest, fewest))


def taken_by_all(served: ShapeProfile, parts: list[tuple[str, ShapeProfile]],
                 option: Callable[[str], str]) -> ShapeProfile:
    """``served``, its batches and sizes narrowed to what each of ``parts`` (a name, the shapes it
    takes) takes too: a TensorRT plan may take less than the directory's profile (a static one
    built last, say), a refiner less than the base model. Refused in one line where they share none,
    naming the server's setting of that axis as ``option`` (``ServeSettings.option``) gives it."""
    profile = served
    for name, theirs in parts:
        narrowed: dict[str, Range] = {}
        for axis in SERVED_AXES:
            ours, its = getattr(profile, axis), getattr(theirs, axis)
            both = overlap(ours, its)
            if both is None:
                raise ProfileError(
                    f"the engines share no {axis}: {name} takes {its[0]}-{its[2]}, the rest {ours[0]}-{ours[2]}; "
                    f"build every part for one profile (sdexport build with one --{axis} range), or serve a "
                    f"{axis} all of them take ({option(axis)})")
            narrowed[axis] = both
        profile = replace(profile, **narrowed)
    return profile


def loaded_profiles(pipelines: list[Any]) -> list[tuple[str, ShapeProfile]]:
    """(name, profile) of every engine of ``pipelines``, as ``taken_by_all`` reads them."""
    return [(name, engine.profile) for pipeline in pipelines for name, engine in pipeline.engines.items()]


def _at_least_one(text: str) -> int:
    """config.pbtxt's whole number (``max_steps``), 1 or more: 0 would refuse every request (a
    ValueError otherwise, as ``--max-steps`` refuses it)."""
    if int(text) < 1:
        raise ValueError(text)
    return int(text)


def _emphasis(mode: str) -> str:
    """config.pbtxt's ``emphasis``, one of ``runtime.emphasis.EMPHASIS`` (a ValueError otherwise)."""
    from sdexport.runtime.emphasis import EMPHASIS

    if mode not in EMPHASIS:
        raise ValueError(repr(mode))
    return mode


class ServerFault(str):
    """A request's outcome that is the server's failure, not the request's (a generation that raised
    what no check foresaw, out of device memory say): answered as Triton's INTERNAL (HTTP 500, gRPC
    INTERNAL), not as a bad argument, so that clients may retry and alerts on server errors fire."""


class Cancelled(str):
    """The outcome of a request its client gave up on before it was generated (Triton's CANCELLED)."""


ERROR_CODES = {ServerFault: "INTERNAL", Cancelled: "CANCELLED"}
"""``pb_utils.TritonError``'s code for each kind of outcome; any other text refused the request
(INVALID_ARG: HTTP 400)."""


@dataclass
class Generated:
    """One image of a response."""

    png: bytes
    pixels: Any
    """uint8, height x width x 3."""


class ServedModel:
    """The engine directory's pipeline behind Triton's ``execute``."""

    def __init__(self, settings: ServeSettings, log: Any = print) -> None:
        from sdexport.manifest import load_manifest
        from sdexport.runtime.ensemble import Refiner
        from sdexport.runtime.loading import load_pipeline, resolve_backend, takes_init_images

        self.settings = settings
        self.log = log
        engine_dir = Path(settings.engine_dir)
        manifest = load_manifest(engine_dir, verify_files=False)
        # (serve and triton-repo open the pair under --refiner first: what fails here, the stock server
        # read from config.pbtxt, and its operator edits the parameter there)
        self.refiner = (Refiner.open(Path(settings.refiner), engine_dir, manifest, flag="config.pbtxt parameter refiner")
                        if settings.refiner else None)
        if self.refiner is not None:
            check_denoising_end(settings.denoising_end)
        refiner_manifest = self.refiner.manifest if self.refiner is not None else None
        if settings.hashed and settings.hashed != settings.checked_digest(manifest, refiner_manifest):
            raise EngineDirError(f"{engine_dir}: the directory changed after serve checked its files (an export or "
                                 "build into it meanwhile?); start the server again")
        self.served = settings.served_profile(manifest, refiner_manifest)
        """The shapes requests may ask for: the profile's, or those ``serve --height`` (etc.) named,
        and once the engines load, only what all of them take (``taken_by_all``)."""
        wanted = settings.plan_profile(self.served)
        self.image_inputs = takes_init_images(engine_dir, manifest)
        self.guidance_embedded = self.refiner is None and bool(manifest.model_dims.G)
        """A latent consistency model served alone: no unconditional half runs for any row."""
        backend = resolve_backend(settings.backend)
        started = time.perf_counter()
        self.pipeline = load_pipeline(engine_dir, backend, cuda_graph=settings.cuda_graph, verify_files=settings.verify,
                                      graphs=settings.graphs, image_inputs=self.image_inputs, request_profile=wanted)
        self.refining = None
        if self.refiner is not None:
            try:
                self.refining = load_pipeline(self.refiner.engine_dir, backend, cuda_graph=settings.cuda_graph,
                                              verify_files=settings.verify, graphs=settings.graphs,
                                              image_inputs=False,  # it starts from latents: no encoder
                                              request_profile=wanted)
            except BaseException:
                self.pipeline.close()
                raise
        pipelines = [self.pipeline, *([self.refining] if self.refining is not None else [])]
        # The engines may serve less than the directory's profile (a TensorRT plan built narrower),
        # and a refiner less than the base model (served: both profiles' batches and sizes).
        try:
            self.served = served = taken_by_all(self.served, loaded_profiles(pipelines), settings.option)
        except ProfileError:
            self.close()
            raise
        self.max_batch = served.batch[2]
        self.default_size = (served.height[1], served.width[1])
        engines = self.pipeline.profile  # (what the limit's refusal names: 16 times the engines' largest image)
        self.image_limits = ImageLimits.for_profile(
            self.image_inputs, len(self.pipeline.controlnets) * (self.pipeline.dims.K or 1), len(self.pipeline.adapters),
            engines.height[2], engines.width[2])
        names = (settings.engine_name, settings.refiner_name)
        for loaded, name in zip(pipelines, names):  # the images' records name a linked directory as given
            if name:
                loaded.info["engine_dir"] = name
        refined = ""
        if self.refiner is not None:
            refined = f" refined by {names[1] or self.refiner.engine_dir} from {settings.denoising_end:g}"
        log(f"sdexport: loaded {names[0] or engine_dir} ({manifest.family}, {backend}){refined} in "
            f"{time.perf_counter() - started:.1f} s; batch up to {self.max_batch}, sizes "
            f"{served.height[0]}-{served.height[2]} x {served.width[0]}-{served.width[2]}")

    def _check_size(self, height: int, width: int) -> None:
        """Sizes first, before an init image is resized to one (a huge size would allocate gigabytes):
        what every loaded engine takes, narrowed where ``serve`` was told its shapes (a refusal on
        one of those names its option)."""
        self.served.check_request(1, height, width, self.pipeline.dims,
                                  served={axis: self.settings.option(axis) for axis, _ in self.settings.shapes})

    def check(self, row: Row) -> tuple[GenerationRequest, GenerationRequest]:
        """Refuse what ``sdexport run`` would refuse, and what this server does not allow; the row's
        request as the (base) model runs it, and as the model whose images it returns runs it (the
        refiner's half with a refiner, else the same request)."""
        if isinstance(row.steps, int) and row.steps > self.settings.max_steps:
            raise SdexportError(f"steps {row.steps}: this server allows at most {self.settings.max_steps} steps "
                                f"({self.settings.option('max_steps')})")
        if row.denoising_end is not None and self.refiner is None:
            raise SdexportError("denoising_end: this server runs no refiner after the model "
                                f"({self.settings.option('refiner')})")
        request = generation_request([row])  # (images this model does not read: refused as decoded, ImageLimits)
        if self.refiner is None:
            self.pipeline.check(request)
            return request, request
        ensemble = self._ensemble(request, row.denoising_end)
        self.pipeline.check(ensemble.base)  # run's order: the request's own checks, then the windows
        ensemble.check_windows(self.pipeline.scheduler_config)
        self._check_refine(ensemble.refine)
        return ensemble.base, ensemble.refine  # the images are the refiner's: its guidance and aesthetic scores

    def _ensemble(self, request: GenerationRequest, end: float | None) -> Ensemble:
        """The call's two halves, cut at the request's ``denoising_end`` or the server's."""
        assert self.refiner is not None
        end = self.settings.denoising_end if end is None else end
        check_denoising_end(end)
        return self.refiner.ensemble(request, end)

    def _check_refine(self, refine: GenerationRequest) -> None:
        """The refiner's half against its engines, the base model's latents stood in by their shape;
        its refusals say they are the refiner's (the client gave one set of parameters)."""
        from sdexport.runtime.ensemble import check_loaded

        assert self.refining is not None
        try:
            check_loaded(self.refining, refine)
        except SdexportError as exc:
            raise SdexportError(f"the refiner: {exc}") from None

    def generate(self, requests: list[dict[str, Any]], wanted: list[set[str]] | None = None) -> list[list[Generated] | str]:
        """Per request (input name → numpy array, batch first): its images, or the one-line error that
        refused it, naming the inputs the client sent (``init_image``, not ``run``'s ``--init-image``),
        a ``ServerFault`` where the server failed it.
        ``wanted``: the output names each request asked for (default: all)."""
        with settings_named(input_name):
            return self._generate(requests, wanted)

    def _generate(self, requests: list[dict[str, Any]], wanted: list[set[str]] | None) -> list[list[Generated] | str]:
        import numpy as np

        outcome: list[list[Generated | None] | str] = []
        rows: list[tuple[tuple[int, int], Row]] = []
        for index, inputs in enumerate(requests):
            try:
                decoded = decode_rows(inputs, self.default_size, self._check_size, emphasis=self.settings.emphasis,
                                      limits=self.image_limits)
                if len({(row.height, row.width) for row in decoded}) > 1:
                    raise SdexportError("the images of one request must share height and width (their pixels "
                                        "are one tensor): send images of other sizes in requests of their own")
                for n, row in enumerate(decoded):
                    # the family's defaults for the row's task, filled in now: a row that leaves the
                    # guidance or the ControlNet scale out shares a call with the rows that send one
                    # (each image takes its own)
                    try:
                        based, checked = self.check(row)
                    except SdexportError as exc:  # (checked alone: the row says which image, as decoding does)
                        raise SdexportError(f"{exc}{image_of_request(n, len(decoded))}") from None
                    # (with a refiner, its half's default, which the base model's equals for every
                    # task an ensemble runs: test_sdxl_refiner checks that the two tables agree)
                    family = SDXL_REFINER if self.refiner is not None else self.pipeline.family
                    row.chunks = (self.pipeline.chunk_count(based),
                                  self.refining.chunk_count(checked) if self.refining is not None else 0)
                    guidance = row.guidance = checked.guidance_scales(family)[0]
                    if self.guidance_embedded:  # rows share a call whatever their guidance and negatives
                        row.guidance_embedded, row.negative_prompt, row.negative_prompt_2 = True, None, None
                    elif "negative_prompt_2" not in based.texts_read(self.pipeline.zeroes_negatives):
                        row.negative_prompt_2 = None  # (unread: SDXL's zeroed half; rows share a call either way)
                    if row.control_image is not None and row.control_scale is None:  # the base model's
                        row.control_scale = CONTROL_SCALE_DEFAULTS[self.pipeline.family][based.task]
                    if self.refiner is not None:  # the base model's share, as given or the server's
                        row.denoising_end = checked.denoising_start
                    if self.pipeline.family == SDXL_REFINER or self.refiner is not None:  # and the refiner's scores (one
                        # pair a call), the negative only where CFG reads it: rows that differ in an unread one share it
                        score, negative = checked.aesthetic_scores()
                        row.aesthetic_score = score
                        row.negative_aesthetic_score = negative if guidance > 1.0 else None
                if decoded[0].shares_init:  # one call, as run pads the request's texts to its longest's
                    most = (max(r.chunks[0] for r in decoded), max(r.chunks[1] for r in decoded))
                    for row in decoded:
                        row.chunks = most
            except SdexportError as exc:
                outcome.append(str(exc))
                continue
            except Exception as exc:  # a value no check foresaw: this request fails, not the batch
                self.log(f"sdexport: {traceback.format_exc()}")
                outcome.append(ServerFault(f"could not read this request: {one_line(exc)}"))
                continue
            outcome.append([None] * len(decoded))
            rows += [((index, i), row) for i, row in enumerate(decoded)]
        union = union_control_apart(rows, self.pipeline.dims.K or 1) if self.pipeline.dims.N else None
        pooled = settings_apart(rows) if self.pipeline.pooled_controlnets else None

        def apart(owner: tuple[int, int], row: Row) -> Any:
            return (union(owner, row) if union else None, pooled(owner, row) if pooled else None,
                    shared_init_apart(owner, row))

        calls = group_rows(rows, self.max_batch, apart)
        pending = list(calls)
        ran: list[int] = []  # each call's images, retries included, for the log
        failed = 0
        while pending:
            members = [(o, row) for o, row in pending.pop(0) if not isinstance(outcome[o[0]], str)]  # not failed yet
            if not members:
                continue
            ran.append(len(members))
            try:
                result, base = self._call(generation_request([row for _, row in members]), members[0][1].denoising_end)
            except Exception as exc:  # this call's requests fail; the others, and the server, go on
                failed += 1
                owners = list(dict.fromkeys(r for (r, _), _row in members))
                if len(owners) > 1:
                    # one request's rows (a guidance that overflows, say) may have failed a call it
                    # shared: each request again on its own, so that only the one at fault fails
                    self.log(f"sdexport: a call of requests {', '.join(str(r + 1) for r in owners)} failed "
                             f"({one_line(exc)}); each again on its own")
                    pending[0:0] = [[m for m in members if m[0][0] == r] for r in owners]
                    continue
                said = exc.without_path if isinstance(exc, EngineRunError) else one_line(exc)  # (the log has the path)
                message = str(exc) if isinstance(exc, SdexportError) else ServerFault(f"generation failed: {said}")
                if not isinstance(exc, SdexportError):
                    self.log(f"sdexport: {traceback.format_exc()}")
                for (r, _), _row in members:
                    outcome[r] = message
                continue
            for k, ((r, i), row) in enumerate(members):
                slot = outcome[r]
                if isinstance(slot, str):
                    continue
                png = self._png(result, k, base) if wanted is None or "image" in wanted[r] else b""
                for note in row.notes:
                    self.log(f"sdexport: request {r + 1}: {note}")
                slot[i] = Generated(png=png, pixels=np.asarray(result.images[k], dtype=np.uint8))
        if ran:
            self.log(f"sdexport: {len(requests)} request(s), {len(rows)} image(s) in {len(ran)} call(s) of "
                     f"{', '.join(map(str, ran))}" + (f", {failed} of them failed" if failed else ""))
        return [slot if isinstance(slot, str) else [g for g in slot if g is not None] for slot in outcome]

    def _call(self, request: GenerationRequest, end: float | None) -> tuple[Any, Any]:
        """One call: the pipeline's result, or with a refiner the refiner's from the base model's
        latents; and the base model's result (None without a refiner)."""
        from dataclasses import replace

        if self.refining is None:
            return self.pipeline(request), None
        ensemble = self._ensemble(request, end)
        base = self.pipeline(ensemble.base)
        return self.refining(replace(ensemble.refine, init_latents=base.latents)), base

    def _png(self, result: Any, k: int, base: Any = None) -> bytes:
        """The PNG ``run`` writes; with a refiner, the base model's half recorded under "base", as
        ``run --refiner`` records it."""
        from sdexport.runtime.images import image_parameters, png_bytes

        extra = {"base": image_parameters(base, k, base.info)[1]} if base is not None else None
        return png_bytes(result, k, extra)  # (result.info: the pipeline's, as this run used it)

    def close(self) -> None:
        self.pipeline.close()
        if self.refining is not None:
            self.refining.close()


class LogLines(io.TextIOBase):
    """sdexport's console in Triton's model process, as lines of Triton's log.

    What the runtime says while it serves (a prompt cut at the engines' chunks, a decoder's fp32
    rerun, a TensorRT message) went to the model process's stderr, which Triton passes on: onto
    `serve`'s terminal even with -q, and out of the log its help and README name, beside the
    "request N" lines it belongs with (an audit: a client could print a line on the operator's
    console with each request)."""

    def __init__(self, log: Callable[[str], Any]) -> None:
        super().__init__()
        self._log, self._part = log, ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        *lines, self._part = (self._part + text).split("\n")
        for line in lines:
            if line.strip():
                self._log(f"sdexport: {line}")
        return len(text)


class TritonAdapter:
    """``TritonPythonModel``'s three methods over a ``ServedModel``, in Triton's own types."""

    def __init__(self, pb_utils: Any) -> None:
        self.pb = pb_utils
        self.model: ServedModel | None = None

    def initialize(self, args: dict[str, Any]) -> None:
        """Load the model. Where config.pbtxt's instance_group is ``KIND_GPU`` (one instance per GPU,
        each a process of its own), on the GPU Triton gave this instance, before anything touches
        CUDA: the backends take the current device, which would be GPU 0 for every instance."""
        if args.get("model_instance_kind") == "GPU" and args.get("model_instance_device_id") is not None:
            import torch

            torch.cuda.set_device(int(args["model_instance_device_id"]))
        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        logger = getattr(self.pb, "Logger", None)
        log = logger.log_info if logger is not None else print
        if logger is not None:
            from sdexport.console import console

            console.file = cast(IO[str], LogLines(getattr(logger, "log_warn", log)))  # (a text stream rich writes to)
        for key in ServeSettings.unread(parameters):
            log(f"sdexport: config.pbtxt parameter {key!r} is neither sdexport's nor Triton's (upper case), so it "
                "changes nothing: a misspelling? (sdexport's are lower case, e.g. max_steps)")
        try:
            self.model = ServedModel(ServeSettings.from_parameters(parameters), log=log)
        except SdexportError as exc:  # Triton shows the message as the reason the model did not load
            raise RuntimeError(f"sdexport: {exc}") from None

    def execute(self, requests: list[Any]) -> list[Any]:
        assert self.model is not None
        pb = self.pb
        inputs, wanted, cancelled = [], [], []
        for request in requests:
            tensors = {}
            for name in INPUT_NAMES:
                tensor = pb.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    tensors[name] = tensor.as_numpy()
            inputs.append(tensors)
            wanted.append(set(request.requested_output_names()) or {spec.name for spec in OUTPUTS})
            is_cancelled = getattr(request, "is_cancelled", None)
            cancelled.append(bool(is_cancelled()) if is_cancelled is not None else False)
        live = [i for i, c in enumerate(cancelled) if not c]
        results = self.model.generate([inputs[i] for i in live], [wanted[i] for i in live])
        by_index: dict[int, Any] = dict(zip(live, results))
        return [self._response(by_index.get(i, Cancelled("cancelled by the client")), wanted[i]) for i in range(len(requests))]

    def _response(self, result: list[Generated] | str, wanted: set[str]) -> Any:
        import numpy as np

        pb = self.pb
        if isinstance(result, str):  # (an older Triton without the code: its default, INTERNAL)
            code = getattr(pb.TritonError, ERROR_CODES.get(type(result), "INVALID_ARG"), None)
            error = pb.TritonError(result, code) if code is not None else pb.TritonError(result)
            return pb.InferenceResponse(output_tensors=[], error=error)
        tensors = []
        if "image" in wanted:
            tensors.append(pb.Tensor("image", np.array([[g.png] for g in result], dtype=np.object_)))
        if "pixels" in wanted:
            tensors.append(pb.Tensor("pixels", np.stack([g.pixels for g in result])))
        return pb.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        if self.model is not None:
            self.model.close()
