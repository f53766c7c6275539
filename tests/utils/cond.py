"""Random conditioning of the tiny model for the multi-rank denoise tests (seeded: the same on every rank)."""

from __future__ import annotations

import torch

from avatar.pipeline import denoise as dn


def random_conditioning(m, num_latents: int, side: int, seed: int = 1) -> dn.Conditioning:
    """``Conditioning`` for ``num_latents`` latent frames of ``side``×``side`` latents under model config ``m``; the
    text mask keeps 7 valid tokens (the rest padded)."""
    gen = torch.Generator().manual_seed(seed)
    text_mask = torch.zeros(1, m.text_len, dtype=torch.long)
    text_mask[:, :7] = 1
    window = (m.window_frames - 1) // m.vae_temporal_ratio + 1
    num_frames = 4 * (num_latents - 1) + 1
    return dn.Conditioning(
        audio_feats=torch.randn(num_frames, m.audio_window, m.audio_layers, m.audio_channels, generator=gen),
        face_mask=torch.ones(1, 1, 1, side, side),
        text_states=torch.randn(1, m.text_len, m.text_states_dim, generator=gen),
        text_mask=text_mask,
        text_pooled=torch.randn(1, m.text_states_dim_2, generator=gen),
        neg_text_states=torch.randn(1, m.text_len, m.text_states_dim, generator=gen),
        neg_text_mask=text_mask,
        neg_text_pooled=torch.randn(1, m.text_states_dim_2, generator=gen),
        ref_latents=torch.randn(1, m.latent_channels, window, side, side, generator=gen),
        num_frames=num_frames,
    )
