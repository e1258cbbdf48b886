"""A rich progress bar on rank 0 (none elsewhere, or with progress = false)."""

from __future__ import annotations


class Progress:
    def __init__(self, enabled: bool, total: int, start: int, label: str):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           TextColumn("{task.fields[info]}"), transient=False)
            self.task = self.bar.add_task(label, total=total, completed=start, info="")
            self.bar.start()

    def update(self, info: str) -> None:
        if self.bar:
            self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
