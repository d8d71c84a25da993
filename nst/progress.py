"""Progress you can read: a rich progress bar (rate, ETA) in an interactive terminal, plain periodic log lines
elsewhere (CI, Prefect logs, files), so logs stay grep-able and never fill with carriage returns."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("nst.progress")

PLAIN_EVERY_S = float(os.environ.get("NST_PROGRESS_EVERY_S", "10"))


def interactive() -> bool:
    if os.environ.get("NST_PROGRESS", "").lower() in ("plain", "0", "off"):
        return False
    return sys.stderr.isatty() and os.environ.get("TERM", "") != "dumb"


class Progress:
    """`with Progress("g1/label", total=N, unit="img") as p: p.advance(n, loss=...)`."""

    def __init__(self, desc: str, total: int | None, unit: str = "it", logger: logging.Logger | None = None):
        self.desc, self.total, self.unit = desc, total, unit
        self.log = logger or log
        self.done, self.t0, self.last = 0, time.monotonic(), time.monotonic()
        self.info: dict[str, Any] = {}
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
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.info.items())

    def advance(self, n: int = 1, **info: Any) -> None:
        self.done += n
        self.info.update(info)
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{self.rate():.1f} {self.unit}/s", info=self._info())
        elif now - self.last >= PLAIN_EVERY_S:
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
