"""Window planning for long audio: pure functions and frozen dataclasses, no I/O.

All lengths are in latent frames unless the name ends in ``_frames`` (video frames). One latent frame is the first
video frame, every further latent frame ``temporal_ratio`` (4) video frames: ``frames = 4·(latents − 1) + 1``.

Three strategies use these plans:

- ``shift`` (official, dossier §6): circular windows over ``infer_length`` latents whose grid moves by
  ``shift_offset`` every step (:class:`OfficialShiftPlan`, :func:`shift_windows`).
- ``blend``: fixed overlapping windows (:func:`plan_windows`) denoised in lockstep and averaged every step with
  smooth weights that sum to 1 (:func:`window_weights`).
- ``segments``: the same plan (:func:`plan_segments`), each window denoised to the end on its own, decoded, and
  cross-faded in pixel space with :func:`crossfade_weights`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from avatar.io.errors import InputError

#: Zero audio frames the official appends to audio longer than one window (dossier §6).
OFFICIAL_AUDIO_TAIL_PAD = 5
#: The official cap on audio frames (16 s at 25 fps); our plans are uncapped unless asked.
OFFICIAL_MAX_FRAMES = 400

POSITIONS = ("first", "middle", "last", "only")


# --- latent ↔ video frames ----------------------------------------------------------------------------------------


def latents_for_frames(num_video_frames: int, temporal_ratio: int = 4) -> int:
    """Latent frames whose decoded video covers ``num_video_frames``: ``ceil((n − 1) / r) + 1``."""
    if num_video_frames < 1:
        raise InputError(f"num_video_frames={num_video_frames}: need at least 1 video frame")
    if temporal_ratio < 1:
        raise ValueError(f"temporal_ratio={temporal_ratio}: must be >= 1")
    return (num_video_frames - 1 + temporal_ratio - 1) // temporal_ratio + 1


def frames_for_latents(num_latents: int, temporal_ratio: int = 4) -> int:
    """Video frames decoded from ``num_latents`` latent frames: ``r·(n − 1) + 1``."""
    if num_latents < 1:
        raise ValueError(f"num_latents={num_latents}: need at least 1 latent frame")
    return temporal_ratio * (num_latents - 1) + 1


# --- fixed overlapping windows (blend, segments) ------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Latent frames ``[start, stop)`` of one window. A window may run past the end of a video shorter than one
    window; the frames past the end are generated and cropped."""

    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    def clipped_stop(self, num_latents: int) -> int:
        """``stop`` limited to the video's length."""
        return min(self.stop, num_latents)


def plan_windows(num_latents: int, window: int, overlap: int) -> tuple[Window, ...]:
    """Windows of exactly ``window`` latents covering ``[0, num_latents)``, neighbours overlapping by ``overlap``.

    The windows advance by ``window − overlap``; the last one is moved back to end exactly at ``num_latents`` (so its
    overlap with the previous window may be larger). A video shorter than one window gets a single window of
    ``window`` latents whose tail is cropped (the official pads short audio to a full window the same way).
    """
    if num_latents < 1:
        raise InputError(f"num_latents={num_latents}: need at least 1 latent frame")
    if window < 1:
        raise InputError(f"window={window}: need at least 1 latent frame per window")
    if not 0 <= overlap < window:
        raise InputError(
            f"long.overlap_frames={overlap} with a window of {window} latent frames: overlap must be in 0..{window - 1}"
        )
    if num_latents <= window:
        return (Window(0, window),)
    stride = window - overlap
    num_windows = math.ceil((num_latents - window) / stride) + 1
    starts = [i * stride for i in range(num_windows - 1)] + [num_latents - window]
    return tuple(Window(s, s + window) for s in starts)


def plan_segments(num_latents: int, window: int, overlap: int) -> tuple[Window, ...]:
    """Segments of the ``segments`` strategy: the same plan as :func:`plan_windows`."""
    return plan_windows(num_latents, window, overlap)


def _ramp(n: int) -> torch.Tensor:
    """``n`` raised-cosine weights rising strictly inside (0, 1), float64; ``ramp + ramp.flip(0) == 1``."""
    k = torch.arange(1, n + 1, dtype=torch.float64)
    return 0.5 - 0.5 * torch.cos(math.pi * k / (n + 1))


def window_weights(windows: tuple[Window, ...] | list[Window], num_latents: int) -> list[torch.Tensor]:
    """Blend weights of each window over its in-range frames ``[start, clipped_stop)`` (fp32): raised-cosine ramps
    over the actual overlaps of the plan (1 elsewhere), normalised in float64 so that on every frame the weights of
    all windows covering it sum to 1."""
    spans = [(w.start, w.clipped_stop(num_latents)) for w in windows]
    profiles = []
    for i, (start, stop) in enumerate(spans):
        left = max(0, spans[i - 1][1] - start) if i > 0 else 0
        right = max(0, stop - spans[i + 1][0]) if i + 1 < len(spans) else 0
        profile = torch.ones(stop - start, dtype=torch.float64)
        if left:
            profile[:left] = _ramp(left)
        if right:
            profile[stop - start - right :] = torch.minimum(profile[stop - start - right :], _ramp(right).flip(0))
        profiles.append(profile)
    total = torch.zeros(num_latents, dtype=torch.float64)
    for (start, stop), profile in zip(spans, profiles):
        total[start:stop] += profile
    if bool((total <= 0).any()):
        missing = torch.nonzero(total <= 0).flatten().tolist()
        raise ValueError(f"latent frames {missing[:8]} are covered by no window")
    return [(profile / total[start:stop]).to(torch.float32) for (start, stop), profile in zip(spans, profiles)]


def crossfade_weights(num_frames_overlap: int) -> torch.Tensor:
    """Weights ``[n]`` (fp32) of the *incoming* segment over an overlap of ``n`` video frames: the linear ramp
    ``(k + 1) / (n + 1)``, strictly inside (0, 1); the outgoing segment gets ``1 − w``."""
    if num_frames_overlap < 0:
        raise ValueError(f"num_frames_overlap={num_frames_overlap}: must be >= 0")
    k = torch.arange(1, num_frames_overlap + 1, dtype=torch.float64)
    return (k / (num_frames_overlap + 1)).to(torch.float32)


# --- the official shifted circular windows ------------------------------------------------------------------------


@dataclass(frozen=True)
class OfficialShiftPlan:
    """Geometry of the official long-audio scheme for one audio clip (dossier §6), generalised to any window size.

    With ``W`` latents per window and ``F = r·(W − 1)`` video frames per window step (128 for the official 33/4):

    - ``padded_audio`` A: audio frames padded to one window (``W`` frames of video) when shorter, otherwise
      ``num_frames + 5``;
    - ``video_length`` = A // r + 1 latents are kept (decoded: r·(video_length − 1) + 1 ≥ A − r + 1 frames);
    - ``infer_length`` = (A // F + 1)·(W − 1) + 1 latents are denoised; the last ones are bridge frames on zero audio
      that the circular windows wrap through;
    - a single window (no shift) when ``video_length == W``; ``noise_length`` is the length the official draws noise
      for before trimming to one window (seed-exact reproduction).

    The formula is the official one for every length: with ``max_frames=None`` (our default) there is no 400-frame
    cap, ``infer_length`` keeps growing by ``W − 1`` latents per ``F`` audio frames and ``windows_per_step`` by one
    window per ``W`` latents.
    """

    num_frames: int  # audio length in video frames, as given
    used_frames: int  # after the optional cap
    window: int  # W, latents per window
    temporal_ratio: int  # r
    padded_audio: int  # A
    video_length: int  # latents kept
    infer_length: int  # latents denoised (circular domain)
    noise_length: int  # latents the official draws noise for

    @property
    def single(self) -> bool:
        """One window, no shift."""
        return self.infer_length == self.window

    @property
    def windows_per_step(self) -> int:
        return math.ceil(self.infer_length / self.window)


def official_shift_plan(
    num_frames: int, window_frames: int = 129, temporal_ratio: int = 4, max_frames: Optional[int] = None
) -> OfficialShiftPlan:
    """The official geometry for ``num_frames`` frames of audio (``max_frames=400`` reproduces the official cap)."""
    if num_frames < 1:
        raise InputError(f"audio of {num_frames} frames: need at least 1 frame")
    window = latents_for_frames(window_frames, temporal_ratio)
    if window < 2 or frames_for_latents(window, temporal_ratio) != window_frames:
        raise ValueError(
            f"model.window_frames={window_frames}: must be {temporal_ratio}·k + 1 video frames with k >= 1 "
            f"(temporal ratio {temporal_ratio})"
        )
    used = num_frames if max_frames is None else min(num_frames, max_frames)
    padded = window_frames if used <= window_frames else used + OFFICIAL_AUDIO_TAIL_PAD
    step_frames = temporal_ratio * (window - 1)
    video_length = padded // temporal_ratio + 1
    noise_length = (padded // step_frames + 1) * (window - 1) + 1
    infer_length = window if video_length == window or noise_length == window else noise_length
    return OfficialShiftPlan(
        num_frames=num_frames,
        used_frames=used,
        window=window,
        temporal_ratio=temporal_ratio,
        padded_audio=padded,
        video_length=video_length,
        infer_length=infer_length,
        noise_length=noise_length,
    )


def shift_at(step: int, window: int, shift_offset: int) -> int:
    """The grid offset at ``step``: ``(step·shift_offset) mod window`` (0, 10, 20, 30, 7, 17, … for 33 and 10)."""
    if step < 0:
        raise ValueError(f"step={step}: must be >= 0")
    return (step * shift_offset) % window


def _shift_starts(step: int, infer_length: int, window: int, shift_offset: int) -> list[int]:
    if window < 1 or infer_length < window:
        raise ValueError(f"infer_length={infer_length} must be >= window={window} >= 1")
    shift = shift_at(step, window, shift_offset)
    return [start - shift for start in range(0, infer_length, window)]


def shift_windows(step: int, infer_length: int, window: int, shift_offset: int) -> list[list[int]]:
    """Latent indices of every window at ``step``: ``[(s + k) mod infer_length for k < window]`` for
    ``s = start − shift``, ``start`` in ``range(0, infer_length, window)``. Windows wrap around (tail, then frame 0);
    a single window (``infer_length == window``) never shifts, as in the official code."""
    if infer_length == window:
        _shift_starts(0, infer_length, window, 0)
        return [list(range(window))]
    starts = _shift_starts(step, infer_length, window, shift_offset)
    return [[(s + k) % infer_length for k in range(window)] for s in starts]
