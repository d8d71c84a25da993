"""Progress you can read: a rich progress bar (rate, ETA) in an interactive terminal, plain periodic log lines
elsewhere (CI, Prefect logs, files), so logs stay grep-able and never fill with carriage returns."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("nst.progress")
_BAR_TEXT_EVERY_S = 0.5  # the terminal bar's rate and info text (its count and ETA move at every advance)

def interactive() -> bool:
    from nst.settings import progress_mode

    if progress_mode() == "plain":
        return False
    return sys.stderr.isatty() and os.environ.get("TERM", "") != "dumb"


class Progress:
    """`with Progress("g1/label", total=N, unit="img") as p: p.advance(n, loss=...)`."""

    def __init__(self, desc: str, total: int | None, unit: str = "it", logger: logging.Logger | None = None):
        self.desc, self.total, self.unit = desc, total, unit
        self.log = logger or log
        self.done, self.t0, self.last = 0, time.monotonic(), time.monotonic()
        self.info: dict[str, Any] = {}
        from nst.settings import progress_every_s

        self.every_s = progress_every_s()
        self._bar = None

    def __enter__(self) -> "Progress":
        if interactive():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TaskProgressColumn,
                                       TextColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), transient=True, console=None)
            self._bar.start()
            self._task = self._bar.add_task(self.desc, total=self.total, rate="", info="")
        return self

    def rate(self) -> float:
        return self.done / max(1e-9, time.monotonic() - self.t0)

    def _info(self) -> str:
        """The info values, callables among them called now: a value that costs something to read (a sum kept on
        the GPU: reading it waits for the GPU) is read only when shown, not at every advance."""
        shown = {k: v() if callable(v) else v for k, v in self.info.items()}
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())

    def advance(self, n: int = 1, **info: Any) -> None:
        self.done += n
        self.info.update(info)
        now = time.monotonic()
        if self._bar is not None:
            text = {}
            if now - self.last >= _BAR_TEXT_EVERY_S or self.done == n or (self.total and self.done >= self.total):
                self.last = now
                text = dict(rate=f"{self.rate():.1f} {self.unit}/s", info=self._info())
            self._bar.update(self._task, advance=n, **text)
        elif now - self.last >= self.every_s:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            eta = ""
            if self.total and self.done:
                eta = f", ETA {max(0.0, (self.total - self.done) / max(1e-9, self.rate())):.0f}s"
            self.log.info("%s: %d%s %s (%.1f %s/s%s) %s", self.desc, self.done, of, self.unit, self.rate(), self.unit,
                          eta, self._info())

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
