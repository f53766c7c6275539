"""Progress bars: shown by rank 0 only (tqdm on stderr), a plain iterator on other ranks."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, *, total=None, desc: str = "", rank: int = 0):
    return tqdm(iterable, total=total, desc=desc, disable=rank != 0, leave=False, dynamic_ncols=True, file=sys.stderr)
