"""``sdexport serve``: the repository of ``repository`` under the ``tritonserver`` that PyTriton ships.

PyTriton does what is fiddly about running Triton from a Python environment: it copies the server,
puts the Python-backend stub built for this Python version beside it, points the stub at this
environment (so the model imports sdexport and its backend), starts and health-checks the server,
and stops it with SIGINT so that requests in flight finish (up to ``exit_timeout_secs``). Our model
is not bound through PyTriton's ``bind`` (its errors fail a whole batch and arrive as tracebacks);
it is a plain Python-backend model in the repository we hand it, which the stock server loads too.

Three things PyTriton does not do, done here: the stub finds ``libpython`` through the loader's
search path, and a Python built elsewhere (pyenv, a venv over it) must put its own library directory
first or the stub loads the system's ``libpython`` of another patch release (seen here:
"'_thread.RLock' object has no attribute '_recursion_count'"); the stub's Python reads file names
as ASCII, whatever the environment says (``serving.names`` links a directory named otherwise); and
PyTriton's stub is built against numpy 1.x, so with numpy 2 in the environment tensors arrive
garbled: refused up front.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdexport.errors import SdexportError


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002
    address: str = "0.0.0.0"


def check_serving_installed() -> None:
    """The serve extra, and a numpy the stub can read, before anything is loaded."""
    import importlib.util

    missing = [name for name in ("pytriton", "tritonclient") if importlib.util.find_spec(name) is None]
    if missing:
        raise SdexportError(f"{' and '.join(missing)} not installed: serving needs the serve extra "
                            "(bash scripts/setup.sh --serve, or pip install 'sdexport[serve]')")
    from importlib.metadata import version

    if int(version("numpy").split(".")[0]) >= 2:
        raise SdexportError(f"numpy {version('numpy')} is installed, but PyTriton's Triton stub is built against "
                            "numpy 1.x and garbles tensors under numpy 2: pip install 'numpy<2' (the serve "
                            "extra's pin; README, \"Serve: Triton Inference Server\")")


def check_client_installed() -> None:
    """tritonclient, all a client of a served model needs (``loadtest`` against any Triton server):
    not PyTriton, nor the numpy 1.x its stub needs."""
    try:
        import tritonclient.http  # noqa: F401 - raises without its http extra's packages
    except Exception:  # noqa: BLE001 - ImportError, or tritonclient's own RuntimeError naming the extra
        raise SdexportError("tritonclient's HTTP client is not installed: a client of a served model needs it "
                            "(pip install 'tritonclient[http]', or the serve extra)") from None


def listen_address(address: str) -> str:
    """``--address`` as Triton can listen on it and PyTriton wait on it: a numeric IPv4 address.

    Triton's HTTP server reads its address as ``inet_addr`` does: ``localhost`` became
    255.255.255.255, nothing answered, and the start ran into its timeout with a log line for a
    reason. So a name is resolved here (to its first IPv4 address). PyTriton polls the server at
    ``http://ADDRESS:PORT``, which an IPv6 address breaks (``http://::1:8000``): refused."""
    import ipaddress
    import socket

    try:
        literal = ipaddress.ip_address(address)
    except ValueError:
        literal = None
    four = "give an IPv4 address (127.0.0.1: this machine only; 0.0.0.0: all interfaces)"
    if literal is not None and literal.version == 6:
        raise SdexportError(f"--address {address}: an IPv6 address, which PyTriton cannot wait on; {four}")
    if literal is not None:
        return str(literal)
    try:
        found = socket.getaddrinfo(address, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        with contextlib.suppress(socket.gaierror, UnicodeError):
            if socket.getaddrinfo(address, None, type=socket.SOCK_STREAM):  # (no DNS is asked for a bad name)
                raise SdexportError(f"--address {address}: a name with IPv6 addresses only, which PyTriton "
                                    f"cannot wait on; {four}") from None
        raise SdexportError(f"--address {address}: not an address to listen on ({exc}); {four}") from None
    return str(found[0][4][0])


def check_ports(ports: Ports) -> None:
    """Refuse ports that clash or cannot be listened on at ``ports.address`` (``listen_address``'s)."""
    numbers = (ports.http, ports.grpc, ports.metrics)
    for number in numbers:
        if not 1 <= number <= 65535:
            raise SdexportError(f"port {number}: ports are 1-65535")
    if len(set(numbers)) != 3:
        raise SdexportError(f"--http-port, --grpc-port and --metrics-port must differ (got {numbers})")
    import errno
    import socket

    where = "" if ports.address == "0.0.0.0" else ports.address  # (every IPv4 interface)
    for flag, number in (("--http-port", ports.http), ("--grpc-port", ports.grpc), ("--metrics-port", ports.metrics)):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((where, number))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:  # the address first: a port is blamed only for what is the port's
                raise SdexportError(f"--address {ports.address}: no network interface of this machine has that "
                                    "address (0.0.0.0: all of them; 127.0.0.1: this machine only)") from None
            raise SdexportError(f"{flag} {number}: cannot listen there ({exc.strerror}); is another server "
                                "running? choose another port") from None


def stub_environment() -> None:
    """Put this Python's own libpython first on the loader's path, for the stub Triton starts."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir).is_dir():
        current = os.environ.get("LD_LIBRARY_PATH", "")
        if libdir not in current.split(":"):
            os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def server_output_to_stderr() -> None:
    """Send what the Triton process writes (its whole log, under ``-v`` where no log file takes it)
    to stderr: PyTriton reads it and hands each line to ``print``, onto stdout, which sdexport keeps
    for results. Its module's ``print`` is replaced (a module global shadows the builtin); PyTriton
    prints nothing else there."""
    import pytriton.server.triton_server as server

    server.print = _print_to_stderr  # type: ignore[attr-defined]


TRITON_SIGNAL_LINE = re.compile(r"Signal \(\d+\) received\.\s*")
"""What tritonserver writes to its console (not its log) as it is stopped: the one line of Triton's
that reached the terminal without ``-v`` (the log file takes the rest), after serve's own."""

_console_line: list[str] = []
"""The line PyTriton is handing over: it passes what Triton writes as it comes (one character at a
time, seen with PyTriton 0.7.0), so a line is judged once it is whole."""


def _flush_console_line() -> None:
    """What Triton wrote last without ending its line, shown as it is (once the server has stopped)."""
    if _console_line:
        print("".join(_console_line), file=sys.stderr)
        _console_line.clear()


def _print_to_stderr(*values: object, **options: Any) -> None:
    text = "".join(map(str, values)) + options.get("end", "\n")
    while "\n" in text:
        head, text = text.split("\n", 1)
        line = "".join(_console_line) + head + "\n"
        _console_line.clear()
        if not TRITON_SIGNAL_LINE.fullmatch(line):
            print(line, end="", file=sys.stderr)  # sys.stderr as it is now (a test's capture too)
    if text:
        _console_line.append(text)


def nvml_starts() -> bool:
    """Whether NVIDIA's management library starts here: what Triton's GPU metrics (DCGM) need. Where
    it does not (no GPU or no driver), asking for them only prints "Error: Failed to initialize
    NVML" on the console at every start, outside the log: they are asked for only where they work."""
    import ctypes

    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        started = nvml.nvmlInit_v2() == 0  # NVML_SUCCESS
    except (OSError, AttributeError):  # no driver library, or one without the call
        return False
    if started:
        nvml.nvmlShutdown()
    return started


TRITON_LOG_LINE = re.compile(rb"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ")
"""How each line of Triton's log begins (glog's: severity, month and day, time)."""


def check_log_file(path: Path) -> None:
    """Refuse a ``--log-file`` that holds something else: Triton adds its log to an existing file,
    which is right for the log of an earlier ``serve`` (restarts keep one log) and would damage any
    other file (an image, a config). Empty, missing, or starting with a line of Triton's log: taken;
    so is what is not a regular file (``/dev/stdout``, a FIFO a collector reads), never read here:
    opening one to look could wait forever."""
    import stat

    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return
        with path.open("rb") as handle:
            head = handle.read(64)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SdexportError(f"--log-file {path}: cannot be read ({exc.strerror}); give another file") from None
    if head and not TRITON_LOG_LINE.match(head):
        raise SdexportError(f"--log-file {path}: exists and is not a Triton log (Triton would add its log to "
                            "the end of it); give a new file name, or the log of an earlier serve")


EXIT_MARGIN_S = 60
"""What Triton may take past its drain to unload the model (its engines leave the device) and exit."""


def pytriton_waits(startup_timeout_s: int, drain_timeout_s: int) -> None:
    """PyTriton's own waits, set to the server's: it waits 120 s for the server to turn ready
    (loading large engines can take longer), and after its SIGINT 30 s for the server to exit
    before it kills it (``SERVER_OUTPUT_TIMEOUT_SECS``, read when it stops), which cut every
    ``--drain-timeout`` over about 30 s short, dropping the requests it was to let finish."""
    import pytriton.server.triton_server
    import pytriton.triton

    pytriton.triton.DEFAULT_TRITON_STARTUP_TIMEOUT_S = startup_timeout_s  # type: ignore[attr-defined]
    pytriton.server.triton_server.SERVER_OUTPUT_TIMEOUT_SECS = drain_timeout_s + EXIT_MARGIN_S


@contextlib.contextmanager
def stoppable_children() -> Iterator[None]:
    """Children started inside stop on SIGINT, where this process ignores it (a script's background
    job): ``tritonserver`` inherits an ignored SIGINT until it installs its own handler, after the
    model has loaded, so PyTriton's stop (a SIGINT) did nothing during the load and it waited the
    drain plus a minute before it killed the server (an audit: SIGTERM 1 s into the load ended
    ``serve`` after 68 s). A handler that does nothing here instead: this process still ignores
    SIGINT, and ``exec`` gives a handled signal back its default in the child. (Only the main thread
    may set handlers: elsewhere nothing changes.)"""
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGINT, _ignored)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ignored(number: int, frame: object) -> None:
    """SIGINT, ignored by this process as its parent asked (see ``stoppable_children``)."""


def run_server(repository: Path, ports: Ports, *, startup_timeout_s: int, drain_timeout_s: int,
               log_file: Path | None, on_ready: Callable[[], None]) -> None:
    """Start Triton over ``repository``, call ``on_ready`` once every model is loaded, and serve until
    interrupted (Ctrl-C, SIGTERM, SIGHUP), then let requests in flight finish. ``log_file``: where
    Triton's log goes (None: this process's output)."""
    import pytriton.triton
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    stub_environment()
    server_output_to_stderr()
    pytriton_waits(startup_timeout_s, drain_timeout_s)
    config = TritonConfig(
        model_repository=repository, http_port=ports.http, grpc_port=ports.grpc, metrics_port=ports.metrics,
        http_address=ports.address, grpc_address=ports.address, metrics_address=ports.address,
        exit_timeout_secs=drain_timeout_s, strict_readiness=True, log_file=log_file,
        allow_gpu_metrics=nvml_starts(),
    )
    # PyTriton guards the endpoints that change or expose the server with a random token; statistics
    # (read-only, what `sdexport loadtest` reports batching from) are opened like the metrics port.
    guarded = [e for e in pytriton.triton.DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"]
    with pytriton_workspace() as workspace:
        triton = Triton(config=config, workspace=workspace,
                        security_config=TritonSecurityConfig(restricted_endpoints=guarded))
        try:
            _serve(triton, log_file, on_ready, drain_timeout_s)
        except SdexportError as exc:
            if not str(exc).startswith(NOT_STARTED):
                raise
            try:  # (a second serve on the same ports, started while the first loaded: PyTriton polled the
                check_ports(ports)  # first's server and was told "[403] This API is restricted")
            except SdexportError as taken:
                raise SdexportError(f"{taken} (taken while Triton started)") from None
            if "ready timed out" in str(exc):  # (PyTriton's words: the server never turned ready in time)
                raise SdexportError(f"{exc.args[0].rstrip('.')} within --startup-timeout {startup_timeout_s} s: give "
                                    "it more where the model takes longer to load") from None
            raise


@contextlib.contextmanager
def pytriton_workspace() -> Iterator[Path | None]:
    """Where PyTriton puts the server's files (copies of ``tritonserver``, its Python backend and stub,
    about 22 MB, run from there): its own home where that can be made and written (None:
    ``$PYTRITON_HOME``, else ``$XDG_CACHE_HOME/pytriton`` or ``~/.cache/pytriton``), else a temporary
    folder, removed after. Without the fallback an unwritable home failed with a line naming it, and
    no home at all (a container's arbitrary uid) made a folder named ``$HOME`` in the working
    directory and a stub Triton could not start, waited for until the start-up timeout (an audit).
    Not always the temporary folder: many hosts mount it noexec (a review)."""
    from pytriton.constants import PYTRITON_HOME

    if os.environ.get("PYTRITON_HOME") or _usable(PYTRITON_HOME):  # (one the user set is theirs to mend)
        yield None
        return
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="sdexport-pytriton-"))
    try:
        if os.statvfs(folder).f_flag & os.ST_NOEXEC:
            raise SdexportError(f"PyTriton's home {PYTRITON_HOME} cannot be written, and the temporary folder "
                                f"{folder.parent} is mounted noexec, where Triton cannot run: set PYTRITON_HOME "
                                "(or XDG_CACHE_HOME, or TMPDIR) to a writable folder programs may run from")
        yield folder / "workspace"  # (PyTriton makes it: one that exists is refused)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _usable(home: Path) -> bool:
    """Whether PyTriton can keep its workspaces in ``home`` (made if missing). ``$HOME`` left in it:
    no HOME was set, and PyTriton's path leads into the working directory."""
    if "$" in str(home) or not str(home).isascii():  # (the stub fails in its imports from a path that is not)
        return False
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(home, os.W_OK | os.X_OK)


def _serve(triton: Any, log_file: Path | None, on_ready: Callable[[], None], drain_timeout_s: int) -> None:
    """``run_server``'s start, wait and stop of ``triton``."""
    watch = _StartWatch(triton)
    earlier = log_file.stat().st_size if log_file is not None and log_file.is_file() else 0  # an earlier run's
    served = False
    model_watch: _ModelWatch | None = None
    try:
        try:
            try:
                with stoppable_children():  # (the server is started here)
                    triton.run()
            finally:
                watch.done()
            if watch.exited:  # the wake-up was withdrawn before it was raised (see _StartWatch.done)
                raise _TritonExited
        except (Exception, KeyboardInterrupt) as exc:  # the server exited or never turned ready: its log says why
            if isinstance(exc, KeyboardInterrupt) and not watch.exited:
                raise
            raise SdexportError(f"{NOT_STARTED}: {_reason(triton, exc, log_file, earlier)}") from None
        model_watch = _ModelWatch(triton)  # (its stubs now, before serve says it serves)
        on_ready()
        served = True
        try:
            triton.serve()
        except KeyboardInterrupt:  # (Ctrl-C or SIGTERM, `stopping`) landed after PyTriton's own catch, in
            # its stop, whose wait for the drain it cut short: the same end of serving, not exit 130 one
            # stop in a few (seen here), once Triton's exit status says whether requests were lost
            _await_exit(triton, drain_timeout_s + EXIT_MARGIN_S)
    finally:
        if model_watch is not None:
            model_watch.done()
        triton.stop()
        status = _exit_status(triton)
        if status is not None:  # (first: a print below fails on a hung-up terminal)
            _reap_stubs(triton)
        _flush_console_line()
        if model_watch is not None and model_watch.ended is not None:
            raise SdexportError(
                f"the model's process (pid {model_watch.ended}) ended while serving: killed (by the kernel's "
                "out-of-memory killer? `dmesg` says) or crashed (Triton's log may say). Triton then answered every "
                "request with an error while it still said it was ready, so serve stopped it; requests in flight "
                "were dropped. Start serve again (a supervisor restarts it on this non-zero exit)")
        held = _connections_held(_log_lines(triton, log_file, earlier)) if served and status else None
        if held:  # (raised over a Ctrl-C or SIGTERM too)
            raise SdexportError(
                f"Triton exited with status {status} as the --drain-timeout of {drain_timeout_s} s ran out, still "
                f"waiting for {held} client connection(s) to close (a request still running on one, or a client "
                "keeping its connection open, HTTP keep-alive, whose new requests Triton answers meanwhile): requests "
                "still queued or running then were dropped, their clients given no image (README: Serving, Stopping)")
        if served and status:  # (raised over a Ctrl-C or SIGTERM too: that stop lost requests)
            raise SdexportError(
                f"Triton exited with status {status}, so requests still in flight when it stopped were "
                f"dropped, their clients given no image: the --drain-timeout of {drain_timeout_s} s ran out before "
                "they finished, or the server failed (Triton's log says which)")


def _connections_held(lines: list[str]) -> int | None:
    """The client connections Triton still waited for when its exit timeout ran out (None: none, or
    it said nothing of them). Triton waits for its HTTP connections to close before the models'
    requests, with the same timeout (a line a second: "Timeout N: Found M HTTP service
    connections"), and answers their new requests meanwhile: a client keeping its connection open
    (tritonclient, a load balancer) holds the drain to its end, and Triton then exits non-zero.
    Counted only where the wait reached its last second (connections that closed earlier left the
    models' wait to run out). Whether a request was lost, Triton's log does not tell (its count of
    requests in flight said 0 where two queued ones were cut: an audit); the clients that lost one
    saw "connection closed"."""
    waits = [(int(found[1]), int(found[2])) for line in lines
             if (found := re.search(r"Timeout (\d+): Found (\d+) HTTP service connections", line))]
    return waits[-1][1] if waits and waits[-1][0] <= 1 and waits[-1][1] else None


def _reap_stubs(triton: object) -> None:
    """Once Triton has exited: end its Python backend stubs still running, and remove their shared
    memory. Triton killed at its exit timeout (or crashed) can leave a stub behind (an audit, under
    load), adopted by init, deaf to SIGTERM and holding the model (on a GPU its device memory, which
    the next ``serve`` would lack). Both
    are known by PyTriton's shared-memory prefix, unique to this server (its pid and 4 random bytes),
    which each stub's command line carries."""
    import signal

    prefix = _shm_prefix(triton)
    if prefix is None:
        return
    for pid in _stub_pids(prefix):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for region in Path("/dev/shm").glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            region.unlink()


def _shm_prefix(triton: object) -> str | None:
    """PyTriton's shared-memory prefix for this server's Python backend (None: not known here)."""
    config = getattr(getattr(triton, "_python_backend_config", None), "_backend_args", None) or {}
    prefix = config.get("shm-region-prefix-name")
    if not isinstance(prefix, str) or len(prefix) < 8 or not Path("/proc").is_dir():
        return None
    return prefix


def _stub_pids(prefix: str) -> list[int]:
    """The Python backend stubs running for the server whose shared-memory prefix is ``prefix``
    (each stub's command line carries it); one that has ended and not been reaped yet is not one."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            program, *args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # (gone, or another user's)
            continue
        if program.endswith(b"triton_python_backend_stub") and any(a.startswith(prefix.encode()) for a in args):
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Whether process ``pid`` is running: not gone, and not ended and waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()  # (the program's name in it is bytes of any kind)
    except OSError:
        return False
    return stat.rpartition(b")")[2].split()[:1] not in ([b"Z"], [b"X"])


#: How often the serving watch looks for the model's process, and how long it waits, having
#: missed it, for a stop that may be on its way (seconds); tests shorten them.
MODEL_WATCH_PERIOD_S = 1.0
MODEL_WATCH_GRACE_S = 2.0


class _ModelWatch:
    """While serving, notice the model's process (the Python backend's stub) gone, and end Triton.

    The stub killed (the kernel's out-of-memory killer, a ``kill -9``) or crashed, Triton kept
    answering ready on ``/v2/health/ready`` and failed every request ("Stub process is not
    healthy"), while ``serve`` said nothing; a later stop waited the whole drain for a model that
    could not unload, then said requests had been dropped (an audit). A load balancer kept sending
    work, and no supervisor restarted it. So the server is killed at once (every request it would
    answer would fail) and ``serve`` exits non-zero, saying why.

    Stubs also end as Triton unloads the model when it is stopped: a stop ``serve`` was asked for
    (it is recorded at once, ``stopping``), PyTriton's, a signal Triton itself received (Ctrl-C
    reaches its whole process group, also where ``serve``, a script's background job, ignores it:
    Triton says so on its console as it starts its drain) or Triton's exit, looked for a grace
    after the stub is missed, leave the server alone."""

    def __init__(self, triton: object) -> None:
        self._triton = triton
        prefix = _shm_prefix(triton)
        self._pids = _stub_pids(prefix) if prefix is not None else []
        self._done = threading.Event()
        self.ended: int | None = None
        """The model's process found gone (its pid), for which Triton was killed."""
        self._thread: threading.Thread | None = None
        if self._pids:
            self._thread = threading.Thread(target=self._watch, name="sdexport-model-watch", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        from sdexport import stopping

        while not self._done.wait(MODEL_WATCH_PERIOD_S):
            gone = [pid for pid in self._pids if not _running(pid)]
            if not gone:
                continue
            if self._done.wait(MODEL_WATCH_GRACE_S):
                return
            if (stopping.requested() or getattr(self._triton, "_stopped", False) or _server_exited(self._triton)
                    or _signalled(self._triton)):
                return
            command = getattr(getattr(self._triton, "_triton_server", None), "_tritonserver_running_cmd", None)
            self.ended = gone[0]
            if command is not None:
                with contextlib.suppress(OSError):
                    command.process.kill()
            return

    def done(self) -> None:
        """Stop watching; a kill decided on is made by the time this returns (``ended`` is final)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(5)


def _signalled(triton: object) -> bool:
    """Whether ``tritonserver`` said it received a signal (and so began its stop): the line it writes
    on its console, which PyTriton keeps whatever takes the log."""
    console = getattr(getattr(triton, "_triton_server", None), "_tritonserver_logs", "") or ""
    return any(TRITON_SIGNAL_LINE.fullmatch(line + "\n") for line in console.splitlines())


NOT_STARTED = "Triton did not start"
"""How ``_serve`` begins a failed start's message."""

#: How often the start-up watch looks at the server process (seconds); tests shorten it.
WATCH_PERIOD_S = 0.2


class _TritonExited(KeyboardInterrupt):
    """Raised in the thread that waits for Triton when the server has exited. A KeyboardInterrupt, as
    Ctrl-C is: PyTriton's readiness poll logs and re-raises any Exception, and gevent's hub (under
    tritonclient.http) passes only the system exits on to the waiting code."""

    def __str__(self) -> str:
        return "the server exited while it started"


class _StartWatch:
    """While PyTriton waits for the server to turn ready, notice a server that has already exited (a
    model that failed to load ends it in seconds; PyTriton would poll until the start-up timeout) and
    raise ``_TritonExited`` in the waiting thread.

    The exception is raised with CPython's ``PyThreadState_SetAsyncExc``, not
    ``_thread.interrupt_main()``: that one simulates SIGINT, and does nothing where SIGINT is ignored,
    as in a script's background job (``sdexport serve ... &``), which inherits that from the shell.
    It also lets ``run_server`` wait in a thread other than the main one."""

    def __init__(self, triton: object) -> None:
        self._triton = triton
        self._waiter = threading.get_ident()
        self._lock = threading.Lock()
        self._watching = True
        self.exited = False
        threading.Thread(target=self._watch, name="sdexport-triton-start-watch", daemon=True).start()

    def _watch(self) -> None:
        while True:
            with self._lock:
                if not self._watching:
                    return
                if _server_exited(self._triton):
                    self.exited = True
                    _raise_in(self._waiter, _TritonExited)
                    return
            time.sleep(WATCH_PERIOD_S)

    def done(self) -> None:
        """Stop watching, in the waiting thread, once PyTriton has returned or raised. The one wake-up
        sent is raised by then (CPython checks for it after the lock's release at the latest); should
        it still be pending, it is withdrawn, and the caller raises on ``exited`` itself.

        Withdrawn only when one was sent: on CPython 3.11 and 3.12 a withdrawal leaves the
        interpreter checking for asynchronous exceptions at every eval-breaker point (a call-heavy
        loop ran 55% longer on 3.12.1 afterwards), so a server that started must not pay for it."""
        with self._lock:
            self._watching = False
            sent = self.exited
        if sent:
            _raise_in(self._waiter, None)


def _raise_in(thread_id: int, exception: type[BaseException] | None) -> None:
    """Raise ``exception`` in thread ``thread_id`` at its next Python instruction; None withdraws one
    not raised yet. A thread blocked in C (a sleep, a socket read) gets it when the call returns."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               None if exception is None else ctypes.py_object(exception))


def _server_exited(triton: object) -> bool:
    """Whether the ``tritonserver`` process has ended, asked without reaping it.

    The process must be reaped by ``sh``'s own threads, not here: whoever reaps it runs PyTriton's
    exit callback, ``Triton.stop``, which waits for the lock the main thread holds while it polls
    for readiness. Calling ``TritonServer.is_alive()`` (a ``waitpid``) from this thread therefore
    deadlocked whenever this thread happened to see the exit first: the failed load was reported
    only after the start-up timeout. ``WNOWAIT`` reads the exit and leaves the process reapable."""
    command = getattr(getattr(triton, "_triton_server", None), "_tritonserver_running_cmd", None)
    if command is None:  # not started yet
        return False
    process = command.process
    if process.exit_code is not None:  # already reaped by sh
        return True
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped between the two looks
        return True


def _await_exit(triton: object, timeout_s: float) -> None:
    """Wait, as PyTriton's stop would have, for ``tritonserver`` to end and ``sh`` to reap it (its
    exit status is read then); one still running after ``timeout_s`` has requests it will not
    finish: killed, as PyTriton kills it. One more stop (Ctrl-C) cuts the wait short."""
    command = getattr(getattr(triton, "_triton_server", None), "_tritonserver_running_cmd", None)
    if command is None:
        return
    deadline = time.monotonic() + timeout_s
    while command.process.exit_code is None:
        if time.monotonic() > deadline:
            with contextlib.suppress(OSError):  # (PyTriton kills it then; a hung server would hold the GPU)
                command.process.kill()
            raise SdexportError(f"Triton did not stop within {timeout_s:g} s of the stop, so requests still in flight "
                                "were dropped, their clients given no image (Triton's log says what it was doing)")
        time.sleep(WATCH_PERIOD_S)


def _exit_status(triton: object) -> int | None:
    """The ``tritonserver`` process's exit status once it has ended (None: not started, or not
    ended). Triton exits non-zero where its exit timeout ran out with requests in flight: PyTriton
    only logs a warning then, and ``Triton.stop`` returns as after a clean stop."""
    command = getattr(getattr(triton, "_triton_server", None), "_tritonserver_running_cmd", None)
    status = getattr(getattr(command, "process", None), "exit_code", None)
    return status if isinstance(status, int) else None


def _log_lines(triton: object, log_file: Path | None, earlier: int = 0) -> list[str]:
    """Triton's log lines for this run (what PyTriton kept, then ``log_file`` past ``earlier`` bytes,
    another run's), each with its whitespace made single spaces."""
    server = getattr(triton, "_triton_server", None)
    log = getattr(server, "_tritonserver_logs", "") or ""
    if log_file is not None and log_file.is_file():
        with log_file.open("rb") as handle:
            handle.seek(earlier)
            log += handle.read().decode(errors="replace")
    return [" ".join(line.split()) for line in log.splitlines()]


def _reason(triton: object, exc: BaseException, log_file: Path | None, earlier: int = 0) -> str:
    """The log line saying why the model did not load, else the server's first error, else the
    exception (``serve`` then names the log, which it keeps). ``earlier``: the bytes of ``log_file`` an earlier run wrote, not read for this one's."""
    lines = _log_lines(triton, log_file, earlier)
    # (a model's progress, '"loading: sdexport:1"', named the model and was taken for the reason
    # where a port taken meanwhile had stopped the server: "failed to start GRPC service")
    noise = ("NVML", "DCGM", "CudaDriverHelper", "pinned memory", "CUDA driver", '"loading: ', "successfully loaded")
    for wanted in ("failed to load '", "failed to start", "sdexport:", "failed to load", "error:"):
        for line in lines:
            if wanted.lower() in line.lower() and not any(n in line for n in noise):
                return _model_error(line)[-600:]
    return str(exc) or type(exc).__name__  # (serve names the log it kept; under -v it was shown)


def _model_error(line: str) -> str:
    """A Triton log line reduced to the model's own message: the python backend logs a failed
    ``initialize`` as 'failed to load ...: Internal: RuntimeError: <message>\\n\\nAt: <stack>'. Another
    failure (an import in the stub) keeps its message, not the stack after it (which the last 600
    characters of the line were, where the message was long)."""
    marker = "RuntimeError: sdexport: "
    if marker in line:
        return "the model did not load: " + line.split(marker, 1)[1].split("\\n", 1)[0].rstrip('"')
    return line.split("\\n\\nAt:", 1)[0].rstrip('"')
