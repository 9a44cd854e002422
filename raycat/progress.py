"""What a stage tells the user while it runs: one-line messages and a rows progress bar.

Stage drivers call ``say`` and ``rows``; only the CLI prints tables. Text is printed without rich
markup interpretation, so a path or a question containing ``[/]`` prints as written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

console = Console(stderr=True)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 160  # job logs have no TTY: rich's default of 80 columns cut the tables' CIs off


def say(stage: str, msg: str) -> None:
    console.print(Text.assemble((stage, "bold"), ": ", msg))


@contextmanager
def rows(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar for ``total`` rows; yields ``advance(n)``."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task(escape(label), total=total)
        yield lambda n: progress.advance(task, n)
