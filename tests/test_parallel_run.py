"""How tests/conftest.py spreads the test run over the cores (pytest-xdist), checked on its hooks
with stand-in pytest configs: a full run is what the hooks' effect would be measured on."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest

import conftest


def _config(markexpr: str = "not slow and not gpu", numprocesses=None, dist: str = "no", xdist: bool = True):
    return SimpleNamespace(option=SimpleNamespace(markexpr=markexpr, numprocesses=numprocesses, dist=dist),
                           pluginmanager=SimpleNamespace(has_plugin=lambda name: xdist and name == "xdist"))


@pytest.fixture
def controller(monkeypatch):
    """As in the process pytest was started in (not in a worker)."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)


def test_the_default_selection_spreads_over_the_cores_a_module_per_worker(controller):
    config = _config()
    conftest.pytest_cmdline_main(config)
    assert (config.option.numprocesses, config.option.dist) == ("auto", "loadfile")


@pytest.mark.parametrize("markexpr", ["slow", "gpu", "gpu and not slow", "slow or interop"])
def test_selections_that_can_take_slow_or_gpu_tests_stay_in_one_process(controller, markexpr):
    config = _config(markexpr)
    conftest.pytest_cmdline_main(config)
    assert (config.option.numprocesses, config.option.dist) == (None, "no")


def test_what_the_user_asked_for_is_kept(controller):
    serial = _config(numprocesses=0)  # -n 0
    conftest.pytest_cmdline_main(serial)
    assert serial.option.numprocesses == 0
    chosen = _config(numprocesses=3, dist="load")  # -n 3 --dist load
    conftest.pytest_cmdline_main(chosen)
    assert (chosen.option.numprocesses, chosen.option.dist) == (3, "load")
    without = _config(xdist=False)  # not installed, or -p no:xdist
    conftest.pytest_cmdline_main(without)
    assert (without.option.numprocesses, without.option.dist) == (None, "no")


def test_workers_follow_the_cores_up_to_four(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    for cores, workers in [(1, 0), (2, 2), (16, conftest.MAX_WORKERS)]:
        monkeypatch.setattr(conftest, "_cores", lambda cores=cores: cores)
        assert conftest.pytest_xdist_auto_num_workers(_config()) == workers
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")  # xdist's own setting decides
    assert conftest.pytest_xdist_auto_num_workers(_config()) is None


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
        pytest.skip("not in a worker of a parallel run (-n 0, one core, or OMP_NUM_THREADS set by the user)")
    import torch

    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    assert conftest.WORKER_THREADS == max(1, conftest._cores() // workers) == torch.get_num_threads()
