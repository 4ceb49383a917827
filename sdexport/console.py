"""One console for progress and summaries, and quiet third-party loggers.

Long work (loading, tracing, verifying, building, benchmarking) shows a spinner with the step's
name and elapsed time on stderr, so stdout stays clean for tables and paths a script may read.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from rich.console import Console

from sdexport import stopping


def _width(stderr: bool) -> int | None:
    """A table to a file or a pipe is printed whole: rich draws one 80 columns wide without a terminal
    (or ``COLUMNS``), and cuts cells to fit ("passed-cpu-vari…"). The stream itself is asked: CI
    sets ``FORCE_COLOR``, which makes rich take a log for a terminal. ``COLUMNS=0`` (set by some
    shells and editors' terminals) is taken as unset: rich drew everything zero columns wide, which
    printed nothing at all, errors and results alike."""
    import sys

    stream = sys.stderr if stderr else sys.stdout
    try:
        terminal = bool(stream.isatty())
    except (AttributeError, ValueError):  # no stream, or a closed one
        terminal = False
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return None  # (rich reads it)
    if not terminal:
        return 1000
    if not columns.isdigit():
        return None  # (rich asks the terminal)
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class _Console(Console):
    """A console whose reader may go away (``sdexport run ... | head -1``). rich ends the process with
    status 1 from inside the print: an image computed in the same call as the one printed was never
    saved, and no line said why. Here what is printed after the reader left is dropped, and the
    work goes on to its own end and status."""

    def _write_buffer(self) -> None:
        """rich's write, where a terminal that hung up (a closed window, a dropped SSH session) fails
        every write with EIO: the output is dropped from then on, as after a broken pipe, and the
        work ends on its own terms (its SIGHUP's clean-up; a benchmark's report). The write can
        fail before the signal's handler runs: a review's bench in a pty ended with exit 1."""
        import errno

        try:
            super()._write_buffer()
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            from sdexport.stopping import detach_terminal

            detach_terminal()
            self.quiet = True
            del self._buffer[:]

    def on_broken_pipe(self) -> None:
        import contextlib

        self.quiet = True
        with contextlib.suppress(AttributeError, ValueError, OSError):  # (a stream without a descriptor)
            descriptor = self.file.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)  # the stream's own later flushes go nowhere too
            try:
                os.dup2(devnull, descriptor)
            finally:
                os.close(devnull)


console = _Console(stderr=True, highlight=False, soft_wrap=True, emoji=False, width=_width(stderr=True))
"""Progress, notes and summaries (stderr); silent with ``-q``. Lines are never broken here: a
terminal wraps them itself, and a log (80 columns to rich) keeps a quoted prompt whole. No
console here turns ``:fire:`` into an emoji: a path or prompt is printed as the user wrote it
(``escape`` and ``markup=False`` do not stop that)."""
out = _Console(highlight=False, emoji=False, width=_width(stderr=False))
"""Results a script may read (stdout): tables, paths, Markdown."""


def print_result(text: str) -> None:
    """Text a script reads from stdout (a path, a URL, a Markdown report), printed as written: lines
    never broken at 80 columns (rich's width without a terminal), brackets never read as markup (a
    folder named ``[draft]``)."""
    out.print(text, soft_wrap=True, markup=False, highlight=False)

error_console = _Console(stderr=True, highlight=False, emoji=False, width=_width(stderr=True))
"""Errors: printed whatever the verbosity."""

_PRINTABLE = "sdexport.printable"
"""The error handler ``printable_streams`` sets: ``_bytes_or_escape``."""


def printable_streams() -> None:
    """Let stdout and stderr print any path and any text. A path whose name holds bytes that are
    not UTF-8 (Python keeps them as surrogates), or text the streams' encoding lacks (``é`` under
    ``PYTHONIOENCODING=ascii``), stopped ``run`` with a traceback and exit 1 after its images were
    written. Now such a path is printed as its own bytes, as the shell spells it, and other text
    with a backslash escape. For the console script alone (``cli.entry``): a program calling
    sdexport keeps its streams as it set them."""
    import codecs
    import contextlib
    import sys

    codecs.register_error(_PRINTABLE, _bytes_or_escape)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):  # (no stream, a closed one, or not a text file)
            stream.reconfigure(errors=_PRINTABLE)  # type: ignore[union-attr]  # (a TextIOWrapper)


def _bytes_or_escape(error: UnicodeError) -> tuple[str | bytes, int]:
    """A file name's undecodable bytes (``os.fsdecode``'s surrogates) as those bytes; anything else
    the encoding cannot hold as ``\\xe9``, ``\\u2713``."""
    import codecs

    if not isinstance(error, UnicodeEncodeError):
        raise error
    chunk = error.object[error.start:error.end]
    if all(0xDC80 <= ord(character) <= 0xDCFF for character in chunk):
        return bytes(ord(character) - 0xDC00 for character in chunk), error.end
    return codecs.backslashreplace_errors(error)


QUIET, NORMAL, VERBOSE = 0, 1, 2
VERBOSITY = {"quiet": QUIET, "normal": NORMAL, "verbose": VERBOSE}
"""``--verbosity`` names. quiet: results and errors only; normal: sdexport's own progress and notes,
libraries silenced; verbose: also the libraries' warnings, logs and progress bars."""
_verbosity = NORMAL


def verbosity() -> int:
    return _verbosity


def set_verbosity(level: int | str) -> None:
    """Set how much is said on stderr (``-q``/``-v``/``--verbosity``); call before libraries load.

    quiet silences the progress console (errors are printed through ``error_console``); verbose
    leaves the libraries' own warnings and logs on, which normal drops as noise. ``level``: QUIET,
    NORMAL or VERBOSE, or their ``--verbosity`` names.
    """
    global _verbosity
    if isinstance(level, str) and level in VERBOSITY:
        level = VERBOSITY[level]
    if isinstance(level, bool) or not isinstance(level, int):
        from sdexport.errors import SdexportError

        raise SdexportError(f"level: {level!r}; give sdexport.console.QUIET, NORMAL or VERBOSE (or "
                            f"{', '.join(map(repr, VERBOSITY))})")
    _verbosity = max(QUIET, min(VERBOSE, level))
    console.quiet = _verbosity == QUIET
    quiet_libraries()


_QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # diffusers' shard and pipeline bars (tqdm >= 4.66 reads it)
}
_set_here: set[str] = set()
_owns_process = False
"""Set by the commands (``own_process``): what is quieted goes for the whole process. A program
that uses sdexport as a library keeps its own Hub access, FutureWarnings, progress bars and library
log levels (the environment is left as it was)."""

LIBRARY_MODULES = r"(torch|diffusers|transformers|huggingface_hub|onnx|onnxruntime|peft|accelerate|sdexport)(\.|$)"
"""The modules whose FutureWarnings ``quiet_libraries`` drops where sdexport is a library (a warning
is attributed to its caller's module: sdexport's own, calling one of these)."""


def own_process() -> None:
    """For the commands: the whole process is sdexport's, so no Hub lookups (every model is a local
    path, and a lookup waits on a network there is none of), and ``quiet_libraries`` sets the
    libraries' environment (progress bars, log levels) and drops FutureWarnings from any module."""
    global _owns_process
    _owns_process = True
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quiet_libraries() -> None:
    """Silence progress bars and chatter from transformers/diffusers/onnx that would bury ours;
    with ``-v``, undo that (only what was set here: a user's own environment is left alone).

    Environment variables, read when those libraries are first imported, so that commands that never
    need them (``--help``, ``inspect``) do not pay for importing them here; set for the commands only
    (``own_process``), as they reach the program's own use of those libraries and its children.
    """
    loud = _verbosity >= VERBOSE
    for name, value in _QUIET_ENVIRONMENT.items():
        if loud and name in _set_here:
            del os.environ[name]
            _set_here.discard(name)
        elif not loud and name not in os.environ and _owns_process:  # (a program's own bars and logs, and its
            os.environ[name] = value  # children's, are its own: the library leaves the environment alone)
            _set_here.add(name)
    action: Literal["default", "ignore"] = "default" if loud else "ignore"
    warnings.filterwarnings(action, category=FutureWarning, module="" if _owns_process else LIBRARY_MODULES)
    if _owns_process:  # the rest reaches a program's own use of these libraries: the commands' alone (a
        # library user's torch UserWarnings and its loggers' levels were changed too: an audit)
        warnings.filterwarnings(action, category=UserWarning, module=r"(torch|diffusers|transformers)(\.|$)")
        warnings.filterwarnings(action, module=r"pytriton\.")  # (its grpc client's timeout warning, with its path)
        # Pillow's words on an input file (a palette's transparency, a decompression bomb's size), which
        # sdexport reads as it says; a library user's own images are theirs to hear about
        warnings.filterwarnings(action, module=r"PIL\.")
        for name in ("onnx_graphsurgeon", "polygraphy", "torch.onnx"):
            logging.getLogger(name).setLevel(logging.NOTSET if loud else logging.ERROR)
    fetching = logging.getLogger("diffusers.models.modeling_utils")
    if loud:
        fetching.removeFilter(_safetensors_first)
    elif _safetensors_first not in fetching.filters:
        fetching.addFilter(_safetensors_first)


def _safetensors_first(record: logging.LogRecord) -> bool:
    """Drop diffusers' "An error occurred while trying to fetch DIR: Error no file named
    diffusion_pytorch_model.safetensors", logged at error level as it looks for safetensors first in
    a folder of ``.bin`` weights, which it then reads: no error of the user's (a folder with neither
    is refused by sdexport in its own words)."""
    return not (record.levelno == logging.ERROR and str(record.msg).startswith("An error occurred while trying to fetch")
                and "no file named" in record.getMessage())


def onnxruntime_logging(ort: Any) -> int:
    """The verbosity's severity for ONNX Runtime's logs; for the commands, its default logger set to it.

    Its warnings (e.g. "UnsqueezeElimination cannot remove node") are raw ANSI lines about graph
    optimisations that ask nothing of the user, so they show only with ``-v``. The default logger
    also covers sessions that other libraries make (onnx-graphsurgeon's constant folding); it is
    the whole process's, so a library user's is left as it is.
    """
    severity = 2 if _verbosity >= VERBOSE else 3  # 2: warning, 3: error
    if _owns_process:  # (the process's logger: a library user's own sessions were quieted too, an audit;
        ort.set_default_logger_severity(severity)  # sdexport's sessions take the level as an option)
    return severity


def onnxruntime_session_options(ort: Any) -> Any:
    """``ort.SessionOptions`` that log at the verbosity's level (``onnxruntime_logging``) and run
    on the CPU threads ``OMP_NUM_THREADS`` gives, where it is set (``cpu_threads_asked``)."""
    options = ort.SessionOptions()
    options.log_severity_level = onnxruntime_logging(ort)
    threads = cpu_threads_asked()
    if threads:
        options.intra_op_num_threads = threads
    return options


def onnxruntime_run_options(ort: Any) -> Any:
    """``ort.RunOptions`` whose run logs nothing below fatal, except with ``-v``: a node that fails
    is raised with the same words (``EngineRunError`` then says them in sdexport's one line), and
    ONNX Runtime's own raw ANSI copy on stderr would only come first."""
    options = ort.RunOptions()
    options.log_severity_level = 2 if _verbosity >= VERBOSE else 4  # 2: warning, 4: fatal
    return options


def env_switch(name: str, default: bool) -> bool:
    """An on/off environment variable: unset or empty gives ``default``; 0, false, no and off (any
    case) are off, anything else on (``SDEXPORT_TRACEBACK=0`` once turned tracebacks on)."""
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "no", "off")


def cpu_threads_asked() -> int:
    """The CPU threads ``OMP_NUM_THREADS`` asks for (0: not set, or not a count).

    torch reads it and ONNX Runtime does not: its sessions start a thread per physical core, which spin
    while they wait. Beside other busy processes (a CI job's test workers, a server's model
    instances) those threads only contend: two processes each running the tiny model on 2 cores
    took 6.8 to 7.2 s with ONNX Runtime's default, 4.9 to 5.0 s with one thread each. One setting,
    then, for all of sdexport's CPU work.

    At most the CPUs this process may run on, as torch takes it: ONNX Runtime starts every thread
    it is given, and ``OMP_NUM_THREADS=100000`` (a typo, a setting meant for another machine) made
    a run start 17,000 threads and take 17 GB before its first step."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # "4,2": OpenMP's nested levels
    asked = int(value) if value.isascii() and value.isdigit() else 0
    return min(asked, usable_cpus())


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


PROGRESS_LINE_SECONDS = 60.0
"""Where the console is no terminal (a CI log), the time between two lines of a long step's progress
(``StepProgress``): the least, and, while the step says nothing of its own, the most."""

ELAPSED_AFTER_SECONDS = 5.0
"""After how long a step's spinner line shows its time so far."""


class _SpinnerText:
    """A step's spinner line: its description, what it last said of its progress, and from
    ``ELAPSED_AFTER_SECONDS`` on the time so far, read each time rich redraws the line (about ten
    times a second), so the count goes on while the step is inside one long call (an SDXL U-Net's
    trace, a TensorRT build) and says nothing."""

    def __init__(self, description: str, start: float) -> None:
        self.description, self.start = description, start
        self.detail = ""
        """What the step last said, as written (not markup)."""

    def __rich__(self) -> Any:
        elapsed = time.perf_counter() - self.start
        return _progress_text(f"{self.description}…", self.detail,
                              f"({elapsed:.0f} s)" if elapsed >= ELAPSED_AFTER_SECONDS else "")


def _progress_text(description: str, detail: str, elapsed: str) -> Any:
    """``description`` (rich markup, as every step's is) followed by ``detail`` as written and
    ``elapsed`` dimmed: the detail (a TensorRT phase's name) never read as markup, where escaping it
    would show a trailing backslash twice (a review)."""
    from rich.text import Text

    text = Text.from_markup(description)
    if detail:
        text.append(" " + detail)
    if elapsed:
        text.append(" " + elapsed, style="dim")
    return text


def spinner_drawn() -> bool:
    """Whether rich draws a step's spinner line: a terminal (or what ``FORCE_COLOR`` makes one),
    not a dumb one (``TERM=dumb``: an editor's shell buffer, where rich draws no spinner)."""
    return console.is_terminal and not console.is_dumb_terminal


class StepProgress:
    """What a long step says of its progress as it goes (a TensorRT build's phases), beside its
    description: on a terminal, on the step's spinner line, replaced at each call; elsewhere (a CI
    log, where the spinner draws nothing) as a line with the time so far, at most one every
    ``PROGRESS_LINE_SECONDS`` and, while the step says nothing (one long call: an SDXL export's
    trace), at least one (``heartbeat``): a 20-minute build or export shows it is alive, without
    flooding the log, to the reader and to a CI that ends jobs silent for too long. Any thread may
    call it (TensorRT may call its progress monitor from threads of its own)."""

    def __init__(self, line: _SpinnerText) -> None:
        import threading

        self._line = line
        """The step's spinner line: its description, start and latest detail, drawn or not."""
        self._lock = threading.Lock()
        self._last_line = line.start

    def __call__(self, detail: str) -> None:
        self._line.detail = detail
        if not spinner_drawn():
            self._say(due=PROGRESS_LINE_SECONDS)

    def _say(self, due: float) -> None:
        """A line with the latest detail, where ``due`` seconds have passed since the last one."""
        with self._lock:
            now = time.perf_counter()
            if now - self._last_line < due:
                return
            self._last_line = now
        line = self._line
        console.print(_progress_text(f"  {line.description}:", line.detail or "still running",
                                     f"({now - line.start:.0f} s so far)"))

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Where the console is a log (no terminal, not quiet), a thread that says the step is still
        going each ``PROGRESS_LINE_SECONDS`` in which nothing else was said (not under a second:
        a line a second would be a flood)."""
        import threading

        interval = PROGRESS_LINE_SECONDS
        if spinner_drawn() or console.quiet or interval < 1:
            yield
            return

        done = threading.Event()

        def beat() -> None:
            while not done.wait(interval):
                self._say(due=interval)

        thread = threading.Thread(target=beat, name="sdexport-step-heartbeat", daemon=True)
        try:  # (start inside: a stop raised as it returns must still end the thread)
            thread.start()
            yield
        finally:
            done.set()
            if thread.ident is not None:  # (started)
                thread.join(timeout=5)


@contextmanager
def step(description: str) -> Iterator[StepProgress]:
    """Show ``description`` with a spinner while the block runs (with the time so far, after a few
    seconds), then a line with its duration; the block may say how far it has got through the
    ``StepProgress`` it is given.

    Each end of a step is also where a Ctrl-C or SIGTERM whose KeyboardInterrupt was dropped on the
    way (``sdexport.stopping``) stops the job: within a step, not after every step has run."""
    stopping.check()
    start = time.perf_counter()
    line = _SpinnerText(description, start)
    with console.status(line):
        progress = StepProgress(line)
        with progress.heartbeat():
            yield progress
    console.print(f"[green]✓[/] {description} [dim]({time.perf_counter() - start:.1f} s)[/]")
    stopping.check()
