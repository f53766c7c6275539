"""The long-audio strategies as objects: each computes its geometry once (window, denoised domain, kept latents,
overlap, windows per step, audio rows, seam boundaries) for one clip, and the denoise loops
(``avatar/pipeline/denoise.py``) and the renderer ask it instead of recomputing.

- ``shift`` (official, dossier §6): circular windows over ``infer_length`` latents whose grid moves by
  ``shift_offset`` every step, averaged with a counter (official fp16/bf16 storage with ``fidelity=official``);
  uncapped.
- ``blend``: fixed overlapping windows denoised in lockstep; after every step overlaps are averaged with smooth
  weights.
- ``segments``: the same windows, each denoised to the end on its own, decoded, cross-faded in pixel space and
  streamed (bounded memory, partial output).
"""

from __future__ import annotations

import torch

from avatar.config import FPS, ModelConfig, RunConfig
from avatar.pipeline import windows as win

NAMES = ("shift", "blend", "segments")


def window_latents(model: ModelConfig) -> int:
    """Latent frames per window (33 at the official 129 video frames)."""
    return win.latents_for_frames(model.window_frames, model.vae_temporal_ratio)


def default_overlap(cfg: RunConfig) -> int:
    """Overlap of ``blend``/``segments`` windows in latents: ``long.overlap_frames`` or a quarter window."""
    if cfg.long.overlap_frames > 0:
        return cfg.long.overlap_frames
    return max(1, window_latents(cfg.model) // 4)


def choose(requested: str, num_frames: int, cfg: RunConfig) -> str:
    """``auto``: the official ``shift`` scheme for short audio, ``segments`` (bounded memory, partial output) for
    audio longer than ``long.auto_segments_seconds``."""
    if requested != "auto":
        return requested
    seconds = num_frames / FPS
    return "segments" if seconds > cfg.long.auto_segments_seconds else "shift"


class Strategy:
    """Geometry of one strategy for one clip of ``num_frames`` video frames."""

    name = ""
    #: ``"official"``: stepped windows are stored as the official does (bf16 → fp16 buffer ÷ fp16 counter).
    accumulate = "fp32"

    def __init__(self, model: ModelConfig, num_frames: int, overlap: int = 0) -> None:
        self.model = model
        self.num_frames = num_frames
        self.ratio = model.vae_temporal_ratio
        self.window = window_latents(model)
        self.overlap = overlap
        self.kept = win.latents_for_frames(num_frames, self.ratio)
        self.domain = self.kept  # latents denoised (noise length)

    # --- per step --------------------------------------------------------------------------------------------------

    def windows(self, step: int) -> list[list[int]]:
        """Absolute latent frames of every window at ``step``, in window order."""
        raise NotImplementedError

    def weights(self) -> list[torch.Tensor] | None:
        """Per-frame blend weights of every window (None: counter averaging)."""
        return None

    def audio_rows(self, first_latent: int) -> list[int]:
        """Audio-feature rows (video frames) of a window starting at latent ``first_latent``: 4W − 3 rows."""
        first = self.ratio * first_latent
        return list(range(first, first + self.ratio * (self.window - 1) + 1))

    def window_audio(self, audio_feats: torch.Tensor, frames: list[int]) -> torch.Tensor:
        """``audio_feats`` rows of the window over latent ``frames`` (zero rows past the end of the audio)."""
        rows = torch.as_tensor(self.audio_rows(frames[0]), dtype=torch.long)
        length = max(int(rows.max()) + 1, audio_feats.shape[0])
        if length > audio_feats.shape[0]:
            pad = audio_feats.new_zeros((length - audio_feats.shape[0], *audio_feats.shape[1:]))
            audio_feats = torch.cat([audio_feats, pad])
        return audio_feats[rows.to(audio_feats.device)]

    @property
    def windows_per_step(self) -> int:
        return len(self.windows(0))

    # --- report ----------------------------------------------------------------------------------------------------

    def boundaries(self) -> list[int]:
        """Video frames where one window's frames meet the next (for the seam report)."""
        return [self.ratio * w[0] for w in self.windows(0)[1:]]

    def details(self) -> list[dict]:
        return [{"start_latent": w[0], "latents": len(w)} for w in self.windows(0)]


class Shift(Strategy):
    name = "shift"

    def __init__(self, model: ModelConfig, num_frames: int, overlap: int = 0, fidelity: str = "official") -> None:
        super().__init__(model, num_frames, overlap)
        self.plan = win.official_shift_plan(num_frames, model.window_frames, self.ratio)
        self.kept = self.plan.video_length
        self.domain = self.plan.infer_length
        self.accumulate = "official" if fidelity == "official" else "fp32"

    def windows(self, step: int) -> list[list[int]]:
        return win.shift_windows(step, self.domain, self.window, self.model.shift_offset)

    def audio_rows(self, first_latent: int) -> list[int]:
        # The official circular index (r·s + j) mod r·L over r·infer_length rows (zero-padded features), with
        # s = start − shift; r·(s mod L) ≡ r·s (mod r·L), so the window's first latent gives the same rows.
        period = self.ratio * self.domain
        return [(row % period) for row in super().audio_rows(first_latent)]

    def boundaries(self) -> list[int]:
        return [self.ratio * s for s in range(self.window, self.kept, self.window)]

    def details(self) -> list[dict]:
        return [
            {"start_latent": s, "latents": self.window, "circular": True} for s in range(0, self.domain, self.window)
        ]


class Blend(Strategy):
    name = "blend"

    def __init__(self, model: ModelConfig, num_frames: int, overlap: int = 0, fidelity: str = "official") -> None:
        super().__init__(model, num_frames, overlap)
        self.domain = max(self.kept, self.window)
        self.plan = win.plan_windows(self.domain, self.window, overlap)
        self._weights = win.window_weights(self.plan, self.domain)

    def windows(self, step: int) -> list[list[int]]:
        return [list(range(w.start, w.stop)) for w in self.plan]

    def weights(self) -> list[torch.Tensor]:
        return self._weights

    def boundaries(self) -> list[int]:
        return [self.ratio * w.start for w in win.plan_windows(self.kept, self.window, self.overlap)[1:]]


class Segments(Strategy):
    """Each window (segment) is denoised from its own noise to the end; ``windows`` lists the segments."""

    name = "segments"

    def __init__(self, model: ModelConfig, num_frames: int, overlap: int = 0, fidelity: str = "official") -> None:
        super().__init__(model, num_frames, overlap)
        self.plan = win.plan_segments(self.kept, self.window, overlap)
        self.domain = max(self.kept, self.window)

    def windows(self, step: int) -> list[list[int]]:
        return [list(range(w.start, w.stop)) for w in self.plan]

    def kept_latents(self, index: int) -> int:
        """Latents of segment ``index`` that lie inside the video."""
        return self.plan[index].clipped_stop(self.kept) - self.plan[index].start


STRATEGIES = {cls.name: cls for cls in (Shift, Blend, Segments)}


def make(name: str, model: ModelConfig, num_frames: int, overlap: int, fidelity: str) -> Strategy:
    """The strategy ``name`` for a clip of ``num_frames`` video frames."""
    if name not in STRATEGIES:
        raise ValueError(f"long.strategy={name!r}: valid are {', '.join(NAMES)} or auto")
    return STRATEGIES[name](model, num_frames, overlap, fidelity)


def for_run(cfg: RunConfig, requested: str, num_frames: int) -> Strategy:
    """The strategy a render uses (``requested`` may be ``auto``)."""
    return make(choose(requested, num_frames, cfg), cfg.model, num_frames, default_overlap(cfg), cfg.sampling.fidelity)
