"""Deterministic random weights for ``model=tiny`` in the official on-disk layout.

The same loaders read these files as the official checkpoint: the DiT as ``{'module': state_dict}`` in
``mp_rank_00_model_states.pt`` (plus the fp8 variant and its scale map), the VAE as ``{'state_dict': {'vae.'+k}}``,
Whisper, LLaVA and CLIP as ``save_pretrained`` folders with offline tokenizers. The face detector of the tiny model
is OpenCV's bundled cascade, so ``det_align/`` is not written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from avatar.config import OFFICIAL_DIT_FILE, OFFICIAL_DIT_FP8_FILE, ModelConfig

log = logging.getLogger(__name__)

MARKER = ".complete"


def make_tiny(weights_dir: str | Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """Write every component of the tiny model under ``weights_dir``; returns the folder."""
    from avatar.models.transformer import AvatarDiT
    from avatar.weights.load import save_fp8_checkpoint, save_official_checkpoint
    from avatar.weights.tiny_cond import make_tiny_vae, make_tiny_whisper
    from avatar.weights.tiny_text import make_tiny_clip, make_tiny_llava

    root = Path(weights_dir)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AvatarDiT(cfg)
        _liven_zero_inits(model, seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_official_checkpoint(state, root / OFFICIAL_DIT_FILE)
    save_fp8_checkpoint(state, root / OFFICIAL_DIT_FP8_FILE)
    make_tiny_vae(root, cfg, seed)
    make_tiny_whisper(root, cfg, seed)
    make_tiny_llava(root, cfg, seed)
    make_tiny_clip(root, cfg, seed)
    (root / MARKER).write_text(json.dumps({"model": cfg.name, "seed": seed}) + "\n")
    log.info("wrote tiny weights to %s", root)
    return root


def _liven_zero_inits(model: torch.nn.Module, seed: int) -> None:
    """Training-time zero initialisations (adapter outputs, modulation and final projections) would make a random
    tiny model ignore its audio and image inputs; give every all-zero weight small random values instead, so the
    tests can see each input's effect."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.ndim >= 2 and torch.count_nonzero(param) == 0:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
