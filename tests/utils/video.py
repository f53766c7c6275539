"""Reading our mp4s back in tests."""

from __future__ import annotations

import os

import numpy as np


def read_frames(path) -> np.ndarray:
    """All video frames of ``path`` as ``[n, H, W, 3]`` uint8 RGB."""
    import av

    with av.open(os.fspath(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.stack(frames)
