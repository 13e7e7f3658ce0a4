"""Following a run: its new events and a live progress bar, in a terminal or a notebook.

`follow(changes, display)` consumes the changes a watch reports (client.Runs.watch) and ends
at the first terminal event; what is shown, and how, is the display's business. Formatting is
pure (`progress_text`), so the terminal and the notebook show the same numbers.
"""

from __future__ import annotations

import html
import sys
from collections.abc import Iterable
from typing import Any, Protocol, TextIO

from ..api import Progress
from .errors import RunNotFoundError
from .types import RunStatus, TrainingEvent, TrainingRun, run_from_resource, seconds_to_str

BAR_WIDTH = 30


def progress_text(progress: Progress | None, width: int = BAR_WIDTH) -> str:
    """`[########......]  31.0%  1200 tok/s  loss 2.310  ETA 4min` ('-' where not known yet)."""
    progress = progress or Progress()
    filled = int(width * min(max(progress.percent, 0.0), 100.0) / 100)
    tokens = "-" if progress.tokens_per_second is None else f"{progress.tokens_per_second:.0f}"
    loss = "-" if progress.loss is None else f"{progress.loss:.3f}"
    eta = "-" if progress.eta_seconds is None else seconds_to_str(progress.eta_seconds)
    return (f"[{'#' * filled}{'.' * (width - filled)}] {progress.percent:5.1f}%  {tokens} tok/s"
            f"  loss {loss}  ETA {eta}")


def event_key(event: TrainingEvent) -> tuple[str, Any, str]:
    return event.type, event.time, event.message


class Display(Protocol):
    def update(self, run: TrainingRun, new_events: list[TrainingEvent]) -> None: ...

    def close(self, run: TrainingRun) -> None: ...


def follow(changes: Iterable[tuple[str, dict[str, Any]]], display: Display) -> TrainingRun:
    """Show each change of one run until a terminal event; the run as it ended.

    `changes` are ("ADDED" | "MODIFIED" | "DELETED", resource) pairs, the first being the run as
    it is now. A run deleted before it ended raises RunNotFoundError."""
    seen: set[tuple[str, Any, str]] = set()
    run = None
    for kind, resource in changes:
        if kind == "DELETED":
            name = (resource.get("metadata") or {}).get("name")
            raise RunNotFoundError(f"TrainingRun {name!r} was deleted before it ended")
        run = run_from_resource(resource)
        new = [event for event in run.events or [] if event_key(event) not in seen]
        seen.update(map(event_key, new))
        display.update(run, new)
        if run.status.is_terminal() or any(event.is_terminal_state() for event in new):
            display.close(run)
            return run
    raise RunNotFoundError("the watch on the run ended before the run did")  # watches resume forever


class TerminalDisplay:
    """Events as lines; while training, one progress line rewritten in place on a terminal
    (printed only when it changes elsewhere, so logs stay short)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown = ""  # the progress line on screen (live) or printed last

    def update(self, run: TrainingRun, new_events: list[TrainingEvent]) -> None:
        if new_events and self.live and self.shown:
            self.stream.write("\r\033[K")  # the events go above the bar
            self.shown = ""
        for event in new_events:
            self.stream.write(f"{event}\n")
        if run.status is RunStatus.RUNNING and run.progress is not None:
            line = f"  {progress_text(run.progress)}"
            if line != self.shown:
                self.stream.write(f"\r\033[K{line}" if self.live else f"{line}\n")
                self.shown = line
        self.stream.flush()

    def close(self, run: TrainingRun) -> None:
        if self.live and self.shown:
            self.stream.write("\n")
        self.stream.write(f"{run.name}: {run.status}{': ' + run.details if run.details else ''}\n")
        self.stream.flush()


class NotebookDisplay:
    """One output cell kept up to date: the status, a progress bar and the events table."""

    def __init__(self):
        from IPython.display import HTML, display

        self.html = HTML
        self.handle = display(HTML("<i>waiting for the run…</i>"), display_id=True)

    def update(self, run: TrainingRun, new_events: list[TrainingEvent]) -> None:
        self.handle.update(self.html(notebook_html(run)))

    def close(self, run: TrainingRun) -> None:
        self.handle.update(self.html(notebook_html(run)))


def notebook_html(run: TrainingRun) -> str:
    percent = run.progress.percent if run.progress is not None else 0.0
    bar = (f"<progress max='100' value='{percent:.1f}' style='width:30em'></progress> "
           f"<code>{html.escape(progress_text(run.progress))}</code>") if run.progress is not None else ""
    events = run.events._repr_html_() if run.events is not None else ""
    return f"<b>{html.escape(run.name)}</b>: {html.escape(str(run.status))}<br>{bar}{events}"


def in_notebook() -> bool:
    """True in a Jupyter (or Databricks, Colab) kernel; False in python or an IPython shell."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def display_for_environment() -> Display:
    return NotebookDisplay() if in_notebook() else TerminalDisplay()
