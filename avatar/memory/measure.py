"""Bytes measured by running our real modules on fake tensors (``FakeTensorMode``: shapes only, no memory).

Nothing here restates the architecture: weights are the parameters and buffers of the real modules built on the
meta device, activations are the live bytes (``LiveBytes``) of the real forward at the real token count, the deep
cache is the real ``FrameBuffer`` filled by the real strategy's windows, the VAE tile is the real decoder on one
tile. Forward measurements take seconds each and are cached in a JSON file keyed by everything they depend on,
including a hash of the code they run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from avatar.config import ModelConfig
from avatar.memory.tracker import LiveBytes

#: Double/single blocks a forward measurement runs: the peak is inside one block and every block of a kind has the
#: same shapes, so two of each (the first double block followed by its audio adapter, the last single block being
#: the cache point) hold the full-depth peak. ``bench/memory_model.py`` checks this against the full depth.
MEASURED_DEPTH = 2

_SOURCES = ("models/transformer.py", "memory/measure.py", "memory/tracker.py", "pipeline/cache.py")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "avatar-launcher" / "memory"


@functools.cache
def _code_hash() -> str:
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


class MeasureCache:
    """``key -> bytes`` in ``<dir>/measurements.json`` (written atomically; None: no file, measure every time)."""

    def __init__(self, directory: Path | None) -> None:
        self.path = None if directory is None else Path(directory) / "measurements.json"
        self.values: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.values = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.values = {}

    def get(self, key: str, compute):
        if key not in self.values:
            self.values[key] = compute()
            if self.path is not None:
                # Merge with what other processes (or other instances) wrote meanwhile, then replace atomically.
                # Best effort: an unwritable cache folder only means measuring again next time.
                self.values = {**self._read(), **self.values}
                tmp = self.path.with_suffix(f".tmp{os.getpid()}")
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    tmp.write_text(json.dumps(self.values, indent=0, sort_keys=True))
                    os.replace(tmp, self.path)
                except OSError:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
        return self.values[key]

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}


def _key(kind: str, **parts) -> str:
    return kind + ":" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


# --- modules on meta / fake -------------------------------------------------------------------------------------------


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (distinct storages)."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def meta_dit(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, fp8: bool = False):
    """The real DiT on the meta device in ``dtype`` (official fp32 modules kept), block linears fp8 with ``fp8``."""
    from avatar.models.transformer import AvatarDiT
    from avatar.weights.fp8 import convert_to_fp8

    model = AvatarDiT(cfg, dtype=dtype, device="meta")
    if fp8:
        convert_to_fp8(model)
    return model.eval()


def to_fake(module: nn.Module, mode, device: torch.device | str = "cpu") -> nn.Module:
    """Replace every meta parameter/buffer of ``module`` by a fake tensor of ``mode`` on ``device``."""
    converter = mode.fake_tensor_converter
    device = torch.device(device)
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                fake = converter.from_meta_and_device(mode, param, device)
                sub._parameters[name] = nn.Parameter(fake, requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = converter.from_meta_and_device(mode, buffer, device)
    return module


def dit_inputs(
    cfg: ModelConfig,
    latent_frames: int,
    grid_tokens: tuple[int, int],
    text_tokens: int,
    device="cpu",
    speakers: int = 1,
):
    """Forward inputs of one window (batch of one) with a token grid of ``grid_tokens`` (h, w) per latent frame;
    ``speakers`` > 1: one audio track and one face mask per speaker."""
    ph, pw = cfg.patch_size[1:]
    h, w = grid_tokens[0] * ph, grid_tokens[1] * pw
    audio_rows = 4 * (latent_frames - 1) + 1
    if speakers > 1:
        audio = (1, audio_rows, speakers, cfg.audio_window, cfg.audio_layers, cfg.audio_channels)
        return dict(
            dit_inputs(cfg, latent_frames, grid_tokens, text_tokens, device),
            audio_feats=torch.zeros(audio, device=device),
            face_mask=torch.ones(1, speakers, latent_frames, h, w, device=device),
        )
    return dict(
        x=torch.zeros(1, cfg.latent_channels, latent_frames, h, w, device=device),
        t=torch.full((1,), 700.0, device=device),
        ref_latents=torch.zeros(1, cfg.latent_channels, latent_frames, h, w, device=device),
        text_states=torch.zeros(1, text_tokens, cfg.text_states_dim, device=device),
        text_mask=torch.ones(1, text_tokens, dtype=torch.long, device=device),
        text_states_2=torch.zeros(1, cfg.text_states_dim_2, device=device),
        audio_feats=torch.zeros(1, audio_rows, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, device=device),
        face_mask=torch.ones(1, 1, latent_frames, h, w, device=device),
    )


def measured_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` at ``MEASURED_DEPTH`` double and single blocks, an adapter after the first double block."""
    depth = min(MEASURED_DEPTH, cfg.depth_double)
    adapters = [0] if cfg.adapter_after_double and depth else []
    return replace(
        cfg, depth_double=depth, depth_single=min(MEASURED_DEPTH, cfg.depth_single), adapter_after_double=adapters
    )


def forward_peak(model: nn.Module, inputs: dict, cache: str | None = None, mode=None) -> int:
    """Peak live bytes above the model's weights and the inputs while ``model(**inputs)`` runs under ``LiveBytes``
    (fake tensors when ``mode`` is a FakeTensorMode, real ones otherwise)."""
    import contextlib

    with mode if mode is not None else contextlib.nullcontext(), torch.no_grad(), LiveBytes() as live:
        live.adopt([*model.parameters(), *model.buffers(), *inputs.values()])
        base = live.total
        live.reset_peak()
        result = model(**inputs, cache=cache) if cache is not None else model(**inputs)
        del result
    return live.total_peak - base


def dit_activation_bytes(
    cfg: ModelConfig,
    latent_frames: int,
    tokens_per_frame: int,
    text_tokens: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    token_chunk: int | None = None,
    cache: MeasureCache | None = None,
    full_depth: bool = False,
    speakers: int = 1,
) -> int:
    """Peak bytes above weights and inputs of one DiT forward (``cache="store"``, the largest) over ``latent_frames``
    + the reference frame at ``tokens_per_frame`` tokens each (a rank's shard), measured on fake tensors
    (``speakers``: audio tracks and face masks, each with its audio tokens and adapter outputs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg_run = cfg if full_depth else measured_config(cfg)
    parts = dict(
        cfg=asdict(cfg_run),
        frames=latent_frames,
        tokens=tokens_per_frame,
        text=text_tokens,
        dtype=str(dtype),
        fp8=fp8,
        chunk=token_chunk,
        code=_code_hash(),
        **({"speakers": speakers} if speakers > 1 else {}),
    )

    def compute() -> int:
        mode = FakeTensorMode()
        model = to_fake(meta_dit(cfg_run, dtype, fp8), mode)
        model.set_token_chunk(token_chunk)
        with mode:
            inputs = dit_inputs(cfg_run, latent_frames, (1, tokens_per_frame), text_tokens, speakers=speakers)
        # A 1 × F grid: the patch embedders, RoPE and the face mask see F tokens per frame; every per-token layer
        # and the attention see the same counts as on the real (h, w) grid.
        return forward_peak(model, inputs, cache="store", mode=mode)

    return (cache or MeasureCache(None)).get(_key("dit_act", **parts), compute)


_WEIGHTS: dict[str, dict[str, int]] = {}


def dit_weight_bytes(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, fp8: bool = False) -> dict[str, int]:
    """``total``, ``blocks`` (all double + single blocks), ``largest_block`` bytes of the real DiT in ``dtype``
    (built on meta once per process and configuration)."""
    key = _key("dit_weights", cfg=asdict(cfg), dtype=str(dtype), fp8=fp8)
    if key not in _WEIGHTS:
        _WEIGHTS[key] = _dit_weight_bytes(cfg, dtype, fp8)
    return dict(_WEIGHTS[key])


def _dit_weight_bytes(cfg: ModelConfig, dtype: torch.dtype, fp8: bool) -> dict[str, int]:
    model = meta_dit(cfg, dtype, fp8)
    blocks = [*model.double_blocks, *model.single_blocks]
    sizes = [module_bytes(block) for block in blocks]
    return {"total": module_bytes(model), "blocks": sum(sizes), "largest_block": max(sizes)}


# --- encoders, VAE, deep cache ----------------------------------------------------------------------------------------

#: The official encoders' configurations (dossier §3.5-3.6): LLaVA-Llama-3-8B (CLIP-L/14-336 vision tower),
#: CLIP-L text, Whisper-tiny. Only used to build the real classes on meta and count their tensors.
ENCODER_CONFIGS = {
    "llava": dict(
        text=dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128320,
            max_position_embeddings=8192,
        ),
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
        ),
    ),
    "clip": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
        max_position_embeddings=77,
    ),
    "whisper": dict(
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
        vocab_size=51865,
    ),
}


def encoder_weight_bytes(
    model: ModelConfig | None = None,
    weights_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float16,
    cache: MeasureCache | None = None,
) -> dict[str, int]:
    """Bytes of the LLaVA, CLIP-text and Whisper modules we load, in ``dtype`` (the GPU dtype of ``Renderer``):
    the official classes built on meta for the official widths (``model`` None or LLaVA-width text states), else the
    weight files of the encoder folders under ``weights_dir`` (the tiny model's; nothing without a folder)."""
    if model is None or model.text_states_dim == ENCODER_CONFIGS["llava"]["text"]["hidden_size"]:
        key = _key("encoders", spec=ENCODER_CONFIGS, dtype=str(dtype))
        return (cache or MeasureCache(None)).get(key, lambda: _encoder_weight_bytes(dtype))
    from avatar.config import OFFICIAL_CLIP_DIR, OFFICIAL_LLAVA_DIR, OFFICIAL_WHISPER_DIR

    out = {}
    for name, folder in (
        ("llava", OFFICIAL_LLAVA_DIR),
        ("clip", OFFICIAL_CLIP_DIR),
        ("whisper", OFFICIAL_WHISPER_DIR),
    ):
        root = Path(weights_dir) / folder if weights_dir is not None else None
        files = [] if root is None or not root.is_dir() else [*root.glob("*.safetensors"), *root.glob("*.bin")]
        out[name] = sum(f.stat().st_size for f in files)
    return out


def _encoder_weight_bytes(dtype: torch.dtype) -> dict[str, int]:
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        WhisperConfig,
        WhisperModel,
    )

    spec = ENCODER_CONFIGS
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(
            LlavaConfig(
                text_config=LlamaConfig(**spec["llava"]["text"]),
                vision_config=CLIPVisionConfig(**spec["llava"]["vision"]),
            )
        )
        clip = CLIPTextModel(CLIPTextConfig(**spec["clip"]))
        whisper = WhisperModel(WhisperConfig(**spec["whisper"]))
    out = {}
    for name, module in (("llava", llava), ("clip", clip), ("whisper", whisper)):
        out[name] = (
            sum(t.numel() for t in [*module.parameters(), *module.buffers()])
            * torch.empty((), dtype=dtype).element_size()
        )
    return out


def vae_config(cfg: ModelConfig) -> dict:
    """The diffusers ``AutoencoderKLHunyuanVideo`` config of ``cfg``'s VAE: the official (the class defaults) at the
    official latent width, the tiny one's (``avatar/weights/tiny_cond.py``) otherwise."""
    if cfg.latent_channels == 16:
        return {"latent_channels": cfg.latent_channels}
    from avatar.weights.tiny_cond import tiny_vae_config

    return tiny_vae_config(cfg)


class _Run(nn.Module):
    """``modules`` applied in order (the decoder after ``post_quant_conv``, the encoder before ``quant_conv``)."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.inner = nn.ModuleList(modules)

    def forward(self, z):
        for module in self.inner:
            z = module(z)
        return z


def vae_bytes(cfg: ModelConfig, dtype: torch.dtype = torch.float16, cache: MeasureCache | None = None) -> dict:
    """``weights``, ``tile`` (peak above weights of decoding one full temporal × spatial tile) and ``encode_tile``
    (encoding one pixel tile, as the reference latents do) of the real VAE."""
    from diffusers import AutoencoderKLHunyuanVideo
    from torch._subclasses.fake_tensor import FakeTensorMode

    lat_frames = (cfg.vae_tile_frames - 1) // cfg.vae_temporal_ratio + 1
    lat_size = cfg.vae_tile_size // cfg.vae_spatial_ratio
    config = vae_config(cfg)
    parts = dict(frames=lat_frames, size=lat_size, dtype=str(dtype), config=config, code=_code_hash())

    def compute() -> dict:
        with torch.device("meta"):
            vae = AutoencoderKLHunyuanVideo(**config).to(dtype)
        weights = module_bytes(vae)
        mode = FakeTensorMode()
        vae = to_fake(vae, mode)
        with mode:
            z = torch.zeros(1, cfg.latent_channels, lat_frames, lat_size, lat_size, dtype=dtype)
            pixels = torch.zeros(1, 3, cfg.vae_tile_frames + 1, cfg.vae_tile_size, cfg.vae_tile_size, dtype=dtype)
        decode = forward_peak(_Run(vae.post_quant_conv, vae.decoder), {"z": z}, mode=mode)
        encode = forward_peak(_Run(vae.encoder, vae.quant_conv), {"z": pixels}, mode=mode)
        return {"weights": weights, "tile": decode, "encode_tile": encode}

    return (cache or MeasureCache(None)).get(_key("vae", **parts), compute)


def deep_cache_bytes(
    strategy, tokens_per_frame: int, text_tokens: int, dim: int, branches: int, dtype: torch.dtype = torch.bfloat16
) -> int:
    """Bytes of the real deep-cache buffers of one rank after a full step of ``strategy``'s windows (``branches``:
    1 on a CFG-parallel rank, 2 otherwise), filled with fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from avatar.models.transformer import CachedInput
    from avatar.pipeline.cache import FrameBuffer

    with FakeTensorMode():
        buffer = FrameBuffer(strategy.domain)
        for window, frames in enumerate(strategy.windows(0)):
            img = torch.zeros(1, len(frames) + 1, tokens_per_frame, dim, dtype=dtype)
            buffer.write(window, frames, CachedInput(img=img, txt=torch.zeros(1, text_tokens, dim, dtype=dtype)))
        return buffer.nbytes * branches


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
