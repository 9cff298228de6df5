"""Progress of long jobs (prep, merge, verify, eval): a bar on a terminal, a line at a steady interval in a log.

``tqdm`` prints nothing when stderr is not a terminal (``disable=None``), so a Slurm log showed no sign of life
for hours. :func:`progress` keeps the bar on a terminal and otherwise writes one line every ``interval`` seconds
(and a last one at the end)::

    [2026-12-06 13:02:11] p3 train: 41,200/125,000 rows (2,310/s, ETA 36 s)
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

DEFAULT_INTERVAL = float(os.environ.get("HYPERTRAIN_PROGRESS_INTERVAL", "30"))
"""Seconds between two log lines (``$HYPERTRAIN_PROGRESS_INTERVAL``; default 30)."""


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


class LogProgress:
    """The log form: ``update(n)`` counts; a line every ``interval`` seconds and at ``close()``."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float = DEFAULT_INTERVAL,
                 file: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.file = file or sys.stderr
        self.n = 0
        self.started = self.last = time.monotonic()
        self.closed = False

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.n / elapsed
        count = f"{self.n:,}" + (f"/{self.total:,}" if self.total is not None else "")
        eta = ""
        if self.total is not None and rate > 0 and self.n < self.total:
            eta = f", ETA {_duration((self.total - self.n) / rate)}"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        return f"[{stamp}] {self.desc}: {count} {self.unit}s ({rate:,.1f}/s{eta})"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self.line(), file=self.file, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            print(self.line() + " done", file=self.file, flush=True)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int | None, desc: str, unit: str = "item", file: TextIO | None = None,
             interval: float = DEFAULT_INTERVAL) -> Any:
    """A tqdm bar when ``file`` (stderr) is a terminal, else :class:`LogProgress`; both have ``update`` and
    ``close`` and are context managers."""
    stream = file or sys.stderr
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream)
    return LogProgress(total, desc, unit, interval, stream)
