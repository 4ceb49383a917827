"""``sdexport loadtest``: N concurrent clients against a served model, for a bounded count or time.

Each client is a thread with its own HTTP connection that sends one request, waits for the answer
and sends the next (a closed loop: the offered load follows the server's speed, as many real
clients behave). It reports what a capacity plan needs: images per second, request latency
percentiles, errors by message, and how many requests each server-side batch held (from Triton's
own statistics, before and after). A benchmark, not a test: it reports numbers and asserts nothing.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdexport.errors import SdexportError
from sdexport.serving.protocol import MODEL_NAME

IMAGE_FLAGS = {"init_image": "--init-image", "mask": "--mask"}
"""The image inputs a load test can send, and the flags that name their files."""
MAX_CLIENTS = 1024
"""The most concurrent clients one load test starts (``--concurrency``)."""
MAX_DURATION_S = 30 * 24 * 3600.0
"""The longest ``--duration``: a thread's join takes at most ``threading.TIMEOUT_MAX`` (about 292
years here, less elsewhere), and no load test is meant to outlast a month."""
LATE_S = 60.0
"""With ``--duration``, how long after its end the run waits for requests still unanswered; those
are then counted apart ("unanswered ... after --duration ended"), where a server that never answered
held ``--duration 3`` for the whole request timeout."""
REFUSED_RUN = 2
"""Answers per client, every one the same refusal (HTTP 400: a setting the server's limits refuse,
which the client cannot know beforehand) and none a success, after which the run ends: it went on
sending the same refused request hundreds of times a second for the whole ``--duration``."""

GONE = "the server refused connections (stopped, or restarting)"
ALL_REFUSED = "the server refused every request, with the same answer (see the errors)"
"""Why a run ended before its count or duration (``ended_early_why``): every request after would
have failed as well."""


class LoadStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during the load: ``report`` is what was answered before (marked
    ``interrupted_s``), for the caller to keep; then ``stop`` goes on (a KeyboardInterrupt, so a
    program that does not look for the report stops as before)."""

    def __init__(self, report: dict[str, Any], stop: KeyboardInterrupt) -> None:
        super().__init__()
        self.report, self.stop = report, stop


def check_url(url: str) -> None:
    """``--url`` as tritonclient takes it: host:port, an IPv6 address in brackets. It fails on
    anything else with a traceback of its own (on ``::1:8000``, an AttributeError from its
    ``__del__``)."""
    from urllib.parse import urlsplit

    if "://" in url:
        raise SdexportError(f"--url {url}: host:port only, without the scheme (e.g. localhost:8000)")
    if url.count(":") > 1 and not url.startswith("["):
        raise SdexportError(f"--url {url}: write an IPv6 address in brackets, e.g. [::1]:8000")
    parts = urlsplit(f"//{url}")
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = None
    if port is None or not parts.hostname:
        raise SdexportError(f"--url {url}: need host:port, e.g. localhost:8000")
    if parts.path or parts.query or parts.fragment:  # (serve prints .../v2/models/sdexport: told "not ready")
        raise SdexportError(f"--url {url}: host:port only, without a path (e.g. {parts.netloc}; the model is --model)")


@dataclass(frozen=True)
class LoadPlan:
    url: str = "localhost:8000"
    model: str = MODEL_NAME
    concurrency: int = 4
    requests: int = 16
    """Stop after this many requests in all (0: no count limit)."""
    duration_s: float = 0.0
    """Stop sending after this many seconds (0: no time limit)."""
    prompts_per_request: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    """Image inputs sent with every request, input name → file: an init image (img2img, and the SDXL
    refiner, which takes nothing else) and a mask (inpainting)."""
    timeout_s: float = 600.0
    """How long a request may go unanswered (a timeout error); with ``duration_s`` the run itself
    waits at most ``LATE_S`` past its end."""

    def check(self) -> dict[str, bytes]:
        """Refuse a plan no server could answer, before any request; return the image inputs' bytes
        as checked. Each file is read once: the requests send the bytes that were checked, so a
        file changed meanwhile cannot send what was not."""
        if self.concurrency < 1:
            raise SdexportError(f"--concurrency {self.concurrency}: need at least 1 client")
        if self.concurrency > MAX_CLIENTS:  # (a thread and a connection each)
            raise SdexportError(f"--concurrency {self.concurrency}: at most {MAX_CLIENTS} clients (each a thread with "
                                "its own connection); run several load tests for more")
        if self.requests < 0:
            raise SdexportError(f"--requests {self.requests}: cannot be negative")
        if not (math.isfinite(self.duration_s) and self.duration_s >= 0):  # nan would never end the run
            raise SdexportError(f"--duration {self.duration_s}: need a finite number of seconds, 0 or more")
        if self.duration_s > MAX_DURATION_S:  # (1e10 passed, and the wait for the clients was an OverflowError)
            raise SdexportError(f"--duration {self.duration_s:g}: at most {MAX_DURATION_S:.0f} seconds (30 days)")
        if not self.requests and not self.duration_s:
            raise SdexportError("give --requests or --duration (or both): a load test needs a bound")
        if "denoising_end" in self.params:
            from sdexport.runtime.ensemble import check_denoising_end

            check_denoising_end(self.params["denoising_end"])
        check_url(self.url)
        if self.prompts_per_request < 1:
            raise SdexportError(f"--batch {self.prompts_per_request}: need at least 1 image per request")
        if ("height" in self.params) != ("width" in self.params) and self.images:  # (one alone: as serve takes it)
            raise SdexportError("--height and --width: with --init-image, give both, or neither (the image's size)")
        from sdexport.serving.client import check_numbers

        try:  # what the inputs' tensors cannot hold, refused before a request, in the options' names
            check_numbers(self.params, lambda name: f"--{name.replace('_', '-')}")
        except ValueError as exc:
            raise SdexportError(str(exc)) from None
        # what no model takes, said here rather than after the server is asked (or found absent)
        if self.params.get("steps", 1) < 1:
            raise SdexportError(f"--steps {self.params['steps']}: need at least 1 step")
        guidance = self.params.get("guidance", 0.0)
        if not (math.isfinite(guidance) and guidance >= 0):
            raise SdexportError(f"--guidance {guidance}: need a finite number, 0 or more")
        if "init_image" not in self.images:
            if "mask" in self.images:
                raise SdexportError("--mask needs --init-image: the mask says where the init image is repainted")
            if "strength" in self.params:
                raise SdexportError("--strength needs --init-image: it says how far the init image is noised")
            return {}
        strength = self.params.get("strength")
        if strength is not None and not (math.isfinite(strength) and 0 < strength <= 1):
            raise SdexportError(f"--strength {strength}: need a number above 0 and at most 1")
        return self._check_images()

    def _check_images(self) -> dict[str, bytes]:
        """The files readable and of one size, the request's, before any request is sent: the load
        test sends them as they are (a server refuses an image of another size), so a mistake here
        would fail every request of the run."""
        from sdexport.runtime.image_inputs import decode_image

        paths = {name: Path(path) for name, path in self.images.items()}
        files = {name: _read_file(path, IMAGE_FLAGS[name]) for name, path in paths.items()}
        sizes = {name: decode_image(data, f"{IMAGE_FLAGS[name]} {paths[name]}",
                                    mode="L" if name == "mask" else "RGB").size
                 for name, data in files.items()}
        width, height = sizes["init_image"]
        if sizes.get("mask", (width, height)) != (width, height):
            mask_width, mask_height = sizes["mask"]
            raise SdexportError(f"--mask is {mask_height}x{mask_width} (HxW), --init-image {height}x{width}: "
                                "give a mask of the init image's size")
        asked = (self.params.get("height", height), self.params.get("width", width))
        if asked != (height, width):
            raise SdexportError(f"--height/--width {asked[0]}x{asked[1]}, but --init-image is {height}x{width} "
                                "(HxW): leave them out (the image's size is used), or give an image of that size")
        return files


def _read_file(path: Path, flag: str) -> bytes:
    """A file's bytes, or one line saying why not."""
    if not path.is_file():
        raise SdexportError(f"{flag} {path}: " + ("a directory; give an image file" if path.is_dir() else "no such file"))
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SdexportError(f"{flag} {path}: cannot be read ({exc.strerror or exc})") from None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks (numpy's default);
    None without values (JSON has no NaN)."""
    import numpy as np

    if not values:
        return None

    return float(np.percentile(values, q))


def run_load(plan: LoadPlan, prompt: str, files: dict[str, bytes] | None = None) -> dict[str, Any]:
    """Drive the load and return the report (see ``markdown`` for its fields in words).

    ``files``: what ``plan.check()`` returned, for a caller that checked the plan already (the CLI
    does, before it claims its output folder); without it the plan is checked here."""
    import tritonclient.http as http

    from sdexport import stopping
    from sdexport.serving.client import infer_inputs, missing_images

    if files is None:
        files = plan.check()
    prompts = [prompt] * plan.prompts_per_request
    with http.InferenceServerClient(plan.url, connection_timeout=10) as probe:
        try:
            if not probe.is_model_ready(plan.model):
                raise SdexportError(f"{plan.url}: model {plan.model!r} is not ready" + _not_ready_why(probe, plan.model))
        except SdexportError:
            raise
        except Exception as exc:
            raise SdexportError(f"{plan.url}: no Triton server answers there ({exc})") from None
        before = _readable_stats(probe, plan.model)
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    refusals = 0  # answers that were HTTP 400 refusals
    issued = 0
    ended = False  # (the report is made: a straggler answering later records nothing)
    # (when and why the run ended before its count or duration: every request after would fail too)
    early: tuple[float, str] | None = None
    started = time.perf_counter()

    def take() -> bool:
        nonlocal issued
        with lock:
            if ended or early is not None or plan.requests and issued >= plan.requests:
                return False
            if plan.duration_s and time.perf_counter() - started >= plan.duration_s:
                return False
            issued += 1
            return True

    inputs = infer_inputs(prompts, http, **plan.params, **files)  # the same request every time, made once

    def client() -> None:
        nonlocal early, refusals
        with http.InferenceServerClient(plan.url, connection_timeout=plan.timeout_s,
                                        network_timeout=plan.timeout_s) as connection:
            while take():
                sent, refused = time.perf_counter(), False
                try:
                    result = connection.infer(plan.model, inputs,
                                              outputs=[http.InferRequestedOutput("image", binary_data=True)])
                    message = missing_images(result.as_numpy("image"), plan.prompts_per_request)
                except ConnectionRefusedError as exc:  # (no server there now: the run ends, said in the report)
                    message = _message(exc)
                    with lock:
                        early = early or (time.perf_counter() - started, GONE)
                except Exception as exc:  # the server's message, counted, and the client goes on
                    message = _message(exc)
                    refused = _status(exc) == "400"
                with lock:
                    if ended:
                        return
                    if message is not None:
                        errors[message] = errors.get(message, 0) + 1
                        refusals += refused
                    else:
                        latencies.append(time.perf_counter() - sent)
                    left = not plan.requests or issued < plan.requests  # (the last one sent ends nothing early)
                    if left and not latencies and len(errors) == 1 and refusals >= REFUSED_RUN * clients:
                        early = early or (time.perf_counter() - started, ALL_REFUSED)

    # no more clients than requests (a count bounds a duration's run too): the rest would only open a
    # connection and find none left
    clients = min(plan.concurrency, plan.requests) if plan.requests else plan.concurrency
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    deadline = started + plan.duration_s + LATE_S if plan.duration_s else None
    stop: KeyboardInterrupt | None = None
    try:
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.perf_counter()))
    except KeyboardInterrupt as exc:  # (Ctrl-C, SIGTERM: what was answered before is reported, then it stops)
        stopping.take()  # (acted on here: the report's writing is not stopped again)
        stop = exc
    with lock:  # what was answered by now; requests still out are counted apart, and their clients left
        ended = True
        late = issued - len(latencies) - sum(errors.values())
        if late:
            errors["unanswered when stopped" if stop else f"unanswered {LATE_S:g} s after --duration ended"] = late
    wall = time.perf_counter() - started
    done = len(latencies)
    after: dict[str, int] | None = None
    if before is not None and stop is None:
        try:
            with http.InferenceServerClient(plan.url, connection_timeout=10) as probe:
                after = _settled_stats(probe, plan.model, before["inferences"] + done * plan.prompts_per_request)
        except Exception:  # the server went away at the end: the client-side figures still stand
            pass
        except KeyboardInterrupt as exc:  # (stopped while the counters settle: the run itself was whole)
            stopping.take()
            stop = exc
    executions = after["executions"] - before["executions"] if after and before else 0
    inferences = after["inferences"] - before["inferences"] if after and before else 0
    report = {
        "url": plan.url, "model": plan.model, "concurrency": plan.concurrency, "clients": clients,
        "images_per_request": plan.prompts_per_request,
        "params": {**{k: v for k, v in plan.params.items() if not isinstance(v, bytes | list)}, **plan.images},
        "requests": done + sum(errors.values()), "succeeded": done, "errors": errors,
        "ended_early_s": early[0] if early else None, "ended_early_why": early[1] if early else None,
        "interrupted_s": wall if stop else None, "wall_s": wall,
        "requests_per_s": done / wall if wall else 0.0,
        "images_per_s": done * plan.prompts_per_request / wall if wall else 0.0,
        "latency_s": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                      "p99": percentile(latencies, 99), "max": max(latencies) if latencies else None,
                      "mean": sum(latencies) / done if done else None},
        "server": {"executions": executions, "inferences": inferences,
                   "images_per_execution": inferences / executions if executions else None}
        if after is not None else None,
    }
    if stop is not None:
        raise LoadStopped(report, stop)
    return report


def _not_ready_why(probe: Any, model: str) -> str:
    """Why ``model`` is not ready, where the server says: unknown to it (another ``--model``), or
    its own state (loading, failed)."""
    try:
        probe.get_model_metadata(model)
    except Exception as exc:
        return f" ({_message(exc)})"
    return " (still loading, or failed: the server's log says which)"


def _message(exc: Exception) -> str:
    """A client error on one line: tritonclient's exceptions carry the server's text in ``message()``."""
    text = exc.message() if callable(getattr(exc, "message", None)) else str(exc)  # type: ignore[attr-defined]
    return " ".join(str(text).split())[:300]


def _status(exc: Exception) -> str | None:
    """The HTTP status of a tritonclient error ("400": the server refused the request), if any."""
    status = getattr(exc, "status", None)
    return str(status()) if callable(status) else None


def _readable_stats(client: Any, model: str) -> dict[str, int] | None:
    """Triton's counters before the run; None where the server keeps them to itself (PyTriton
    restricts the statistics endpoint by default, as ``--http-restricted-api`` does): the load runs,
    and the report has no batching figures, as when they are gone at the end."""
    try:
        return _batch_stats(client, model)
    except Exception:
        return None


def _batch_stats(client: Any, model: str) -> dict[str, int]:
    """Triton's counters: model executions (batches) and inferences (images) so far."""
    stats = client.get_inference_statistics(model)["model_stats"]
    return {"executions": sum(int(s.get("execution_count", 0)) for s in stats),
            "inferences": sum(int(s.get("inference_count", 0)) for s in stats)}


STATS_SETTLE_S = 5.0
"""How long the counters may lag the last answer. Triton sends a batch's responses before it counts
the batch (triton-inference-server/server#5670), so a read right after the last answer can miss the
last batch: 4 of 6 images were counted once in this project's tests."""


def _settled_stats(client: Any, model: str, served: int) -> dict[str, int]:
    """Triton's counters once they count ``served`` inferences (every image answered), read again
    every 50 ms for up to ``STATS_SETTLE_S``; then as they are (another client's traffic can only
    add to them)."""
    deadline = time.monotonic() + STATS_SETTLE_S
    while True:
        stats = _batch_stats(client, model)
        if stats["inferences"] >= served or time.monotonic() >= deadline:
            return stats
        time.sleep(0.05)


def _figure(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    latency = report["latency_s"]
    server = report["server"] or {}
    lines = [
        f"# Load test: {report['model']} at {report['url']}",
        "",
        f"{report['clients']} concurrent clients"
        + (f" ({report['concurrency']} asked: no more than the requests)" if report["clients"] != report["concurrency"] else "")
        + f", {report['images_per_request']} image(s) per request, "
        f"{report['requests']} requests in {report['wall_s']:.1f} s; settings: "
        + (", ".join(f"{k}={v}" for k, v in report["params"].items()) or "the model's defaults") + ".",
        "",
        "| succeeded | errors | requests/s | images/s | p50 s | p95 s | p99 s | max s | images per batch |",
        "|---|---|---|---|---|---|---|---|---|",
        (f"| {report['succeeded']} | {sum(report['errors'].values())} | {report['requests_per_s']:.3f} | "
         f"{report['images_per_s']:.3f} | {_figure(latency['p50'])} | {_figure(latency['p95'])} | "
         f"{_figure(latency['p99'])} | {_figure(latency['max'])} | {_figure(server.get('images_per_execution'), 2)} |"),
        "",
        ("Latency is per request, measured by the client from send to answer; images per batch is Triton's "
         "inference count over its execution count for the run, refused requests included (1.00: no "
         "request shared a batch; -: the server's statistics were not available)."),
    ]
    if report.get("ended_early_s") is not None:
        why = report.get("ended_early_why") or GONE  # (reports before the reason was recorded)
        lines += ["", (f"**Ended early**: {why} {report['ended_early_s']:.1f} s into the run, which then ended; "
                       "the figures cover the time before.")]
    if report.get("interrupted_s") is not None:
        lines += ["", (f"**Interrupted** {report['interrupted_s']:.1f} s into the run (Ctrl-C or SIGTERM): the "
                       "figures cover the time before.")]
    if report["errors"]:
        lines += ["", "Errors:", ""] + [f"- {count}x {message}" for message, count in report["errors"].items()]
    return "\n".join(lines) + "\n"
