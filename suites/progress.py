"""Progress reporting the harness drives and the front ends display (rich, or nothing)."""

from __future__ import annotations

from typing import Protocol


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
    """Rich progress bars on stderr, one per task, with rate and time remaining."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )

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
