"""What a stage tells the user while it runs: one-line messages and rows progress.

Stage drivers call ``say`` and ``rows``; only the CLI prints tables. Text is printed without rich
markup interpretation, so a path or a question containing ``[/]`` prints as written. On a terminal
``rows`` draws a rich bar; without one (``ray job logs``, ``kubectl logs``, CI) a bar shows only its
last frame, so plain lines are printed instead, every ``RAYCAT_PROGRESS_INTERVAL_S`` seconds (30).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

# Job logs have no TTY: rich's default of 80 columns cut the tables' CIs off, and 160 the eval table's
# last columns (a 100k-row test set's cells are 27 characters); rich pads no line to this width.
JOB_LOG_WIDTH = 240
console = Console(stderr=True)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = JOB_LOG_WIDTH


def verbose() -> bool:
    """``RAYCAT_VERBOSE=1`` keeps Ray Data's and vLLM's INFO logs in the console (off by default: they
    bury the progress and loss lines in job logs)."""
    return os.environ.get("RAYCAT_VERBOSE", "") not in ("", "0", "false")


def vllm_log_level() -> str:
    """The log level engines start vLLM with: the user's ``VLLM_LOGGING_LEVEL`` if set, else INFO when
    verbose, else WARNING. Decided on the driver, so actors on other nodes follow it."""
    return os.environ.get("VLLM_LOGGING_LEVEL") or ("INFO" if verbose() else "WARNING")


def say(stage: str, msg: str) -> None:
    console.print(Text.assemble((stage, "bold"), ": ", msg))


def _interval_s() -> float:
    return float(os.environ.get("RAYCAT_PROGRESS_INTERVAL_S", "30"))


def _line(done: int, total: int, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f", ETA {(total - done) / rate:.0f} s" if rate > 0 and done < total else ""
    return f"{done}/{total} rows ({done / total:.0%}), {rate:.2f} rows/s{eta}, {elapsed:.0f} s elapsed"


@contextmanager
def rows(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """Progress over ``total`` rows; yields ``advance(n)``."""
    if console.is_terminal:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task(escape(label), total=total)
            yield lambda n: progress.advance(task, n)
        return
    started = time.monotonic()
    state = {"done": 0, "printed_at": started, "printed": -1}

    def advance(n: int) -> None:
        state["done"] += n
        now = time.monotonic()
        if now - state["printed_at"] >= _interval_s() or state["done"] >= total:
            say(label, _line(state["done"], total, now - started))
            state["printed_at"], state["printed"] = now, state["done"]

    say(label, f"0/{total} rows")
    yield advance
    if state["printed"] != state["done"]:  # the last line says where it ended
        say(label, _line(state["done"], total, time.monotonic() - started))
