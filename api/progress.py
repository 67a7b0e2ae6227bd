"""Progress for long commands: a rich bar on a terminal, plain lines on stderr otherwise (a log file or a CI
job sees how far the work got, without control characters).

    with progress_bar("search 3", total=40, fields={"failed": 0}) as update:
        update(completed=5, failed=1)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Plain lines come at most this often (and at the first and last update), so a long run stays readable.
PLAIN_EVERY_S = 5.0

Update = Callable[..., None]


def _fields_text(fields: dict[str, Any]) -> str:
    return " ".join(f"{name} {value}" for name, value in fields.items())


@contextmanager
def _rich_bar(label: str, total: int | None, fields: dict[str, Any], console: Console) -> Iterator[Update]:
    names = list(fields)
    columns = [
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(" ".join(f"{n} {{task.fields[{n}]}}" for n in names)),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(label, total=total, **fields)

        def update(completed: int | None = None, total: int | None = None, **changed: Any) -> None:
            bar.update(task, completed=completed, total=total, **changed)

        yield update


@contextmanager
def _plain_lines(label: str, total: int | None, fields: dict[str, Any]) -> Iterator[Update]:
    state: dict[str, Any] = {"completed": 0, "total": total, **fields}
    last = {"at": 0.0, "line": ""}

    def emit(force: bool = False) -> None:
        done, of = state["completed"], state["total"]
        line = (
            f"{label}: {done}/{of if of is not None else '?'} {_fields_text({k: state[k] for k in fields})}"
        )
        now = time.monotonic()
        if line != last["line"] and (force or now - last["at"] >= PLAIN_EVERY_S or done == of):
            sys.stderr.write(line.rstrip() + "\n")
            sys.stderr.flush()
            last.update(at=now, line=line)

    def update(completed: int | None = None, total: int | None = None, **changed: Any) -> None:
        first = not last["line"]
        if completed is not None:
            state["completed"] = completed
        if total is not None:
            state["total"] = total
        state.update(changed)
        emit(force=first)

    yield update
    emit(force=True)


@contextmanager
def progress_bar(
    label: str, total: int | None = None, fields: dict[str, Any] | None = None, console: Console | None = None
) -> Iterator[Update]:
    """A progress display for `label`; yields `update(completed=, total=, **fields)`. `fields` are shown
    beside the count, with their initial values."""
    console = console or Console(stderr=True)
    if console.is_terminal:
        with _rich_bar(label, total, dict(fields or {}), console) as update:
            yield update
    else:
        with _plain_lines(label, total, dict(fields or {})) as update:
            yield update
