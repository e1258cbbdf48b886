"""A rich progress bar on rank 0 (none elsewhere, or with progress = false), and the lines printed
between its updates (an evaluation's val_loss)."""

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

    def say(self, line: str) -> None:
        """One line on stdout, above the bar when there is one (a bare print would tear it)."""
        if self.bar:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
