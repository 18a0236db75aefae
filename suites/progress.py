"""Progress reporting the harness drives and the front ends display (rich, or nothing)."""

from __future__ import annotations

import sys
from typing import Any, Protocol


class Task(Protocol):
    def update(self, completed: float) -> None: ...
    def close(self) -> None: ...


class ProgressSink(Protocol):
    def task(self, label: str, total: float) -> Task: ...


class _NullTask:
    def update(self, completed: float) -> None:
        pass

    def close(self) -> None:
        pass


class NoProgress:
    """A sink that shows nothing (the default for the API and the pytest plugin)."""

    def task(self, label: str, total: float) -> Task:
        return _NullTask()


class RichProgress:
    """Rich progress bars on stderr, one per task, with rate and time remaining, and an
    optional note line under them (`note`, e.g. the best confidence per class)."""

    def __init__(self, enabled: bool = True) -> None:
        from collections.abc import Iterable

        from rich.console import Console, RenderableType
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class _WithNote(Progress):
            note = ""

            def get_renderables(self) -> Iterable[RenderableType]:
                yield self.make_tasks_table(self.tasks)
                if self.note:
                    yield Text(self.note)

        self._progress = _WithNote(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
            disable=not enabled,
        )

    def note(self, text: str) -> None:
        """Show `text` under the bars (replacing the previous note)."""
        self._progress.note = text  # type: ignore[attr-defined]

    def add(self, label: str, total: float) -> Any:
        """A raw task id, for callers that update it themselves with `update`."""
        return self._progress.add_task(label, total=total)

    def update(self, task_id: Any, completed: float) -> None:
        self._progress.update(task_id, completed=completed)

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def task(self, label: str, total: float) -> Task:
        progress = self._progress
        task_id = progress.add_task(label, total=total)

        class _Task:
            def update(self, completed: float) -> None:
                progress.update(task_id, completed=completed)

            def close(self) -> None:
                progress.update(task_id, completed=total)

        return _Task()


def command_progress(quiet: bool = False) -> RichProgress:
    """A command's progress display (use it as a context manager): rich bars on stderr
    when stderr is a terminal and not `quiet`, else a display that shows nothing."""
    return RichProgress(enabled=sys.stderr.isatty() and not quiet)
