"""Progress: shown by rank 0 only. On a terminal a tqdm bar on stderr; otherwise (Slurm logs, Hydra job logs, pipes)
plain log lines, one per tenth of the work (and at least every ``PLAIN_EVERY_SECONDS``), with done/total, elapsed and
the estimated time left, so a log file never fills with ``\\r`` bar redraws."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("avatar.progress")

#: Longest gap between two plain progress lines.
PLAIN_EVERY_SECONDS = 60.0


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PlainProgress:
    """tqdm's small interface (iterate, ``update``, ``close``, context manager) as log lines."""

    def __init__(self, iterable=None, *, total=None, desc: str = "", unit: str = "it", disable: bool = False):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc = desc
        self.unit = unit
        self.disable = disable
        self.n = 0
        self.start = time.monotonic()
        self._last_time = self.start
        self._last_tenth = 0

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        if self.total:
            left = elapsed / self.n * (self.total - self.n) if self.n else float("nan")
            eta = format_seconds(left) if self.n else "?"
            return (
                f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n // self.total}%), "
                f"{format_seconds(elapsed)} elapsed, ETA {eta}"
            )
        return f"{self.desc}: {self.n} {self.unit}, {format_seconds(elapsed)} elapsed"

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = time.monotonic()
        tenth = 10 * self.n // self.total if self.total else 0
        if tenth > self._last_tenth or now - self._last_time >= PLAIN_EVERY_SECONDS:
            self._last_tenth, self._last_time = tenth, now
            log.info("%s", self.line())

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable=None, *, total=None, desc: str = "", rank: int = 0, unit: str = "it", tty: bool | None = None):
    """A progress bar for rank 0 (a plain pass-through elsewhere): tqdm on a terminal, log lines otherwise."""
    if tty is None:
        tty = sys.stderr.isatty()
    if not tty:
        return PlainProgress(iterable, total=total, desc=desc, unit=unit, disable=rank != 0)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=rank != 0,
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
    )
