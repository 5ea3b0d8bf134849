"""The live view of a running study, and where everything else it prints goes.

`StudyView` shows the phase (checks, teacher capture, search, baselines' learning rates, confirmation,
report), the phase's runs done / running / failed out of its total, the elapsed time and an estimate
of what is left of the phase, the best validation accuracy and ECE of the search so far with the size
of its Pareto front, and the study folder. On a terminal it is a rich live panel; without one (`ray job
submit`, CI logs, a pipe) it prints plain lines: one per phase, one per finished run at most every
`gap` seconds (failures always), and one every `every` seconds while nothing else was said.

`OutputLog` sends everything else the study driver process prints (Python's and C libraries'
output on file descriptors 1 and 2, Ray Tune's status, the Ray workers' output that Ray streams to the
driver) to `<study>/logs/study.log`; the view writes to the terminal the process started with.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional, TextIO

from ray.tune import Callback

PHASES = ("checks", "teacher capture", "search", "baselines' learning rates", "confirmation", "report")
LOG_NAME = "study.log"


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


def pareto_size(points: list[tuple[float, float]]) -> int:
    """How many (acc, ece) points no other point dominates (acc higher or equal and ece lower or equal,
    one strictly); equal points count once each."""
    return sum(not any(a >= acc and e <= ece and (a, e) != (acc, ece) for a, e in points) for acc, ece in points)


class StudyView:
    """What a person watching the study sees. `out` None: records the progress, prints nothing (a study
    run from Python); `live`: a rich live panel on `out` (a terminal), else plain lines."""

    def __init__(self, out: Optional[TextIO] = None, live: bool = False, every: float = 30.0, gap: float = 5.0,
                 output: Optional[OutputLog] = None):
        self.out, self.every, self.gap, self.output = out, every, gap, output
        self.started = time.monotonic()
        self.name, self.folder, self.log_path = "", "", ""
        self.phase_name, self.total, self.done, self.failed = "", 0, 0, 0
        self.running: set[str] = set()
        self.phase_started = self.started
        self.points: list[tuple[float, float]] = []  # the search trials' (val/acc, val/ece)
        self.best_acc: Optional[float] = None
        self._lock = threading.RLock()
        self._said = self.started
        self._last = ""  # the last line said
        self._stop = threading.Event()
        self._live = None
        self._ticker: Optional[threading.Thread] = None
        if out is not None and live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(get_renderable=self._panel, console=Console(file=out, force_terminal=True),
                              refresh_per_second=2, transient=False)
            self._live.start()
        elif out is not None:
            self._ticker = threading.Thread(target=self._tick, name="ia2ray-study-view", daemon=True)
            self._ticker.start()

    # ---- what the study driver calls -------------------------------------------------------------
    def study(self, name: str, folder: str, study_dir: Path) -> None:
        """The study's checks passed and its folder exists: the output log moves into `<study_dir>/logs/`."""
        if self.output is not None:
            self.output.move_to(study_dir / "logs" / LOG_NAME)
        with self._lock:
            self.name, self.folder = name, folder
            self.log_path = str(self.output.path) if self.output is not None else ""
        self._say(f"study {name}: {folder}" + (f" (log: {self.log_path})" if self.log_path else ""))

    def phase(self, name: str, total: int = 0) -> None:
        """Start a phase of PHASES with `total` runs (0: no runs to count)."""
        with self._lock:
            if self.phase_name and self.total and self._last != self._progress_line():
                self._say(self._progress_line())
            self.phase_name, self.total, self.done, self.failed = name, total, 0, 0
            self.running.clear()
            self.phase_started = time.monotonic()
        number = PHASES.index(name) + 1 if name in PHASES else "?"
        self._say(f"phase {number}/{len(PHASES)}: {name}" + (f" ({total} runs)" if total else ""))

    def started_run(self, run: str) -> None:
        with self._lock:
            self.running.add(run)

    def finished_run(self, run: str, result: Optional[dict] = None, error: str = "") -> None:
        """A run of the phase ended; `result`: its last report (a search trial's val/acc, val/ece)."""
        with self._lock:
            self.running.discard(run)
            if error:
                self.failed += 1
            else:
                self.done += 1
            result = result or {}
            if self.phase_name == "search" and not error and "val/acc" in result:
                acc = float(result["val/acc"])
                self.best_acc = acc if self.best_acc is None else max(self.best_acc, acc)
                if result.get("val/ece") is not None:
                    self.points.append((acc, float(result["val/ece"])))
            line = self._progress_line()
            quiet = time.monotonic() - self._said < self.gap and self.done + self.failed < self.total
        if error:
            where = f"; log: {self.log_path}" if self.log_path else ""
            self.note(f"{self.phase_name}: run {run} failed: {error}{where}")
        elif not quiet:
            self._say(line)

    def note(self, text: str) -> None:
        """A warning or an error that must be seen."""
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False, style="yellow")
        else:
            self._say(text, stamp=False)

    def stop(self) -> None:
        """Stop showing; the output goes back to the terminal."""
        self._stop.set()
        if self.output is not None:
            self.output.close()
            self.log_path = str(self.output.path)
            self.output = None
        if self._live is not None:
            self._live.stop()
            self._live = None
        elif self.out is not None and self.phase_name:
            self._say(f"done in {clock(time.monotonic() - self.started)}")

    def tune_callback(self) -> "ViewCallback":
        return ViewCallback(self)

    # ---- what it shows ---------------------------------------------------------------------------
    def best(self) -> str:
        if self.best_acc is None:
            return ""
        text = f"best val acc {self.best_acc:.3f}"
        if self.points:
            text += f", best val ECE {min(e for _, e in self.points):.3f}, Pareto front {pareto_size(self.points)}"
        return text

    def left(self) -> str:
        ended = self.done + self.failed
        if not self.total or not ended or ended >= self.total:
            return ""
        spent = time.monotonic() - self.phase_started
        return f"~{clock(spent / ended * (self.total - ended))} left"

    def _progress_line(self) -> str:
        parts = [f"{self.phase_name}: {self.done}/{self.total} done, {len(self.running)} running, {self.failed} failed"]
        parts += [p for p in (self.left(), self.best() if self.phase_name == "search" else "") if p]
        return " | ".join(parts)

    def _panel(self):
        from rich.table import Table

        with self._lock:
            grid = Table.grid(padding=(0, 1))
            grid.add_column(style="bold")
            grid.add_column()
            steps = " > ".join(f"[bold cyan]{p}[/]" if p == self.phase_name else p for p in PHASES)
            grid.add_row("study", f"{self.name}  {self.folder}")
            grid.add_row("phase", steps)
            if self.total:
                grid.add_row("runs", f"{self.done}/{self.total} done, {len(self.running)} running, "
                                     f"[red]{self.failed} failed[/]" if self.failed else
                             f"{self.done}/{self.total} done, {len(self.running)} running, 0 failed")
            grid.add_row("time", " ".join(p for p in (f"{clock(time.monotonic() - self.started)} elapsed",
                                                       self.left() and f"({self.left()} in this phase)") if p))
            if self.best():
                grid.add_row("search", self.best())
            if self.log_path:
                grid.add_row("log", self.log_path)
            return grid

    def _say(self, text: str, stamp: bool = True) -> None:
        if self.out is None or self._live is not None:
            return
        with self._lock:
            self._said = time.monotonic()
            prefix = f"[{clock(self._said - self.started):>7}] " if stamp else ""
            self._last = text
            self.out.write(prefix + text + "\n")
            self.out.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                due = self.total and time.monotonic() - self._said >= self.every
                line = self._progress_line() if due else ""
            if line:
                self._say(line)


class ViewCallback(Callback):
    """Ray Tune callback (runs in the study driver process) feeding a StudyView. Tune pickles its run
    config with the experiment; the view (a terminal, threads) does not go with it: a restored
    experiment gets the new session's view handed over (`search.fit_experiment`)."""

    def __init__(self, view: Optional[StudyView]):
        self.view = view

    def __reduce__(self):
        return ViewCallback, (None,)

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.view is not None:
            self.view.started_run(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.view is not None:
            self.view.finished_run(trial.trial_id, trial.last_result)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.view is not None:
            self.view.finished_run(trial.trial_id, error=error_text(trial))


def error_text(trial) -> str:
    """The last line of a failed trial's error and the file holding all of it."""
    path = getattr(trial, "error_file", None) or ""
    last = ""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()] if path else []
        last = lines[-1].strip() if lines else ""
    except OSError:
        pass
    return f"{last[:300] or 'error'}" + (f" (whole error: {path})" if path else "")


class ViewHandler(logging.Handler):
    """Passes the study's own warnings and errors (the `ia2ray` loggers) to the view."""

    def __init__(self, view: StudyView):
        super().__init__(level=logging.WARNING)
        self.view = view

    def emit(self, record: logging.LogRecord) -> None:
        self.view.note(f"{record.levelname.lower()}: {record.getMessage()}")


def terminal() -> TextIO:
    """A text stream on this process's standard output as it is now, for the view: it stays on the
    terminal (or pipe) after `OutputLog` sends file descriptor 1 elsewhere. Under a captured
    `sys.stdout` without a file descriptor (pytest's capsys), that stream itself."""
    sys.stdout.flush()
    try:
        return os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError and a ValueError
        return sys.stdout


class OutputLog:
    """Sends file descriptors 1 and 2 of this process (Python's and C libraries' output, Ray's streamed
    worker output) to a log file until `close`. It starts in a temporary file, because the study folder
    may not be written before the study's checks pass; `move_to` then carries what it holds to the study's
    `logs/` and goes on there."""

    def __init__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = os.dup(1), os.dup(2)
        fd, name = tempfile.mkstemp(prefix="ia2ray-study-", suffix=".log")
        self.path = Path(name)
        self._point(fd)

    def _point(self, fd: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def move_to(self, path: Path) -> None:
        if path == self.path:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        with open(path, "ab") as dst:
            dst.write(self.path.read_bytes())
        self.path.unlink(missing_ok=True)
        self.path = path
        self._point(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))

    def close(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)
