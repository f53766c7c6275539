"""Seam report: how visible each window boundary is in the decoded video.

For every boundary frame ``b`` (the first frame of the next window) the report compares the mean absolute difference
between frames ``b − 1`` and ``b`` with the median difference between neighbouring frames inside the two windows
around it (boundary pairs excluded). A ratio near 1 means the seam is as smooth as ordinary motion.

Streaming: :class:`SeamMeter` takes frames in chunks as they are written and keeps only the previous frame and one
float per frame pair, so memory does not grow with the frame size times the length.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class SeamMeter:
    """Accumulates neighbouring-frame differences of a streamed uint8 video ``[n, H, W, 3]`` chunks."""

    def __init__(self, boundaries: Sequence[int]) -> None:
        self.boundaries = sorted({int(b) for b in boundaries})
        self.diffs: list[float] = []  # diffs[k - 1] = mean |frame k − frame k−1|
        self.previous: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return len(self.diffs) + (self.previous is not None)

    def add(self, frames: np.ndarray) -> None:
        """Frames ``[n, H, W, C]`` (or one frame ``[H, W, C]``), in order."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        for frame in frames:
            current = frame.astype(np.int16)
            if self.previous is not None:
                if current.shape != self.previous.shape:
                    raise ValueError(f"frame of shape {current.shape} after frames of shape {self.previous.shape}")
                self.diffs.append(float(np.abs(current - self.previous).mean()))
            self.previous = current

    def report(self) -> list[dict]:
        """One entry per boundary inside the video (boundaries at or past the last frame are skipped)."""
        num_frames = self.num_frames
        inside = [b for b in self.boundaries if 0 < b < num_frames]
        seam_pairs = set(inside)
        edges = [0, *inside, num_frames]
        entries = []
        for i, b in enumerate(inside):
            lo, hi = edges[i], edges[i + 2]  # the windows before and after b: frames [lo, hi)
            interior = [self.diffs[k - 1] for k in range(lo + 1, hi) if k not in seam_pairs]
            seam = self.diffs[b - 1]
            median = float(np.median(interior)) if interior else None
            ratio = seam / median if median else None
            entries.append(
                {
                    "frame": b,
                    "seam_diff": seam,
                    "interior_median": median,
                    "ratio": ratio,
                    "num_interior": len(interior),
                }
            )
        return entries
