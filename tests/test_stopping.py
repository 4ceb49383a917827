"""A Ctrl-C or SIGTERM whose KeyboardInterrupt Python drops (it landed in a ``__del__``) still stops
the job: nothing is put in place after it, and the command ends as an interrupted one.

The CI run that found this: an export sent SIGTERM just after it had started put its finished
directory in place anyway (test_output_safety's killed-export test, once in many runs).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from conftest import drop_a_signal, hidden_siblings, run_cli
from sdexport import stopping
from sdexport.atomic import write_atomic
from sdexport.errors import HungUp, Terminated, interruption_name
from sdexport.export.plan import ENGINE_DIR
from sdexport.output_dir import claim

QUICK = ("--components", "unet", "--verify", "none")


@pytest.mark.parametrize("number, raised", [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt),
                                            (signal.SIGHUP, HungUp)])
def test_a_dropped_stop_is_raised_by_the_next_check_once(number, raised):
    # Ctrl-C as in a terminal, whatever this worker inherited (a run in the background has SIGINT
    # ignored, and listening leaves an ignored SIGINT alone)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stopping.listening():
            drop_a_signal(number)
            with pytest.raises(raised) as caught:
                stopping.check()
            assert type(caught.value) is raised
            stopping.check()  # acted on: not raised a second time
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_dropped_stop_is_not_printed_as_a_traceback(monkeypatch):
    """Python prints a stop raised in a ``__del__`` as "Exception ignored in ... KeyboardInterrupt"
    (3 Ctrl-Cs in 13 on an export): recorded, it is said once, as "interrupted"; other errors raised
    in a ``__del__``, and a KeyboardInterrupt no signal recorded, still reach the hook there was,
    which listening gives back."""
    import sys
    import threading

    seen: list[type[BaseException] | None] = []

    def recorder(unraisable):
        seen.append(unraisable.exc_type)

    monkeypatch.setattr(sys, "unraisablehook", recorder)

    class Finalized:
        def __del__(self) -> None:
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    class Broken:
        def __del__(self) -> None:
            raise ValueError("a library's own error")

    class Interrupting:
        def __del__(self) -> None:
            raise KeyboardInterrupt  # no signal recorded it: not a stop listening knows of

    with stopping.listening():
        Finalized()
        assert seen == []
        with pytest.raises(Terminated):
            stopping.check()
        Broken()
        Interrupting()  # (after check took the recorded stop)
        assert seen == [ValueError, KeyboardInterrupt]
    assert sys.unraisablehook is recorder


def test_the_clean_up_after_a_stop_is_not_stopped_again():
    """The KeyboardInterrupt arrived and unwinds: a step or an atomic write in a ``finally`` on its
    way out runs to its end (the request is still recorded, and is the same stop)."""
    from sdexport.console import step

    done = []
    with stopping.listening(), pytest.raises(Terminated):
        try:
            signal.raise_signal(signal.SIGTERM)
        finally:
            with step("Cleaning up"):
                done.append("step")
            done.append("after")
    assert done == ["step", "after"]


def test_a_taken_stop_is_not_raised_and_listening_leaves_none_behind():
    with stopping.listening():
        drop_a_signal(signal.SIGTERM)
        stopping.take()  # a catcher acts on it
        stopping.check()
        drop_a_signal(signal.SIGTERM)
    stopping.check()  # the command is over: nothing left for the next one in this process


def test_listening_gives_the_handlers_back_and_leaves_an_ignored_sigint_ignored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a script's background job
    try:
        with stopping.listening():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not before[1]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is before[1]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with stopping.listening():
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before[0])


def test_sighup_is_taken_from_its_default_only():
    """A closed terminal stops the command as SIGTERM does (named SIGHUP); under nohup (ignored) or
    another program's handler it is left alone, and given back after the command."""
    before = signal.getsignal(signal.SIGHUP)
    mine = lambda number, frame: None  # noqa: E731
    try:
        for inherited, taken in ((signal.SIG_DFL, True), (signal.SIG_IGN, False), (mine, False)):
            signal.signal(signal.SIGHUP, inherited)
            with stopping.listening():
                assert (signal.getsignal(signal.SIGHUP) is not inherited) == taken
            assert signal.getsignal(signal.SIGHUP) is inherited
        assert interruption_name(HungUp()) == "SIGHUP"
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_hangup_lets_go_of_the_terminal_but_not_of_a_pipe_or_a_file(monkeypatch):
    """A hangup points stdout and stderr at /dev/null where they were the terminal (writes to a
    hung-up one fail, and the clean-up's first line raised before a bench's report was written); a
    pipe or a file (``sdexport bench > log``) still has its reader and keeps what follows (mutation
    testing round 8: the hangup's call, and the terminal check, each dropped, failed no test)."""
    import subprocess
    import sys

    detached = []
    monkeypatch.setattr(stopping, "detach_terminal", lambda: detached.append(True))
    with pytest.raises(HungUp):
        stopping._record_and_raise(signal.SIGHUP, None)
    assert detached == [True]
    stopping.take()  # (the request it recorded, acted on here)
    script = ("import sys\nfrom sdexport import stopping\nstopping.detach_terminal()\n"
              "print('to the pipe', flush=True)\nprint('to the file', file=sys.stderr, flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.stdout, done.stderr) == ("to the pipe\n", "to the file\n")


def test_no_output_goes_in_place_after_a_dropped_stop(tmp_path: Path):
    target = tmp_path / "tiny"
    with stopping.listening():
        with pytest.raises(Terminated), claim(target, ENGINE_DIR, replace=False) as staging:
            (staging / "manifest.json").write_text("{}")
            drop_a_signal(signal.SIGTERM)
        drop_a_signal(signal.SIGTERM)
        with pytest.raises(Terminated):
            write_atomic(tmp_path / "plan.engine", b"plan")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_export_whose_sigterm_was_dropped_stops_and_leaves_nothing(tmp_path: Path, monkeypatch, capsys):
    """The signal lands in a finalizer while the model loads: the export stops at the end of that
    step, as if the KeyboardInterrupt had arrived, instead of exporting and moving the directory in."""
    from sdexport.export import exporter

    real = exporter.load_model

    def load_model(*args, **kwargs):
        model = real(*args, **kwargs)
        drop_a_signal(signal.SIGTERM)
        return model

    monkeypatch.setattr(exporter, "load_model", load_model)
    target = tmp_path / "tiny"
    assert run_cli("export", "tiny", "-o", target, *QUICK) == 130
    assert not target.exists() and hidden_siblings(target) == []
    err = capsys.readouterr().err
    assert "Exporting" not in err and err.strip().endswith("interrupted")


def test_a_stop_while_the_old_directory_is_deleted_says_the_new_one_is_in_place(tmp_path: Path, monkeypatch, capsys):
    """``export --force``: the swap is done and Ctrl-C lands while the replaced directory is deleted.
    The command still ends as an interrupted one, but says that its export is whole and in place
    (the user would otherwise redo it); the old directory is gone all the same."""
    from sdexport import output_dir

    target = tmp_path / "tiny"
    assert run_cli("export", "tiny", "-o", target, *QUICK) == 0
    before = (target / "manifest.json").read_text()
    real, calls = output_dir._discard, []

    def stopped_once(path):
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real(path)

    monkeypatch.setattr(output_dir, "_discard", stopped_once)
    capsys.readouterr()
    assert run_cli("export", "tiny", "-o", target, "--force", *QUICK) == 130
    assert capsys.readouterr().err.strip().endswith(f"interrupted; already in place: {target}")
    assert (target / "manifest.json").read_text() != before and hidden_siblings(target) == []


def test_what_was_kept_is_recorded_while_listening_only():
    stopping.keep("output", "already in place: x")
    assert stopping.kept() == []  # a library call: its caller has what it was given
    with stopping.listening():
        stopping.keep("images", "already written: a")
        stopping.keep("images", "already written: a, b")
        assert stopping.kept() == ["already written: a, b"]
    assert stopping.kept() == []



@pytest.mark.parametrize("when", ["atexit", "modules"])
@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_during_the_teardown_after_the_command_keeps_its_exit_status(number, when):
    """The console script's command is over (here a refusal, status 2) and Python tears down; a
    stop then ended the process as killed (143) or as interrupted (130), with nothing said, though
    the command had finished. Sent from an atexit hook, and later, as the modules are torn down
    (an audit's finding: Python puts back the default handlers after the exit hooks, and torch's
    and ONNX Runtime's teardown takes a second after that)."""
    import subprocess
    import sys

    stop = f"os.kill(os.getpid(), {int(number)}), time.sleep(1)"
    late = ("atexit.register(lambda: None)\n"
            f"class Late:\n    def __del__(self):\n        {stop}\nlate = Late()\n") if when == "modules" else (
            f"atexit.register(lambda: ({stop}))\n")
    code = ("import atexit, os, sys, time\n" + late +
            "sys.argv = ['sdexport', 'inspect', '/no/such/engines']\n"
            "from sdexport.cli import entry\n"
            "entry()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert done.stderr.count("error:") == 1 and "interrupted" not in done.stderr
    assert "Exception ignored" not in done.stderr  # (SIGINT: the KeyboardInterrupt Python would print there)


def test_the_teardown_guard_leaves_an_ignored_sigint_ignored_and_others_handlers_alone():
    previous = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:  # (SIGHUP too: finished() ignores it, and an ignored SIGHUP is inherited by later tests' commands)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        mine = lambda number, frame: None  # noqa: E731  (a program's own handler)
        signal.signal(signal.SIGTERM, mine)
        stopping.finished()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for n, handler in previous.items():
            signal.signal(n, handler)


def test_the_first_of_two_dropped_stops_is_the_one_raised():
    """A Ctrl-C, then a SIGTERM, both dropped: the next check raises the first (a plain
    KeyboardInterrupt, not Terminated)."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stopping.listening():
            drop_a_signal(signal.SIGINT)
            drop_a_signal(signal.SIGTERM)
            with pytest.raises(KeyboardInterrupt) as caught:
                stopping.check()
            assert type(caught.value) is KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.parametrize("number, raised, listen", [
    (signal.SIGINT, KeyboardInterrupt, False),  # sdexport as a library: Python's own SIGINT handler
    (signal.SIGINT, KeyboardInterrupt, True),
    (signal.SIGTERM, Terminated, True),
])
def test_a_stop_in_a_deferred_block_is_recorded_and_raised_as_it_ends(number, raised, listen):
    """What TensorRT's build does while it calls back into Python (``build.tensorrt_progress``): a
    stop's handler records it rather than raise it in the callback, ``requested`` says so from any
    thread, and the block's end raises it; the handlers are given back."""
    import contextlib
    import threading

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stopping.listening() if listen else contextlib.nullcontext():
            before = signal.getsignal(number)
            went_on, seen_elsewhere = [], []
            with pytest.raises(raised) as caught, stopping.deferred():
                signal.raise_signal(number)  # (its handler runs here, in the block)
                went_on.append(stopping.requested())
                thread = threading.Thread(target=lambda: seen_elsewhere.append(stopping.requested()))
                thread.start()
                thread.join()
            assert type(caught.value) is raised and went_on == [True] and seen_elsewhere == [True]
            assert signal.getsignal(number) is before and not stopping.requested()
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_deferred_stop_is_raised_in_place_of_the_error_it_caused():
    """A build cancelled for a stop fails (polygraphy: "Invalid Engine"): the stop is what is raised,
    not that error; a block that fails with no stop asked for raises its own error, and one that
    ends well raises nothing."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stopping.listening():
            with pytest.raises(Terminated) as caught, stopping.deferred():
                signal.raise_signal(signal.SIGTERM)
                raise ValueError("Invalid Engine")
            assert caught.value.__cause__ is None and caught.value.__suppress_context__
            with pytest.raises(ValueError), stopping.deferred():
                raise ValueError("a build's own failure")
            with stopping.deferred():
                pass
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_every_handler_is_put_back_when_a_stop_is_raised_as_the_first_is(monkeypatch):
    """A stop's handler runs at any bytecode: one raising as the handlers are put back left the rest
    swapped (a review: SIGINT left recording after a SIGTERM). Each is put back all the same, and
    the stop is raised once they are."""
    seen: list[int] = []
    put = signal.signal

    def raising_once(number, handler):
        put(number, handler)
        if not seen:
            seen.append(number)
            raise Terminated

    mine = lambda number, frame: None  # noqa: E731
    before = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGHUP)}
    try:
        for number in before:
            put(number, lambda number, frame: None)
        monkeypatch.setattr(signal, "signal", raising_once)
        with pytest.raises(Terminated):
            stopping._put_back([(signal.SIGINT, mine), (signal.SIGHUP, mine)])
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGHUP) is mine
    finally:
        for number, handler in before.items():
            put(number, handler)


def test_listening_forgets_its_stop_even_where_one_is_raised_as_the_handlers_go_back(monkeypatch):
    """A second Ctrl-C as SIGINT's handler came back skipped the reset after it: the first stop stayed
    recorded, and a program calling sdexport again got it at its next call's first step (a review)."""
    put = signal.signal
    inherited = put(signal.SIGINT, signal.default_int_handler)

    def raising_after_sigint(number, handler):
        put(number, handler)
        if number == signal.SIGINT:
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            with stopping.listening():
                drop_a_signal(signal.SIGTERM)
                stopping.keep("output", "already in place: out")
                monkeypatch.setattr(signal, "signal", raising_after_sigint)
        monkeypatch.undo()
        assert not stopping.requested() and stopping._kept is None
    finally:
        put(signal.SIGINT, inherited)


def test_deferred_leaves_an_ignored_sigint_alone_and_calls_another_programs_handler_as_it_ends():
    """Another program's handler would run inside a TensorRT callback, where what it raises is lost:
    it is called once the block is over instead, and its signal is no stop of sdexport's."""
    seen: list[int] = []
    mine = lambda number, frame: seen.append(number)  # noqa: E731
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stopping.deferred():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            assert not stopping.requested()
        signal.signal(signal.SIGINT, mine)
        with stopping.deferred():
            signal.raise_signal(signal.SIGINT)
            assert seen == [] and not stopping.requested()
        assert seen == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_stop_already_on_its_way_out_of_a_deferred_block_is_not_raised_again_later():
    """sdexport as a library: a KeyboardInterrupt leaving the block while a stop was recorded (a
    build's callback raised it) took the record with it, or the caller's next sdexport call would
    have raised a stale stop at its first check."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), stopping.deferred():
            signal.raise_signal(signal.SIGINT)
            raise KeyboardInterrupt
        assert not stopping.requested()
        stopping.check()
    finally:
        signal.signal(signal.SIGINT, inherited)
