"""Progress reporting for long loops: done / total, rate and ETA at a sensible cadence (no Dagster)."""

from __future__ import annotations

import time
from collections.abc import Callable


class ProgressReporter:
    """Callable ``(done, total)`` that logs at most every ``every_s`` seconds (and at the end).

    Parameters
    ----------
    label
        What is counted, e.g. ``"lesions extracted"``.
    log
        Where the line goes (``logger.info``, ``context.log.info``).
    every_s
        Minimum seconds between two lines.
    """

    def __init__(self, label: str, log: Callable[[str], None], every_s: float = 10.0) -> None:
        self.label = label
        self.log = log
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self.last = self.t0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        self.log(f"{self.label}: {done}/{total} ({100.0 * done / max(total, 1):.0f}%), "
                 f"{rate:.2f}/s, elapsed {elapsed:.0f} s, ETA {eta:.0f} s")
