"""Tiny Whisper and VAE in the official on-disk layout (``ckpts/whisper-tiny/``, ``ckpts/.../vae/``).

Both are the real classes (``WhisperModel``, diffusers ``AutoencoderKLHunyuanVideo``) at CPU size, with deterministic
random weights, read by the same loaders as the official files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from avatar.config import OFFICIAL_VAE_DIR, OFFICIAL_WHISPER_DIR, ModelConfig

#: Small token ids of the tiny Whisper decoder (never run; only the encoder is used).
TINY_WHISPER_VOCAB = 64


def save_seeded_pretrained(model_class, config, processor, out: Path, seed: int) -> None:
    """Build ``model_class(config)`` from ``seed`` without touching the global RNG and ``save_pretrained`` it with
    its tokenizer or feature extractor into ``out``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def tiny_vae_config(cfg: ModelConfig) -> dict:
    """diffusers ``AutoencoderKLHunyuanVideo`` config for the tiny model: 4 blocks (8× spatial), 4× temporal."""
    num_blocks = cfg.vae_spatial_ratio.bit_length()  # log2(ratio) downsampling blocks + the last one
    widths = [8, 8, 16, 16, 16][:num_blocks]
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": cfg.latent_channels,
        "down_block_types": ["HunyuanVideoDownBlock3D"] * num_blocks,
        "up_block_types": ["HunyuanVideoUpBlock3D"] * num_blocks,
        "block_out_channels": widths,
        "layers_per_block": 1,
        "act_fn": "silu",
        "norm_num_groups": 4,
        "scaling_factor": cfg.vae_scaling_factor,
        "spatial_compression_ratio": cfg.vae_spatial_ratio,
        "temporal_compression_ratio": cfg.vae_temporal_ratio,
        "mid_block_add_attention": True,
    }


def make_tiny_vae(root: str | Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """Write a tiny VAE as ``{'state_dict': {'vae.'+k: v}}`` in ``pytorch_model.pt`` plus ``config.json``."""
    from diffusers import AutoencoderKLHunyuanVideo

    out = Path(root) / OFFICIAL_VAE_DIR
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_vae_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 11)
        # diffusers' default init already decodes to varied pixels (std ≈ 0.3 in [-1, 1]), not flat grey.
        vae = AutoencoderKLHunyuanVideo(**config)
    state = {"vae." + k: v.detach().clone() for k, v in vae.state_dict().items()}
    torch.save({"state_dict": state}, out / "pytorch_model.pt")
    (out / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLHunyuanVideo", **config}, indent=2))
    return out


def make_tiny_whisper(root: str | Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """Write a tiny ``WhisperModel`` (width ``audio_channels``, ``audio_layers - 1`` encoder layers) and the standard
    ``WhisperFeatureExtractor`` (80 mel bins, 30 s windows) as ``save_pretrained`` folders."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    out = Path(root) / OFFICIAL_WHISPER_DIR
    out.mkdir(parents=True, exist_ok=True)
    width = cfg.audio_channels
    num_heads = next(h for h in (6, 4, 2, 1) if width % h == 0)
    config = WhisperConfig(
        vocab_size=TINY_WHISPER_VOCAB,
        num_mel_bins=80,
        d_model=width,
        encoder_layers=cfg.audio_layers - 1,
        encoder_attention_heads=num_heads,
        encoder_ffn_dim=2 * width,
        decoder_layers=1,
        decoder_attention_heads=num_heads,
        decoder_ffn_dim=2 * width,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=TINY_WHISPER_VOCAB - 4,
        bos_token_id=TINY_WHISPER_VOCAB - 3,
        eos_token_id=TINY_WHISPER_VOCAB - 3,
        decoder_start_token_id=TINY_WHISPER_VOCAB - 2,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    save_seeded_pretrained(WhisperModel, config, WhisperFeatureExtractor(feature_size=80), out, seed + 12)
    return out
