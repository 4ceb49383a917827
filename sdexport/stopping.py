"""Ctrl-C, SIGTERM and SIGHUP as a request to stop that cannot be lost on the way.

Python runs a signal handler between two bytecodes of whatever the main thread runs at that moment.
When that is a ``__del__`` method or a weak-reference callback (torch, diffusers and onnx run
thousands of them while a model loads and exports), the KeyboardInterrupt the handler raises is
printed as "Exception ignored in ..." and dropped: the job goes on as if it had never been asked to
stop (python/cpython#95959). An export stopped so would still put its finished directory in place
after CI or the user had stopped it, and a build would still write its plans.

So while ``listening`` (``sdexport``'s command line, for the whole command), the handlers also
record the request, and the places where going on would cost or could not be taken back call
``check``, which raises a request still recorded:

- ``claim`` and ``atomic_path``, before an output is moved into place: nothing new appears after a
  stop was asked for;
- ``console.step``, as each step of a long job starts and ends: a lost request stops the job within
  a step, rather than after all of them;
- the benchmark harness, between two timed runs.

Code that catches a KeyboardInterrupt and carries on on purpose takes the record (``take``), so that
no check raises it again: the benchmark harness's writing shield does, as it engages to write what
was measured. A signal handled as usual costs
nothing more than before, and ``check`` costs next to nothing (a global, the thread, the exception
being handled).

A stop dropped after the output went into place (while an export records that ``run`` can load
it, in the hash records' write) still ends the command with 130, as one delivered then would: the
output is whole. What a stopped command had already finished (a directory swapped into place, the
images of a run's first calls) is recorded with ``keep`` and said beside "interrupted", so that a
user does not redo a 20-minute export that was whole, nor take a half-run batch for a whole one.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from sdexport.errors import HungUp, Terminated

_requested: int | None = None
"""The signal of a request not yet acted on (the first one), or None."""

_kept: dict[str, str] | None = None
"""What the command has finished so far, by topic (``keep``); None while not ``listening``."""


HANGUP: int | None = getattr(signal, "SIGHUP", None)
"""SIGHUP where there is one (not on Windows)."""


def stop_for(number: int) -> KeyboardInterrupt:
    """The exception signal ``number`` stops a job with: ``Terminated`` for SIGTERM, ``HungUp`` for
    SIGHUP, else KeyboardInterrupt."""
    return Terminated() if number == signal.SIGTERM else HungUp() if number == HANGUP else KeyboardInterrupt()


def _taken_over(number: int) -> bool:
    """Whether ``listening`` takes ``number`` over: SIGTERM always; SIGINT only
    from Python's own handler and SIGHUP only from the default (the process ending): one that is
    ignored (a script's background job, ``nohup``) stays ignored, and another program's handler
    (sdexport called as a library) stays that program's."""
    handler = signal.getsignal(number)
    if number == signal.SIGINT:
        return handler is signal.default_int_handler
    return number == signal.SIGTERM or handler is signal.SIG_DFL


STOPS: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, *([HANGUP] if HANGUP is not None else []))
"""The signals that stop a command (``listening``; the benchmark's writing shield)."""


def _record_and_raise(number: int, frame: object) -> None:
    _record(number, frame)
    raise stop_for(number)


def _record(number: int, frame: object) -> None:
    """The stop recorded, the first of several kept (``deferred``'s handler, which raises nothing)."""
    global _requested
    if _requested is None:
        _requested = number
    if number == HANGUP:
        detach_terminal()


def detach_terminal() -> None:
    """After a hangup, point stdout and stderr where they were the terminal at /dev/null: every write
    to a hung-up terminal fails (EIO), and the clean-up's first line ("interrupted", a benchmark's
    note) raised before a benchmark's report was written (a review, in a pty). A descriptor that is
    a file or a pipe is left alone: its reader may still be there."""
    import os

    for descriptor in (1, 2):
        try:
            if not os.isatty(descriptor):
                continue
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, descriptor)
            finally:
                os.close(devnull)
        except OSError:  # (no such descriptor)
            continue


@contextlib.contextmanager
def listening() -> Iterator[None]:
    """Handle SIGTERM (a CI timeout, ``kill``, a container stop) and SIGHUP (a closed terminal, a
    dropped SSH session) like Ctrl-C, and record them, for the block; the previous handlers come
    back after it, with no request left recorded.

    They unwind like Ctrl-C, so staging folders and half-written files are removed on the way out
    rather than left for the next run to clean, and a benchmark writes what it measured. SIGINT and
    SIGHUP are taken over only as ``_taken_over`` says (``nohup``'s ignored SIGHUP stays ignored).
    A stop that Python drops (raised in
    a ``__del__``) is recorded, so its "Exception ignored in" traceback is not printed: the command
    ends in its one "interrupted" line (``_quiet_dropped_stops``).
    """
    global _requested, _kept
    if not _in_main_thread():  # handlers are set in the main thread only, and record only there
        yield
        return
    _requested, _kept = None, {}
    previous: dict[int, Any] = {}
    hook = sys.unraisablehook
    try:
        for number in STOPS:
            if _taken_over(number):
                previous[number] = signal.getsignal(number)
                signal.signal(number, _record_and_raise)
        sys.unraisablehook = _quiet_dropped_stops(hook)
        yield
    finally:
        try:
            _put_back(list(previous.items()))
        finally:
            sys.unraisablehook = hook
            _requested, _kept = None, None


def _quiet_dropped_stops(hook: Any) -> Any:
    """``sys.unraisablehook`` that says nothing of a stop Python dropped (``_record_and_raise`` has
    recorded it, and ``check`` raises it again); every other unraisable error goes to ``hook``."""
    def unraisable(info: Any) -> None:
        if not (isinstance(info.exc_value, KeyboardInterrupt) and _requested is not None):
            hook(info)
    return unraisable


def finished() -> None:
    """The command is over: from now on Ctrl-C, SIGTERM and SIGHUP are ignored, and the process ends with
    the command's exit status once Python's teardown does. That teardown, after
    torch and ONNX Runtime have loaded, takes most of a second, and a stop delivered in it ended a
    run whose images were all written as killed (143) or interrupted (130), with nothing said. A
    Python handler (which ended the process at once) did not last: Python puts back the default
    handlers after the exit hooks, before the modules are torn down; an ignored signal stays
    ignored. For the console script alone (``cli.entry``): a program that calls ``main`` goes on
    after it, with its own handlers; an ignored signal (``nohup``'s SIGHUP) or another program's handler
    is left as it is. The price: a teardown hung inside a library no longer ends at SIGTERM;
    SIGKILL, which CI sends after its grace, still ends it."""
    if not _in_main_thread():
        return
    for number in STOPS:
        if signal.getsignal(number) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(number, signal.SIG_IGN)


def requested() -> bool:
    """Whether a stop was asked for and not yet acted on. Any thread may ask (TensorRT may call
    its progress monitor from threads of its own); acting on it stays the main thread's
    (``check``, ``take``)."""
    return _requested is not None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While the block runs, a stop is recorded rather than raised, and raised as the block ends
    (in place of the block's own error, if it failed: that was the stop's doing, or comes second).

    For native work that calls back into Python: TensorRT's builder calls its progress monitor from
    C++, and an exception raised in the callback does not unwind through it (the binding prints it
    and cancels the build, and the stop is lost), so the monitor asks ``requested`` instead and
    cancels the build at its next step. A signal's handler runs at the first bytecode Python runs
    after it, which there is the callback's own first line, before any ``try`` in it could catch
    what it raises: so every Python handler of a stop signal is swapped for the block. ``listening``'s,
    and Python's own for SIGINT (sdexport called as a library, whose caller then gets its
    KeyboardInterrupt as the block ends), record the stop. Another program's handler is called as
    the block ends with what it would have been called with (raising there if it raises), and its
    signal cancels nothing: whether it means a stop is that program's to say. An ignored signal
    and a default action (SIGTERM ending the process) are left as they are."""
    if not _in_main_thread():  # (handlers are the main thread's)
        yield
        return
    later: list[tuple[Callable[[int, Any], Any], int, Any]] = []

    def called_later(handler: Callable[[int, Any], Any]) -> Callable[[int, Any], None]:
        return lambda number, frame: later.append((handler, number, frame))

    previous: dict[int, Any] = {}
    try:
        for number in STOPS:  # (in the try, each noted before it is swapped: see _put_back)
            handler = signal.getsignal(number)
            if handler in (_record_and_raise, _record) or (number == signal.SIGINT and handler is signal.default_int_handler):
                previous[number] = handler  # (``_record``: a deferred block inside another)
                signal.signal(number, _record)
            elif callable(handler):
                previous[number] = handler
                signal.signal(number, called_later(handler))
        try:
            yield
        except KeyboardInterrupt:
            take()  # (a stop on its way out already: the record must not raise it again later)
            raise
        except BaseException:
            stop = take()
            if stop is None:
                raise
            raise stop from None
        stop = take()
        if stop is not None:
            raise stop
    finally:
        try:
            _put_back(list(previous.items()))
        finally:
            for handler, number, frame in later:
                handler(number, frame)


def _put_back(handlers: list[tuple[int, Any]]) -> None:
    """Give each signal its handler back, every one of them even where a stop's handler raises
    between two (it runs at any bytecode, and one put back first may raise at once): each in the
    ``finally`` of the one before, what was raised on the way raised once all are back (a review
    found SIGINT left recording after a SIGTERM raised while the handlers were put back)."""
    if not handlers:
        return
    (number, handler), rest = handlers[0], handlers[1:]
    try:
        signal.signal(number, handler if handler is not None else signal.SIG_DFL)
    finally:
        _put_back(rest)


def check() -> None:
    """Raise the stop that was asked for and not yet acted on (its KeyboardInterrupt was dropped on
    the way, or this is the first place that looks); nothing otherwise. Nothing either while a
    KeyboardInterrupt is being handled: the stop is on its way out, and the clean-up after it (a
    ``finally``, an ``__exit__``) must run to its end."""
    if isinstance(sys.exception(), KeyboardInterrupt):
        return
    stop = take()
    if stop is not None:
        raise stop


def take() -> KeyboardInterrupt | None:
    """The stop that was asked for and not yet acted on, as its exception (``Terminated`` for
    SIGTERM); the caller now acts on it. None when there is none, and in any thread but the main
    one: a stop is the main thread's to act on, where Python raises it too."""
    global _requested
    if not _in_main_thread():
        return None
    number, _requested = _requested, None
    return None if number is None else stop_for(number)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def keep(topic: str, done: str) -> None:
    """Record what a stop now would leave finished (``done``, a phrase such as "already in place:
    out/tiny"), replacing what ``topic`` said before; nothing outside ``listening`` (sdexport as a
    library: its caller knows what it was given back)."""
    if _kept is not None and _in_main_thread():
        _kept[topic] = done


def kept() -> list[str]:
    """The phrases ``keep`` recorded in this command, in the order their topics were first kept."""
    return list(_kept.values()) if _kept else []
