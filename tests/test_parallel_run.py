"""How tests/conftest.py spreads the test run over the cores (pytest-xdist): its hooks in real
pytest runs of a small probe suite, and its rules on their own."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import conftest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, os, pytest

def _record(name):
    with open(os.environ["PROBE_LOG"], "a") as log:
        log.write(json.dumps([name, os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("OMP_NUM_THREADS")]) + "\\n")

def test_one():
    _record("one")

@pytest.mark.slow
def test_slow():
    _record("slow")
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    """A suite with this conftest and pyproject's pytest settings (markers, default selection)."""
    pytest.importorskip("xdist")
    root = tmp_path_factory.mktemp("probe")
    (root / "tests").mkdir()
    shutil.copy(Path(conftest.__file__), root / "tests" / "conftest.py")
    (root / "tests" / "test_probe.py").write_text(PROBE)
    settings = (ROOT / "pyproject.toml").read_text().partition("[tool.pytest.ini_options]")[2]
    settings = re.split(r"^\[", settings, maxsplit=1, flags=re.MULTILINE)[0]
    (root / "pyproject.toml").write_text("[tool.pytest.ini_options]" + settings)
    return root


def _run(probe: Path, *args: str, **env: str) -> list[tuple[str, str | None, str | None]]:
    """Which probe tests ran, in which worker, with which OMP_NUM_THREADS."""
    log = probe / "log.jsonl"
    log.unlink(missing_ok=True)
    environment = {k: v for k, v in os.environ.items()  # as started from a shell, with xdist loaded
                   if not k.startswith(("PYTEST_XDIST_", "PYTEST_ADDOPTS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD"))
                   and k != "OMP_NUM_THREADS"}
    environment.update(PROBE_LOG=str(log), PYTEST_XDIST_AUTO_NUM_WORKERS="2",  # two workers, whatever the cores
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **env)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=probe,
                         env=environment, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return sorted(tuple(json.loads(line)) for line in log.read_text().splitlines())


def test_the_whole_suite_runs_in_workers_and_narrower_runs_in_one_process(probe):
    share = str(max(1, conftest._cores() // 2))
    in_a_worker = ([("one", "gw0", share)], [("one", "gw1", share)])
    assert _run(probe) in in_a_worker
    assert _run(probe, "-p", "no:debugging") in in_a_worker  # --pdb's plugin turned off: no option to read
    for args in [("tests",), ("-n", "0", "--pdb"), ("--dist", "no"), ("-s",)]:
        assert _run(probe, *args) == [("one", None, None)], args
    assert _run(probe, PYTEST_ADDOPTS="--dist=no") == [("one", None, None)]
    assert _run(probe, "-m", "slow") == [("slow", None, None)]


@pytest.mark.parametrize(("markexpr", "spread"), [
    ("not slow and not gpu", True), ("not slow and not gpu and not interop", True), ("not (slow or gpu)", True),
    ("not slow", False), ("not gpu", False), ("not interop", False), ("", False), ("interop", False),
    ("slow", False), ("gpu and not slow", False), ("slow or interop", False), ("not slowish", False),
])
def test_only_selections_without_slow_or_gpu_tests_are_spread(markexpr, spread):
    assert conftest._leaves_out_slow_and_gpu(markexpr) is spread


def test_workers_follow_the_cores_up_to_four(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    for cores, workers in [(1, 0), (2, 2), (16, conftest.MAX_WORKERS)]:
        monkeypatch.setattr(conftest, "_cores", lambda cores=cores: cores)
        assert conftest.pytest_xdist_auto_num_workers(SimpleNamespace()) == workers
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")  # xdist's own setting decides
    assert conftest.pytest_xdist_auto_num_workers(SimpleNamespace()) is None


def test_a_worker_gives_torch_its_share_of_the_cores(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(set_num_threads=calls.append))
    monkeypatch.setattr(conftest, "_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "4")
    assert conftest._share_the_cores_in_a_worker() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2" and calls == [2]
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # the user's count is kept
    assert conftest._share_the_cores_in_a_worker() is None
    assert os.environ["OMP_NUM_THREADS"] == "6" and calls == [2]
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "1")  # one worker: torch keeps its default
    assert conftest._share_the_cores_in_a_worker() is None
    assert "OMP_NUM_THREADS" not in os.environ and calls == [2]


def test_this_run_is_spread_as_the_hooks_say():
    """In a worker of a parallel run (the default run, as CI runs it), torch has the worker's share."""
    if conftest.WORKER_THREADS is None:
        pytest.skip("not in a worker of a parallel run (one process, one worker, or OMP_NUM_THREADS set by the user)")
    import torch

    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    assert conftest.WORKER_THREADS == max(1, conftest._cores() // workers) == torch.get_num_threads()
