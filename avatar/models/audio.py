"""Whisper audio features for audio of any length (§6 of the dossier).

The official code runs Whisper-tiny once, on the first 30 s of the audio only. We run it on overlapping 30 s pieces:
each piece keeps its centre and drops ``context_seconds`` on the sides that have neighbours, so every kept Whisper
frame has real audio around it instead of sitting at a window edge. Audio that fits one piece (≤ 30 s) takes exactly
the official path: one window from sample 0, features bit-identical to the official ones.

Whisper adds absolute positional embeddings and attends over its whole 30 s window, so no piece plan can equal a
single pass over a longer input (there is none: positions stop at 1500 frames). What the plan guarantees is the
bookkeeping (a kept frame's features are those of the window it was computed in, at the right offset) and that every
kept frame sees ``context_seconds`` or more of real neighbouring audio on each side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avatar.io.errors import InputError

log = logging.getLogger(__name__)

#: Whisper's input rate and its encoder frame rate (two mel hops of 160 samples per encoder frame).
WHISPER_SAMPLE_RATE = 16000
WHISPER_FRAMES_PER_SECOND = 50
SAMPLES_PER_WHISPER_FRAME = WHISPER_SAMPLE_RATE // WHISPER_FRAMES_PER_SECOND


def num_video_frames(num_samples: int, sample_rate: int, fps: float) -> int:
    """Video frames covering the audio: its duration times fps, rounded to the nearest frame (half up).

    The official count is ``len(wav) // 640`` (floor at 16 kHz / 25 fps), which can drop the last partial frame; the
    nearest frame keeps the video duration within half a frame of the audio's.
    """
    if num_samples <= 0:
        raise InputError(f"audio: {num_samples} samples; the audio must not be empty")
    return max(1, int(num_samples * fps / sample_rate + 0.5))


def frame_windows(whisper_feats: torch.Tensor, num_frames: int, window: int = 10, lead_in: int = 4) -> torch.Tensor:
    """Per-video-frame windows of Whisper frames: ``[N50, layers, C]`` → ``[num_frames, window, layers, C]``.

    ``lead_in`` zero frames are prepended; video frame f takes frames ``[2f, 2f + window)`` of the padded array, i.e.
    original frames ``[2f - lead_in, 2f - lead_in + window)``. Frames past the end are zeros.
    """
    num_whisper, num_layers, num_channels = whisper_feats.shape
    needed = 2 * (num_frames - 1) + window if num_frames > 0 else 0
    padded = whisper_feats.new_zeros(max(needed, lead_in + num_whisper), num_layers, num_channels)
    padded[lead_in : lead_in + num_whisper] = whisper_feats
    starts = torch.arange(num_frames, device=whisper_feats.device) * 2
    index = starts[:, None] + torch.arange(window, device=whisper_feats.device)[None, :]
    return padded[index]


@dataclass(frozen=True)
class AudioPiece:
    """One Whisper window: the samples it reads and the encoder frames (absolute, 50 Hz) it contributes."""

    input_start: int
    """First audio sample of the window (a multiple of one encoder frame, 320 samples)."""
    keep_start: int
    """First absolute Whisper frame kept from this window."""
    keep_stop: int
    """One past the last absolute Whisper frame kept."""


def plan_pieces(num_samples: int, chunk_seconds: float = 30.0, context_seconds: float = 2.0) -> list[AudioPiece]:
    """Split ``num_samples`` of 16 kHz audio into Whisper windows of ``chunk_seconds`` with overlapping context.

    One window when the audio fits (the official case, all of its frames kept). Otherwise window p > 0 starts
    ``context_seconds`` before the frames it keeps, the first keeps all but its last ``context_seconds``, the others
    keep ``chunk - 2·context`` seconds, and the last keeps everything to its end (like the official, the frames past
    the audio describe Whisper's zero padding).
    """
    window = round(chunk_seconds * WHISPER_FRAMES_PER_SECOND)
    context = round(context_seconds * WHISPER_FRAMES_PER_SECOND)
    keep = window - 2 * context
    if keep <= 0:
        raise InputError(
            f"audio.context_seconds={context_seconds}: two contexts must leave room in a {chunk_seconds} s piece"
        )
    num_audio_frames = -(-num_samples // SAMPLES_PER_WHISPER_FRAME)
    pieces = []
    start = 0
    keep_start = 0
    while True:
        if start + window >= num_audio_frames:
            pieces.append(AudioPiece(start * SAMPLES_PER_WHISPER_FRAME, keep_start, start + window))
            return pieces
        keep_stop = start + window - context
        pieces.append(AudioPiece(start * SAMPLES_PER_WHISPER_FRAME, keep_start, keep_stop))
        keep_start = keep_stop
        start = keep_start - context


class AudioFeatureEncoder:
    """Whisper-tiny encoder features per video frame (``WhisperFeatureExtractor`` + ``WhisperModel.encoder``)."""

    def __init__(
        self,
        whisper_dir: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        chunk_seconds: float = 30.0,
        context_seconds: float = 2.0,
    ):
        from transformers import WhisperFeatureExtractor, WhisperModel

        whisper_dir = Path(whisper_dir)
        if not (whisper_dir / "config.json").is_file():
            raise InputError(f"whisper: {whisper_dir} has no config.json; expected the whisper-tiny folder")
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(whisper_dir)
        self.encoder = WhisperModel.from_pretrained(whisper_dir, dtype=dtype).encoder.to(device).eval()
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunk_seconds = chunk_seconds
        self.context_seconds = context_seconds
        window_samples = round(chunk_seconds * WHISPER_SAMPLE_RATE)
        if window_samples != self.feature_extractor.n_samples:
            raise InputError(
                f"audio.chunk_seconds={chunk_seconds}: Whisper windows are "
                f"{self.feature_extractor.n_samples / WHISPER_SAMPLE_RATE:g} s"
            )

    @torch.no_grad()
    def encode_window(self, wav16k: np.ndarray) -> torch.Tensor:
        """All hidden states of one Whisper window (zero-padded to 30 s): ``[1500, layers, C]`` in float32."""
        mel = self.feature_extractor(wav16k, sampling_rate=WHISPER_SAMPLE_RATE, return_tensors="pt").input_features
        # The official dataset stores the mel in fp16 and Whisper reads it back as fp32.
        mel = mel.to(torch.float16).to(self.dtype).to(self.device)
        hidden = self.encoder(mel, output_hidden_states=True).hidden_states
        return torch.stack(hidden, dim=2)[0].float()

    def whisper_frames(self, wav16k: np.ndarray) -> torch.Tensor:
        """Encoder hidden states for the whole audio at 50 Hz: ``[N50, layers, C]`` (float32)."""
        pieces = plan_pieces(len(wav16k), self.chunk_seconds, self.context_seconds)
        window_samples = self.feature_extractor.n_samples
        parts = []
        for piece in pieces:
            feats = self.encode_window(wav16k[piece.input_start : piece.input_start + window_samples])
            offset = piece.input_start // SAMPLES_PER_WHISPER_FRAME
            parts.append(feats[piece.keep_start - offset : piece.keep_stop - offset])
        if len(pieces) > 1:
            log.info("encoded %.1f s of audio in %d Whisper pieces", len(wav16k) / WHISPER_SAMPLE_RATE, len(pieces))
        return torch.cat(parts)

    def features(
        self,
        wav16k: np.ndarray,
        num_frames: int,
        window: int = 10,
        lead_in: int = 4,
        out_dtype: torch.dtype = torch.float16,
    ) -> torch.Tensor:
        """Audio windows for ``num_frames`` video frames at 25 fps: ``[num_frames, window, layers, C]``.

        ``wav16k`` is float32 mono at 16 kHz. The official features are stored in fp16 (``out_dtype``).
        """
        wav16k = np.asarray(wav16k, dtype=np.float32)
        if wav16k.ndim != 1 or len(wav16k) == 0:
            raise InputError(f"audio: expected non-empty mono samples, got shape {tuple(wav16k.shape)}")
        feats = self.whisper_frames(wav16k)
        return frame_windows(feats, num_frames, window, lead_in).to(out_dtype)
