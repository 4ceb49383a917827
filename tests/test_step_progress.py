"""A long step's line (``console.step``): the time so far on a terminal's spinner, what the step says
of its progress (a TensorRT build's phases), and in a log, where no spinner is drawn, a line at
least every ``PROGRESS_LINE_SECONDS`` while it runs."""

from __future__ import annotations

import threading
import time

import pytest

from sdexport import console


def _rendered(line: console._SpinnerText) -> str:
    return line.__rich__().plain


@pytest.fixture
def in_a_log(monkeypatch):
    """stderr as a CI log, whatever this run's environment (``FORCE_COLOR`` makes rich take a log for
    a terminal, where it draws the spinner into it)."""
    monkeypatch.setattr(type(console.console), "is_terminal", property(lambda self: False))


def test_the_spinner_line_counts_the_time_and_shows_what_the_step_said_as_written(monkeypatch, capsys):
    """The count goes on while the step is inside one long call (rich redraws the line, which reads
    the clock); a TensorRT phase name is shown as written, not read as rich markup."""
    monkeypatch.setattr(type(console.console), "is_terminal", property(lambda self: True))
    start = time.perf_counter()
    line = console._SpinnerText("Building unet", start)
    assert _rendered(line) == "Building unet…"
    progress = console.StepProgress(line)
    progress("[bold] 1/2")
    assert _rendered(line) == "Building unet… [bold] 1/2"
    line.start = start - 3600
    assert _rendered(line) == "Building unet… [bold] 1/2 (3600 s)"
    progress("31/120 \\")  # (escaped, a trailing backslash was shown twice)
    assert _rendered(line) == "Building unet… 31/120 \\ (3600 s)"
    assert capsys.readouterr().err == ""  # (on a terminal, all of it on the spinner line)


def test_a_dumb_terminal_is_told_as_a_log_is(monkeypatch, capsys):
    """``TERM=dumb`` (an editor's shell buffer): rich draws no spinner there, so what the step says
    is printed as lines, as in a log, rather than kept for a line never drawn (a review)."""
    monkeypatch.setattr(type(console.console), "is_terminal", property(lambda self: True))
    monkeypatch.setattr(type(console.console), "is_dumb_terminal", property(lambda self: True))
    monkeypatch.setattr(console, "PROGRESS_LINE_SECONDS", 0.0)
    with console.step("Building unet") as progress:
        progress("Building engine 1/2")
    assert "  Building unet: Building engine 1/2 (0 s so far)" in capsys.readouterr().err.splitlines()


def test_a_silent_step_in_a_log_says_it_is_still_running(monkeypatch, capsys, in_a_log):
    """An SDXL export's trace or a TensorRT build says nothing for minutes; in a log (no terminal),
    where the spinner draws nothing, a line says the step is alive (CI systems end jobs that are
    silent for too long)."""
    monkeypatch.setattr(console, "PROGRESS_LINE_SECONDS", 1.0)
    said = threading.Event()
    say = console.StepProgress._say

    def spy(self, due):
        say(self, due)
        said.set()

    monkeypatch.setattr(console.StepProgress, "_say", spy)
    with console.step("Exporting unet"):
        assert said.wait(30)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("  Exporting unet: still running (") and lines[0].endswith(" s so far)")
    assert lines[-1].startswith("✓ Exporting unet (")
    assert not [t for t in threading.enumerate() if t.name == "sdexport-step-heartbeat"]


def test_a_stop_as_the_heartbeat_starts_still_ends_it(monkeypatch, in_a_log):
    """``Thread.start`` waits for the thread to run, where a stop's handler may raise: the thread,
    running by then, was left saying "still running" once a minute for good (a review)."""
    monkeypatch.setattr(console, "PROGRESS_LINE_SECONDS", 1.0)
    start = threading.Thread.start

    def interrupted(self):
        start(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(KeyboardInterrupt), console.step("Exporting unet"):
        pass
    monkeypatch.undo()
    assert not [t for t in threading.enumerate() if t.name == "sdexport-step-heartbeat"]


@pytest.mark.parametrize("where", ["terminal", "quiet"])
def test_no_heartbeat_on_a_terminal_or_when_quiet(monkeypatch, where):
    if where == "terminal":
        monkeypatch.setattr(type(console.console), "is_terminal", property(lambda self: True))
    else:
        monkeypatch.setattr(console.console, "quiet", True)
    monkeypatch.setattr(console, "PROGRESS_LINE_SECONDS", 1.0)
    with console.step("Exporting unet"):
        assert not [t for t in threading.enumerate() if t.name == "sdexport-step-heartbeat"]
