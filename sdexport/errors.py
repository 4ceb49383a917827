"""Errors a user can act on.

Every failure that comes from the user's input (a path, a model, a shape, an engine directory, a
missing optional dependency) is raised as an ``SdexportError``: the CLI prints its message as one
line and exits non-zero, without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re


class SdexportError(Exception):
    """A problem with the user's input or environment, stated so that they can fix it."""


class ModelLoadError(SdexportError):
    """The checkpoint could not be read or is not a supported Stable Diffusion model."""


class ProfileError(SdexportError):
    """A shape profile or a request lies outside what a model or engine supports."""


class ParityError(SdexportError):
    """An exported graph disagrees with its PyTorch module beyond the tolerance."""


class EngineDirError(SdexportError):
    """An engine directory is missing, incomplete or damaged."""


class MissingDependencyError(SdexportError):
    """An optional dependency (TensorRT, onnxruntime-gpu, diffusers for benchmarks) is not installed."""

    def __init__(self, package: str, purpose: str, install: str, too_old: str | None = None) -> None:
        """``too_old``: the version installed, where one is but is older than ``purpose`` needs."""
        missing = f"the {package} installed ({too_old}) is too old" if too_old else "is not installed"
        super().__init__(f"{package} is required {purpose} but {missing}: {install}")
        self.package = package


class EngineRunError(RuntimeError):
    """An engine that loaded failed while it ran: out of memory, a node its runtime cannot execute, a
    device error. The run's failure, not the request's, so not a ``SdexportError``: ``serve`` answers
    it as the server's fault (Triton's INTERNAL), the CLI exits 1, both in one line that names the
    engine and keeps the runtime's own words."""

    def __init__(self, engine: object, runtime: str, exc: BaseException | str) -> None:
        why = one_line(exc) if isinstance(exc, BaseException) else exc
        memory = any(word in why.lower() for word in ("out of memory", "failed to allocate", "bad_alloc"))
        advice = "; a smaller batch or image needs less memory" if memory or isinstance(exc, MemoryError) else ""
        self.without_path = f"{runtime} failed while it ran ({why}){advice}"
        """The message without the engine's file: what a server tells its clients (its log has the path)."""
        super().__init__(f"{engine}: {self.without_path}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI timeout, ``kill``, a container stop), raised where Ctrl-C raises KeyboardInterrupt.

    A KeyboardInterrupt, so everything that cleans up after Ctrl-C does so after SIGTERM too; its own
    type, so that what stops a long job can say which of the two stopped it."""


class HungUp(KeyboardInterrupt):
    """SIGHUP (the terminal closed, an SSH session dropped), raised as SIGTERM is: the job cleans up
    and its stop is named. Under ``nohup`` (SIGHUP ignored) it never comes (``stopping.listening``)."""


def interruption_name(exc: BaseException) -> str:
    """What stopped the job, in the words a report uses: "SIGTERM", "SIGHUP" or "Ctrl-C"."""
    return "SIGTERM" if isinstance(exc, Terminated) else "SIGHUP" if isinstance(exc, HungUp) else "Ctrl-C"


def looks_like_a_url(text: str) -> bool:
    """Whether a path that does not exist was meant as a URL (``https://...``; as a ``Path`` it reads
    ``https:/...``): diffusers' ``load_image`` takes URLs, and users coming from it try them here,
    where "no such file" named a path with its slashes collapsed (an audit)."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", text) is not None


def a_class(name: object) -> str:
    """``name`` (a class name a config gives) with its article: "an AutoencoderKL", "a UNet2DModel"
    (a U as in "you")."""
    text = str(name)
    return f"{'an' if text[:1] in tuple('AEIOaeio') else 'a'} {text}"


def pasteable(path: object) -> str:
    """A path as a command suggested in a message must spell it to work when pasted (quoted where
    it has spaces or shell characters: ``'my models/tiny'``)."""
    import shlex

    return shlex.quote(str(path))


_SOURCE_LOCATION = re.compile(r"/onnxruntime_src/\S+:\d+ ")


def _without_source_location(text: str) -> str:
    """``text`` without ONNX Runtime's C++ source location and the signature after it
    ("/onnxruntime_src/.../model_load_utils.h:46 void onnxruntime::...(const std::unordered_map<...>&,
    ...) "): 250 characters before the reason, which the cut to a line's length then lost."""
    found = _SOURCE_LOCATION.search(text)
    if found is None:
        return text
    rest = text[found.end():]
    opening = rest.find("(")
    if opening > 0 and "::" in rest[:opening]:  # a C++ function's signature: to its closing parenthesis
        depth = 0
        for i in range(opening, len(rest)):
            depth += {"(": 1, ")": -1}.get(rest[i], 0)
            if depth == 0:
                rest = rest[i + 1:].lstrip()
                break
    return f"{text[:found.start()].rstrip()} {rest}"  # ("failed:/onnxruntime_src/...": "failed: ...")


def one_line(exc: BaseException, limit: int = 600) -> str:
    """An exception's whole message on one line.

    Libraries often put the explanation after a colon and a line break ("Error(s) in loading
    state_dict for X:\n\tMissing key(s) ..."): keeping only the first line would cut it off.
    """
    text = _without_source_location(" ".join(str(exc).split()))
    if isinstance(exc, KeyError) and exc.args:
        text = f"missing key {exc.args[0]!r}"
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
