"""Logging: one format with a rank prefix; INFO on rank 0, WARNING elsewhere; progress bars on rank 0 only."""

from __future__ import annotations

import logging
import os
import sys
import time

from avatar.progress import progress  # noqa: F401  (re-exported: the one progress-bar helper)

_START = time.monotonic()


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        elapsed = record.created - (time.time() - (time.monotonic() - _START))
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return f"[rank{self.rank} {elapsed:7.1f}s {record.levelname[0]}] {message}"


def setup_logging(rank: int = 0, verbose_ranks: bool = False) -> None:
    """Configure the root logger for this process (call again after the rank is known)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            # Hydra's job log (launch.submit, multirun): keep it, with our lines in our format.
            handler.setFormatter(_RankFormatter(rank))
        else:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RankFormatter(rank))
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 or verbose_ranks else logging.WARNING)
    # our own bars cover the long steps; the hub's per-file loading bars only clutter the log (set before import)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("httpx", "urllib3", "filelock", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
