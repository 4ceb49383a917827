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

from rich.console import Console

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def quiet_libraries() -> None:
    """Silence progress bars and chatter from transformers/diffusers/onnx that would bury ours.

    Environment variables, read when those libraries are first imported, so that commands that never
    need them (``--help``, ``inspect``) do not pay for importing them here.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|diffusers|transformers).*")
    for name in ("onnx_graphsurgeon", "polygraphy", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def step(description: str) -> Iterator[None]:
    """Show ``description`` with a spinner while the block runs, then a line with its duration."""
    start = time.perf_counter()
    with console.status(f"{description}…"):
        yield
    console.print(f"[green]✓[/] {description} [dim]({time.perf_counter() - start:.1f} s)[/]")
