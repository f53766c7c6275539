"""Whisper features: the per-frame window mapping, the official ≤30 s path, and pieces for long audio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from avatar.config import OFFICIAL_WHISPER_DIR, ModelConfig
from avatar.models.audio import (
    SAMPLES_PER_WHISPER_FRAME,
    AudioFeatureEncoder,
    frame_windows,
    num_video_frames,
    plan_pieces,
)
from avatar.weights.tiny_cond import make_tiny_whisper

ROOT = Path(__file__).resolve().parents[2]
SR = 16000


def tiny_config() -> ModelConfig:
    return OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / "configs/model/tiny.yaml"))
    )


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> AudioFeatureEncoder:
    root = tmp_path_factory.mktemp("weights")
    make_tiny_whisper(root, tiny_config(), seed=3)
    return AudioFeatureEncoder(root / OFFICIAL_WHISPER_DIR)


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Stationary noise with a slow syllable-rate envelope (never silent, so Whisper's log-mel floor stays idle)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 3.0 * t)
    return (0.1 * envelope * rng.standard_normal(t.shape)).astype(np.float32)


def test_frame_windows_lead_in_window_and_end_padding():
    num_whisper = 20
    feats = (torch.arange(num_whisper, dtype=torch.float32) + 1)[:, None, None].expand(num_whisper, 2, 3)
    windows = frame_windows(feats, num_frames=14, window=10, lead_in=4)
    assert windows.shape == (14, 10, 2, 3)
    values = windows[:, :, 0, 0]
    # frame 0: four zero lead-in frames, then original frames 0..5 (values 1..6)
    assert values[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    # frame f covers original frames [2f-4, 2f+6)
    assert values[5].tolist() == [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    # past the end: zeros (frame 9 reaches original frame 23, only 0..19 exist)
    assert values[9].tolist() == [15, 16, 17, 18, 19, 20, 0, 0, 0, 0]
    assert values[11].tolist() == [19, 20] + [0] * 8
    assert values[13].abs().sum() == 0  # frames [22, 32): nothing left
    assert torch.equal(windows[:, :, 1], windows[:, :, 0])


def test_num_video_frames_rounds_to_nearest():
    assert num_video_frames(16000 * 5, 16000, 25) == 125
    assert num_video_frames(16000 * 5 + 319, 16000, 25) == 125  # < half a frame (640 samples) over
    assert num_video_frames(16000 * 5 + 320, 16000, 25) == 126  # half a frame: rounds up (official floor: 125)
    assert num_video_frames(100, 16000, 25) == 1


def test_plan_pieces_cover_the_audio_with_context():
    assert plan_pieces(30 * SR) == [plan_pieces(30 * SR)[0]]
    single = plan_pieces(30 * SR)[0]
    assert (single.input_start, single.keep_start, single.keep_stop) == (0, 0, 1500)
    pieces = plan_pieces(70 * SR, chunk_seconds=30, context_seconds=2)
    assert [(p.input_start // SR, p.keep_start, p.keep_stop) for p in pieces] == [
        (0, 0, 1400),
        (26, 1400, 2700),
        (52, 2700, 4100),
    ]
    for piece in pieces[1:]:
        # 2 s (100 frames) of real audio before every kept frame of a later piece
        assert piece.keep_start - piece.input_start // SAMPLES_PER_WHISPER_FRAME == 100


def test_short_audio_equals_the_official_single_pass(encoder):
    """≤30 s: one Whisper window from sample 0, exactly the official computation (mel fp16 → fp32, all hidden
    states stacked, 4 zero frames prepended, frame f reads [2f, 2f+10))."""
    wav = speech_like(5.0)
    num_frames = num_video_frames(len(wav), SR, 25)
    ours = encoder.features(wav, num_frames)

    mel = encoder.feature_extractor(wav, sampling_rate=SR, return_tensors="pt").input_features.half().float()
    with torch.no_grad():
        hidden = encoder.encoder(mel[:, :, :3000], output_hidden_states=True).hidden_states
    stacked = torch.stack(hidden, dim=2)
    stacked = torch.cat([torch.zeros_like(stacked[:, :4]), stacked], dim=1)
    official = torch.stack([stacked[0, 2 * f : 2 * f + 10] for f in range(num_frames)]).half()
    assert ours.shape == (125, 10, 3, 16) and ours.dtype == torch.float16
    assert torch.equal(ours, official)


def test_long_audio_pieces_keep_their_windows_at_the_right_offsets(encoder):
    """70 s in three pieces. The kept frames of each piece are that window's own hidden states at the right offset:
    piece 0 equals the single 30 s pass over the first 30 s (what the official computes) on [0, 28 s), piece 1 the
    pass over [26 s, 56 s) on [28 s, 54 s). An off-by-one in samples or frames breaks the equality."""
    wav = speech_like(70.0, seed=1)
    frames = encoder.whisper_frames(wav)
    assert frames.shape == (4100, 3, 16)
    first = encoder.encode_window(wav[: 30 * SR])
    assert torch.equal(frames[:1400], first[:1400])
    second = encoder.encode_window(wav[26 * SR : 56 * SR])
    assert torch.equal(frames[1400:2700], second[100:1400])
    last = encoder.encode_window(wav[52 * SR :])
    assert torch.equal(frames[2700:], last[100:])
    features = encoder.features(wav, num_video_frames(len(wav), SR, 25))
    assert features.shape == (1750, 10, 3, 16)
    assert torch.equal(features[1000], frame_windows(frames, 1001)[1000].half())


def test_neighbouring_pieces_agree_on_the_audio_they_share(encoder):
    """Continuity: where two pieces overlap (26–30 s), the audio content reaching the encoder is the same in both.
    Whisper's embedding output is conv(mel) + absolute position embedding; with the positions removed, the two
    windows agree away from their edges, so the pieces are aligned to the sample. Deeper layers still differ
    (global attention over different 30 s, absolute positions): that part cannot be continuous with any plan."""
    wav = speech_like(70.0, seed=2)
    first = encoder.encode_window(wav[: 30 * SR])[:, 0]
    second = encoder.encode_window(wav[26 * SR : 56 * SR])[:, 0]
    positions = encoder.encoder.embed_positions.weight.float()
    content_first = (first - positions)[1305:1495]
    content_second = (second - positions)[5:195]
    torch.testing.assert_close(content_first, content_second, atol=1e-6, rtol=0)
    # A one-frame misalignment is far off, so the check above has teeth.
    assert (content_first[1:] - content_second[:-1]).abs().max() > 1e-3
