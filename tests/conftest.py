"""Shared fixtures: the tiny model and the tiny engine directories, exported once per run; and
how the run is spread over the machine's cores.

Exporting is the slow part of most tests, so the session's engine directories are made once per
run: under pytest-xdist the first worker to ask exports, the others wait for it and read the same
folder (``_made_once_per_run``). Tests that damage an engine directory work on a copy.

Where pytest-xdist is installed (the dev extra), the whole suite, run as it is by default, runs in
one worker process per core (at most four), a test module at a time per worker so that its module
fixtures are made once, and each worker's torch gets its share of the cores: the tiny models'
operators gain little from more threads, which would only contend with the other worker's. On 2
cores that takes about 40% off the run (docs/design-notes.md). Runs with paths, ``-n``/``--dist`` or
single-process options stay as asked (``_spread_over_the_cores``), as do selections that can take
``slow`` or ``gpu`` tests (real SD architectures need the memory, a GPU its own timings).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

if TYPE_CHECKING:
    from sdexport.export.exporter import ExportOptions

from sdexport import console as _console  # noqa: E402

# The tests stand for the commands, which own their process: the libraries' progress bars and logs
# are quiet from the start (tqdm reads TQDM_DISABLE when it is imported, before any test's command).
_console.own_process()
_console.set_verbosity(_console.NORMAL)

MAX_WORKERS = 4
"""Each worker holds its own models and module exports, so memory grows with the workers: four
bound it on a large host, where the run is short anyway."""

SERIAL_MARKERS = frozenset({"slow", "gpu"})


def _cores() -> int:
    """The cores this process may run on. A container's CPU quota is not seen: there, set
    PYTEST_XDIST_AUTO_NUM_WORKERS or ``-n``."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _share_the_cores_in_a_worker() -> int | None:
    """Give torch (here and in the processes tests start) this worker's share of the cores, before
    torch is imported; a thread count the user set is kept. Returns the count it set."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    threads = max(1, _cores() // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads


WORKER_THREADS = _share_the_cores_in_a_worker()

from sdexport.console import quiet_libraries  # noqa: E402  (after the thread count is set)

quiet_libraries()


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Spread the whole suite over the cores (before xdist reads its options)."""
    if _spread_over_the_cores(config):
        config.option.numprocesses = "auto"
        config.option.dist = "loadfile"  # a module's fixtures are made once, in one worker


def _spread_over_the_cores(config: pytest.Config) -> bool:
    """Only the whole suite as run by default (``pytest`` from the checkout's root, no paths):
    naming paths, choosing ``-n`` or ``--dist`` (on the command line, in PYTEST_ADDOPTS or in
    addopts), output or debugging that needs this process (``-s``, ``--capture=tee-sys``,
    ``--pdb``, ``--trace``, ``--setup-show``, ``--setup-plan``) and selections that can take slow
    or gpu tests keep the run as the user asked for it, in one process unless ``-n`` says otherwise.
    Options are read with ``getoption`` as their plugins may be turned off (``-p no:debugging``)."""
    if not config.pluginmanager.has_plugin("xdist") or os.environ.get("PYTEST_XDIST_WORKER"):
        return False
    if config.args_source is not pytest.Config.ArgsSource.TESTPATHS:
        return False
    given = [*config.invocation_params.args, *shlex.split(os.environ.get("PYTEST_ADDOPTS", "")),
             *config.getini("addopts")]
    if config.getoption("numprocesses", None) is not None or any(a == "--dist" or a.startswith("--dist=")
                                                                  for a in given):
        return False
    if config.getoption("capture", None) in ("no", "tee-sys") or any(
            config.getoption(name, None) for name in ("usepdb", "trace", "setupshow", "setupplan")):
        return False
    return _leaves_out_slow_and_gpu(config.getoption("markexpr", None) or "")


IDENTIFIER = re.compile(r"[\w:+\-.\[\]\\/]+")
"""What pytest's ``-m`` parser reads as a name (its scanner's IDENT); and, or, not are left out."""


def _leaves_out_slow_and_gpu(markexpr: str) -> bool:
    """Whether ``-m markexpr`` selects no test marked slow or gpu, whatever else it is marked: the
    expression is tried, with pytest's own parser, on every combination of the marks it names. A
    pytest whose parser this cannot use leaves the run in one process."""
    if not markexpr:
        return False
    names = sorted(set(IDENTIFIER.findall(markexpr)) - {"and", "or", "not"} | SERIAL_MARKERS)
    if len(names) > 12:  # 2**12 combinations at most
        return False
    try:
        from _pytest.mark.expression import Expression

        expression = Expression.compile(markexpr)
        for present in itertools.product((False, True), repeat=len(names)):
            marks = {name for name, on in zip(names, present) if on}
            if marks & SERIAL_MARKERS and expression.evaluate(marks.__contains__):
                return False
    except Exception:  # a private module, and a mark's arguments (slow(reason=1)) are not matched
        return False
    return True


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown where xdist is not installed
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """One worker per core, at most MAX_WORKERS; none (this process) on one core.
    PYTEST_XDIST_AUTO_NUM_WORKERS, xdist's own setting, still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cores = _cores()
    return min(cores, MAX_WORKERS) if cores > 1 else 0


def pytest_collection_finish(session: pytest.Session) -> None:
    """Take what collection made (the libraries' modules, the test items: about half a million
    objects that live as long as the process) out of the garbage collector's sight: every full
    collection walked them all again, 0.2 to 0.4 s each, about 200 times in a default run (the
    benchmarks collect between contenders; the exports' objects churn through the old generation).
    Measured with gc.callbacks in two whole runs (2026-12-07): 70 s of the two workers' time in the
    collector before, 52 s after. Objects made afterwards, by the tests, are collected as before."""
    gc.collect()
    gc.freeze()


V = TypeVar("V")


class MadeOnFirstUse(Mapping[str, V]):
    """A module fixture's exports (or references), each made the first time a test asks for it: the
    ones only ``slow`` cases read cost nothing in the default run, which leaves those cases out."""

    def __init__(self, names: Iterable[str], make: Callable[[str], V]) -> None:
        self._names, self._make = tuple(names), make
        self._made: dict[str, V] = {}
        self._failed: dict[str, BaseException] = {}

    def __getitem__(self, name: str) -> V:
        if name not in self._names:
            raise KeyError(name)
        if name in self._failed:  # made once, failed once: not again for every test that reads it
            raise self._failed[name]
        if name not in self._made:
            try:
                self._made[name] = self._make(name)
            except Exception as exc:
                self._failed[name] = exc
                raise
        return self._made[name]

    def __contains__(self, name: object) -> bool:  # Mapping's would make it
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def hidden_siblings(path: Path) -> list[str]:
    """The hidden entries sdexport makes beside an output (``.NAME.partial-PID`` staging folders,
    ``.NAME.sdexport-lock``): none once a command has ended, whatever ended it."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def drop_a_signal(number: int) -> None:
    """Deliver signal ``number`` while a ``__del__`` runs, where Python drops the KeyboardInterrupt its
    handler raises ("Exception ignored in ..."): what happens when a Ctrl-C or SIGTERM lands in one of
    the many finalizers torch runs. Call it where sdexport's handlers are in place (``main``, or
    ``sdexport.stopping.listening``), never under the default SIGTERM, which would end the tests."""
    import signal
    import threading

    dropped: list[type[BaseException] | None] = []

    class Finalized:
        def __del__(self) -> None:  # pthread_kill runs the handler itself (PyErr_CheckSignals), in here
            signal.pthread_kill(threading.get_ident(), number)

    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: dropped.append(unraisable.exc_type)
    try:
        Finalized()  # made and freed at once
    finally:
        sys.unraisablehook = previous
    assert dropped and dropped[0] is not None and issubclass(dropped[0], KeyboardInterrupt), dropped


def token_ids(texts: list[str], tokenizer, length: int, emphasis: str = "none", limit: int = 1):
    """``texts`` as a text encoder's ``input_ids`` in at most ``limit`` chunks each (B x n x
    ``length``), and each token's weight where ``emphasis`` weighs any (else None): the runtime's
    ``text_chunks`` and ``chunk_tensors`` in one call."""
    from sdexport.runtime.prompt_text import chunk_tensors, text_chunks

    return chunk_tensors(text_chunks(texts, tokenizer, length, emphasis, limit), tokenizer, length)


def run_cli(*args: str) -> int:
    """Run the CLI in-process (the same ``main`` as the console script) and return its exit code."""
    from sdexport.cli import main

    argv = sys.argv
    sys.argv = ["sdexport", *map(str, args)]
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = argv
    return 0


def synthetic_bench_report(results: list[dict], baseline: str | None, **fields) -> dict:
    """A results.json as ``sdexport bench`` writes it, for the Markdown's words: a tiny model on a
    test CPU, ``results`` as given; ``fields`` replace its keys (``family``, ``test_hooks``, ...)."""
    return {
        "scenario": {"name": "synthetic", "height": 64, "width": 64, "scheduler": "euler", "guidance": 7.5,
                     "warmup": 1, "prompt": "x"},
        "environment": {"gpu": None, "host": {"cpu": "Test CPU", "cores": 2}, "versions": {"sdexport": "0.1.0"},
                        "git_revision": "abc", "date": "2026-12-01T00:00:00+00:00"},
        "model": "preset tiny (random weights, seed 0)", "random_weights": True, "precision": "fp32",
        "baseline": baseline, "results": results, "one_time": {}, **fields,
    }


def bench_refusal(engine_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``bench`` says, in one line, refusing a tiny scenario over ``engine_dir`` (exit 2)."""
    scenario = tmp_path / "s.toml"
    scenario.write_text('model = "tiny"\nheight = 64\nwidth = 64\nsteps = [2]\ncontenders = ["diffusers", "onnxruntime-cpu"]\n')
    capsys.readouterr()
    assert run_cli("bench", scenario, "-o", tmp_path / "out", "--engine-dir", engine_dir) == 2
    return " ".join(capsys.readouterr().err.split())


@contextlib.contextmanager
def cpu_only() -> Iterator[None]:
    """Run as on a machine without a GPU, whatever this one has (no CUDA for torch, no CUDA provider
    for onnxruntime, no TensorRT): tests of the CPU paths keep their meaning on a GPU host."""
    import torch

    from sdexport.runtime import providers

    real = providers.available_providers
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(providers, "available_providers",
                      lambda: [p for p in real() if p != providers.PROVIDERS["cuda"]])
        patch.setitem(sys.modules, "tensorrt", None)
        yield


@pytest.fixture
def without_gpu() -> Iterator[None]:
    """``cpu_only()`` for a whole test: ``pytestmark = pytest.mark.usefixtures("without_gpu")``."""
    with cpu_only():
        yield


@pytest.fixture(autouse=True)
def normal_verbosity() -> Iterator[None]:
    """Each test starts at the normal verbosity: a CLI call with -q (run_cli) leaves the console
    quiet, as the process it stands for would end, and a later test of the Python API that reads
    the console's notes (capsys) would find none, depending on which tests shared its worker."""
    from sdexport import console

    if console.verbosity() != console.NORMAL:
        console.set_verbosity(console.NORMAL)
    yield


@pytest.fixture(scope="session", autouse=True)
def user_cache_of_this_session(tmp_path_factory) -> Iterator[None]:
    """sdexport's user cache (hash records, timing caches) in a folder of the test session, for this
    process and the sdexport processes tests start, not in the user's ~/.cache."""
    from sdexport.user_cache import ENVIRONMENT

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENVIRONMENT, str(tmp_path_factory.mktemp("user-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_model():
    from sdexport.models import load_model

    return load_model("tiny")


def _made_once_per_run(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory, key: str,
                       options: ExportOptions, preset: str = "tiny") -> Path:
    """``preset`` exported with ``options`` into a folder (``.../KEY/PRESET``) every worker of
    this run reads.

    Each xdist worker is a session of its own, so a session fixture alone would export once per
    worker (5 to 7 s each on 2 cores). Their base folders share a parent: the first worker to take the
    lock there exports, and the others wait and find the folder, which the exporter puts in place
    whole (it writes a staging folder and renames it). Nothing writes into these folders afterwards;
    tests that would, work on a copy.
    """
    from filelock import FileLock

    from sdexport.export.exporter import export

    base = tmp_path_factory.getbasetemp()
    in_a_worker = hasattr(config, "workerinput")  # this process's own xdist role, not an inherited variable
    shared = (base.parent if in_a_worker else base) / "shared-engines"
    shared.mkdir(exist_ok=True)
    out = shared / key / preset
    with FileLock(str(shared / f"{key}.lock")):
        if not (out / "manifest.json").is_file():
            export(preset, out, options)
    return out


@pytest.fixture(scope="session")
def tiny_engine_dir(pytestconfig, tmp_path_factory) -> Path:
    from sdexport.export.exporter import ExportOptions

    return _made_once_per_run(pytestconfig, tmp_path_factory, "fp32", ExportOptions())


@pytest.fixture(scope="session")
def tiny_fp16_engine_dir(pytestconfig, tmp_path_factory) -> Path:
    """An fp16 export of the tiny model, shared: tests that build into it work on a copy."""
    from sdexport.export.exporter import ExportOptions

    return _made_once_per_run(pytestconfig, tmp_path_factory, "fp16", ExportOptions(dtype="fp16", verify="quick"))


@pytest.fixture(scope="session")
def tiny_sdxl_engine_dir(pytestconfig, tmp_path_factory) -> Path:
    """An fp32 export of the tiny SDXL model (quick verification), shared like the two above."""
    from sdexport.export.exporter import ExportOptions

    return _made_once_per_run(pytestconfig, tmp_path_factory, "sdxl-fp32", ExportOptions(verify="quick"), "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint_engine_dir(pytestconfig, tmp_path_factory) -> Path:
    """An fp32 export of the tiny SDXL inpainting model (9-channel U-Net), shared like the others."""
    from sdexport.export.exporter import ExportOptions

    return _made_once_per_run(pytestconfig, tmp_path_factory, "sdxl-inpaint-fp32", ExportOptions(verify="quick"),
                              "tiny-sdxl-inpaint")


@pytest.fixture(scope="session")
def tiny_sdxl_fp16_engine_dir(pytestconfig, tmp_path_factory) -> Path:
    """An fp16 export of the tiny SDXL model (quick verification), shared like the others."""
    from sdexport.export.exporter import ExportOptions

    return _made_once_per_run(pytestconfig, tmp_path_factory, "sdxl-fp16", ExportOptions(dtype="fp16", verify="quick"),
                              "tiny-sdxl")


@pytest.fixture
def engine_copy(tiny_engine_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_engine_dir, copy)
    return copy


@pytest.fixture(scope="session")
def tiny_diffusers_dir(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("diffusers") / "tiny-sd"
    tiny_model.save_pretrained(path)
    return path
