"""Long jobs show progress in a log (stderr not a terminal): a line at a steady interval, and one at the end."""

from __future__ import annotations

import io
import re

from hypertrain.progress import LogProgress, progress


def test_a_log_gets_count_rate_and_eta_lines_then_done():
    log = io.StringIO()  # not a terminal
    bar = progress(10, "p3 train", unit="row", file=log, interval=0.0)
    assert isinstance(bar, LogProgress)
    with bar:
        for _ in range(4):
            bar.update()
    lines = log.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].endswith(" done")
    assert re.fullmatch(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] p3 train: 4/10 rows \([\d,.]+/s, ETA \d+ s\)", lines[3])


def test_lines_are_spaced_by_the_interval():
    log = io.StringIO()
    with progress(None, "verify", unit="shard", file=log, interval=3600) as bar:
        for _ in range(100):
            bar.update()
    assert log.getvalue().count("\n") == 1 and "100 shards" in log.getvalue()  # only the final line
