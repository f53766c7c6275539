"""Streaming output of the ``segments`` strategy (rank 0).

Segment ``i`` of ``L_i`` latents starting at latent ``s_i`` decodes to video frames ``4·s_i … 4·(s_i + L_i − 1)``.
Neighbouring segments overlap by ``4·overlap − 3`` frames, which are cross-faded with
``windows.crossfade_weights`` (a linear ramp). A frame is blended from at most two segments: where three cover it
(the last segment is moved back to end with the audio, or the overlap exceeds half a window), a later segment skips
the frames already emitted. Frames go into
the main writer as soon as they are final, and each segment's finished stretch is also written as its own playable
mp4 (with the matching slice of the audio) listed in ``<output>.segments/manifest.json``: a job that dies leaves a
playable partial result.

Memory: only the overlap tail of the previous segment is held.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from avatar.config import FPS
from avatar.pipeline.seams import SeamMeter
from avatar.pipeline.windows import crossfade_weights, latents_for_frames

log = logging.getLogger(__name__)


class SegmentStreamer:
    def __init__(self, output: str, inputs, segments, window: int, cfg, enabled: bool = True) -> None:
        self.enabled = enabled
        self.cfg = cfg
        self.inputs = inputs
        self.num_frames = inputs.num_frames
        ratio = cfg.model.vae_temporal_ratio
        total_latents = latents_for_frames(inputs.num_frames, ratio)
        # (first video frame, last video frame inclusive) of each segment
        self.spans = [
            (ratio * s.start, ratio * (s.start + min(window, total_latents - s.start) - 1)) for s in segments
        ]
        self.position: dict[int, int] = {}  # segment -> frames received so far
        self.tail: list[np.ndarray] = []  # previous segment's frames inside the current overlap (not yet emitted)
        self.tail_start = 0
        self.fade: list[float] = []  # incoming weights over the current overlap
        self.hold: list[np.ndarray] = []  # this segment's frames inside the next overlap
        self.hold_start = 0
        self.next_frame = 0
        self.segment_frames: list[np.ndarray] = []  # finalised frames of the current segment (for its own file)
        self.segment_first = 0
        self.meter = SeamMeter([start for start, _ in self.spans[1:]]) if enabled else None
        self.folder = Path(output + ".segments")
        self.manifest: list[dict] = []
        if enabled:
            if self.folder.exists():
                shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True)

    def add(self, index: int, frames: np.ndarray, writer) -> None:
        """Frames ``[n, H, W, 3]`` of segment ``index``, in order."""
        first, _ = self.spans[index]
        next_start = self.spans[index + 1][0] if index + 1 < len(self.spans) else None
        pos = self.position.get(index, 0)
        for frame in frames:
            g = first + pos
            pos += 1
            if g >= self.num_frames or g < self.next_frame:
                # past the audio, or already final: where a moved-back last segment (or a large overlap) covers a
                # frame with three segments, the first two have blended and emitted it (never twice)
                continue
            k = g - self.tail_start
            if self.tail and 0 <= k < len(self.tail):
                w = float(self.fade[k])
                blended = self.tail[k].astype(np.float32) * (1 - w) + frame.astype(np.float32) * w
                self._emit(np.clip(np.round(blended), 0, 255).astype(np.uint8), writer)
            elif next_start is not None and g >= next_start:
                if not self.hold:
                    self.hold_start = g
                self.hold.append(frame.copy())
            else:
                self._emit(frame, writer)
        self.position[index] = pos

    def _emit(self, frame: np.ndarray, writer) -> None:
        writer.write(frame[None])
        self.meter.add(frame[None])
        if not self.segment_frames:
            self.segment_first = self.next_frame
        self.segment_frames.append(frame)
        self.next_frame += 1

    def finish_segment(self, index: int, writer) -> None:
        """Segment ``index`` is fully decoded: its held overlap becomes the next tail, and its finished stretch becomes
        a playable file in the manifest."""
        self.tail, self.tail_start, self.hold = self.hold, self.hold_start, []
        self.fade = crossfade_weights(len(self.tail)).tolist()
        if index == len(self.spans) - 1:
            for frame in self.tail:  # nothing follows: the held frames are final as they are
                self._emit(frame, writer)
            self.tail = []
        if self.segment_frames:
            self._write_segment_file(index, np.stack(self.segment_frames))
            self.segment_frames = []

    def _write_segment_file(self, index: int, frames: np.ndarray) -> None:
        import soundfile as sf

        from avatar.io.atomic import atomic_write_json
        from avatar.io.video import VideoWriter

        cfg = self.cfg
        rate = cfg.audio.sample_rate
        per_frame = rate / FPS
        first = self.segment_first
        a0, a1 = round(first * per_frame), round((first + len(frames)) * per_frame)
        name = f"segment_{index:04d}"
        wav = self.folder / f".{name}.wav"
        sf.write(str(wav), self.inputs.wav[a0:a1], rate)
        path = self.folder / f"{name}.mp4"
        try:
            with VideoWriter(
                str(path),
                FPS,
                self.inputs.width,
                self.inputs.height,
                audio_path=str(wav),
                crf=cfg.output.crf,
                preset=cfg.output.preset,
                replace=True,  # inside this run's own <output>.segments folder
            ) as seg_writer:
                seg_writer.write(frames)
        finally:
            wav.unlink(missing_ok=True)
        self.manifest.append(
            {
                "index": index,
                "file": path.name,
                "first_frame": first,
                "num_frames": int(len(frames)),
                "start_seconds": first / FPS,
                "duration_seconds": len(frames) / FPS,
            }
        )
        atomic_write_json(self.folder / "manifest.json", {"fps": FPS, "complete": False, "segments": self.manifest})

    def close(self):
        """All segments done: mark the manifest complete; return the seam report."""
        if not self.enabled:
            return None
        from avatar.io.atomic import atomic_write_json

        atomic_write_json(self.folder / "manifest.json", {"fps": FPS, "complete": True, "segments": self.manifest})
        return self.meter.report()
