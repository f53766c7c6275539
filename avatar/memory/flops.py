"""The FLOP model of one run: floating-point operations per stage, counted by ``torch.utils.flop_counter``.

Nothing here restates the architecture. The DiT and the VAE decoder are the real modules built on the meta device
and run on fake tensors (``FakeTensorMode``: shapes only, no memory, no arithmetic) at the run's shapes under
``FlopCounterMode``, which counts every matmul, convolution and attention kernel the forward dispatches; these counts
are cached like the memory measurements (``avatar.memory.measure.MeasureCache``, keyed by the config, the shapes and a
hash of the code). The encoders run once per job on rank 0, so their real calls are counted as they happen
(``StageTimer(count_flops=...)``). Elementwise work (norms, activations, RoPE, blends) is not counted, as is usual for
MFU; neither is the TorchScript face detector.

``flop_section`` combines the counts with the run's forward and tile counts and, on a GPU, the stage times into
achieved TFLOP/s per GPU and MFU against ``PEAK_TFLOPS``.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils import flop_counter

from avatar.config import ModelConfig
from avatar.memory.measure import MeasureCache, _code_hash, _key, default_cache_dir, dit_inputs, meta_dit, to_fake

#: Dense (no sparsity) bf16/fp16 tensor-core peak TFLOP/s per GPU, from the vendors' datasheets. Matched against
#: ``torch.cuda.get_device_name`` by substring, longest key first; a GPU not listed gets TFLOP/s but no MFU.
PEAK_TFLOPS = {
    "B200": 2250.0,
    "H200": 989.4,
    "H100 NVL": 835.5,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM (H100 80GB HBM3)
    "H800": 989.4,
    "H20": 148.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
    "RTX 6000 Ada": 364.2,
    "V100": 125.0,
}


def peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of ``device_name`` (None: unknown, or not a GPU)."""
    if not device_name:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return PEAK_TFLOPS[key]
    return None


def _register_cpu_attention() -> None:
    """``FlopCounterMode`` counts the CUDA SDPA kernels; register the CPU flash kernel with the same formula."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)


_register_cpu_attention()


def counter() -> flop_counter.FlopCounterMode:
    """A silent ``FlopCounterMode`` (``.get_total_flops()`` after the block)."""
    return flop_counter.FlopCounterMode(display=False)


@contextlib.contextmanager
def counting(sink: dict, name: str):
    """Add the FLOPs of the block to ``sink[name]``."""
    with counter() as count:
        yield
    sink[name] = sink.get(name, 0) + count.get_total_flops()


# --- the DiT ---------------------------------------------------------------------------------------------------------


def dit_forward_flops(
    cfg: ModelConfig,
    latent_frames: int,
    grid_tokens: tuple[int, int],
    text_tokens: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    cache: MeasureCache | None = None,
    speakers: int = 1,
) -> dict[str, int]:
    """FLOPs of one full-depth DiT forward of one CFG branch over a window of ``latent_frames`` (+ the reference
    frame) with ``grid_tokens`` (h, w) tokens per frame: ``full`` (a full step, ``cache="store"``) and ``cached``
    (a cached step, ``cache="reuse"``: the last single block and the output on the cached input). ``speakers``: the
    audio tracks the DiT gets (several speakers: every adapter attends once per track, under its own mask)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    parts = dict(
        cfg=asdict(cfg), frames=latent_frames, grid=list(grid_tokens), text=text_tokens, dtype=str(dtype), code=_code()
    )
    if speakers > 1:
        parts["speakers"] = speakers

    def compute() -> dict[str, int]:
        # Real tensors may enter the fake forward (they become fake on first use): the text mask stays real, so a
        # model that reads the valid text length to the host once per mask (mask-free attention) reads it here,
        # outside the fake mode, and finds it in its memo inside.
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        model = to_fake(meta_dit(cfg, dtype), mode)
        with mode:
            inputs = dit_inputs(cfg, latent_frames, grid_tokens, text_tokens, speakers=speakers)
        inputs["text_mask"] = torch.ones(1, text_tokens, dtype=torch.long)
        read_text_layout = getattr(model, "_text_layout", None)
        if read_text_layout is not None:
            read_text_layout(inputs["text_mask"])
        with mode, torch.no_grad():
            with counter() as full:
                _, stored = model(**inputs, cache="store")
            with counter() as cached:
                model(**inputs, cache="reuse", cached=stored)
        return {"full": full.get_total_flops(), "cached": cached.get_total_flops()}

    return (cache or MeasureCache(None)).get(_key("dit_flops", **parts), compute)


# --- the VAE decode ---------------------------------------------------------------------------------------------------


def vae_decode_flops(vae_config: dict, plan, *, dtype: torch.dtype = torch.float16, cache=None) -> int:
    """FLOPs of the tiled decode ``plan`` (``avatar.pipeline.decode.DecodePlan``): the real decoder
    (``post_quant_conv`` + ``decoder``) on fake tensors of each distinct piece shape, times its count."""
    from diffusers import AutoencoderKLHunyuanVideo
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes: dict[tuple[int, int, int], int] = {}
    for round_pieces in plan.pieces:
        for piece in round_pieces:
            tile, spatial = plan.tiles[piece.tile], plan.spatial.tiles[piece.spatial]
            shape = (tile.latent_stop - tile.latent_start, spatial.y1 - spatial.y0, spatial.x1 - spatial.x0)
            shapes[shape] = shapes.get(shape, 0) + 1
    config = {k: v for k, v in dict(vae_config).items() if not k.startswith("_")}
    cache = cache or MeasureCache(None)
    built = {}

    def piece_flops(shape) -> int:
        if not built:
            with torch.device("meta"):
                vae = AutoencoderKLHunyuanVideo(**config).to(dtype)
            built["mode"] = FakeTensorMode()
            built["vae"] = to_fake(vae, built["mode"])
        mode, vae = built["mode"], built["vae"]
        with mode:
            z = torch.zeros(1, config["latent_channels"], *shape, dtype=dtype)
        with mode, torch.no_grad(), counter() as count:
            vae.decoder(vae.post_quant_conv(z))
        return count.get_total_flops()

    total = 0
    for shape, count in shapes.items():
        key = _key("vae_flops", config=config, shape=list(shape), dtype=str(dtype), code=_code())
        total += count * cache.get(key, lambda shape=shape: piece_flops(shape))
    return total


def _code() -> str:
    digest = hashlib.sha256(_code_hash().encode())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


# --- the run ----------------------------------------------------------------------------------------------------------


def _rate(flops: float, seconds: float | None, gpus: int, peak: float | None) -> dict:
    if not seconds or seconds <= 0:
        return {}
    tflops = flops / seconds / gpus / 1e12
    out = {"seconds": round(seconds, 3), "gpus": gpus, "tflops_per_gpu": round(tflops, 3)}
    if peak:
        out["mfu"] = round(tflops / peak, 4)
    return out


def dit_forwards(window_calls: int, cached_window_calls: int = 0, reused_window_calls: int = 0) -> tuple[int, int]:
    """``(full, cached)`` DiT forwards of a run (two CFG branches per window call): the deep cache's cached calls run
    the last block only, the adaptive cache's reused calls run nothing."""
    full = window_calls - cached_window_calls - reused_window_calls
    return 2 * full, 2 * cached_window_calls


def flop_section(
    cfg,
    *,
    window_latents: int,
    grid_tokens: tuple[int, int],
    window_calls: int,
    cached_window_calls: int,
    reused_window_calls: int = 0,
    encoder_flops: dict[str, int],
    decode_plans: list,
    vae_config: dict,
    vae_dtype: torch.dtype,
    dit_dtype: torch.dtype,
    seconds: dict[str, float],
    world: int,
    device_name: str | None,
    on_gpu: bool,
    cache_dir=None,
    speakers: int = 1,
) -> dict:
    """The run report's ``flops`` section: FLOPs per stage for the whole run (all ranks), with TFLOP/s per GPU and
    MFU per stage on a GPU. ``window_calls``/``cached_window_calls``: guided evaluations of a window (two CFG branches
    each, every data group together); ``reused_window_calls``: those the adaptive step cache answered without the DiT
    (no DiT FLOPs); ``decode_plans``: the ``DecodePlan`` of every decode; ``speakers``: the audio tracks the DiT
    gets (one per speaker with several tracks; one with turns of a shared recording)."""
    cache = MeasureCache(default_cache_dir() if cache_dir is None else cache_dir)
    per_forward = dit_forward_flops(
        cfg.model, window_latents, grid_tokens, cfg.model.text_len, dtype=dit_dtype, cache=cache, speakers=speakers
    )
    full_forwards, cached_forwards = dit_forwards(window_calls, cached_window_calls, reused_window_calls)
    dit_total = full_forwards * per_forward["full"] + cached_forwards * per_forward["cached"]
    decode = sum(vae_decode_flops(vae_config, plan, dtype=vae_dtype, cache=cache) for plan in decode_plans)
    encoders = sum(encoder_flops.values())
    stages = {
        "encoders": {"flops": encoders, "per_stage": dict(encoder_flops)},
        "dit": {
            "flops": dit_total,
            "full_step_forward": per_forward["full"],
            "cached_step_forward": per_forward["cached"],
            "full_forwards": full_forwards,
            "cached_forwards": cached_forwards,
            "reused_forwards": 2 * reused_window_calls,
            "audio_tracks": speakers,
            "window": {"latent_frames": window_latents, "tokens_per_frame": grid_tokens[0] * grid_tokens[1]},
        },
        "decode": {"flops": decode, "pieces": sum(len(p) for plan in decode_plans for p in plan.pieces)},
    }
    section = {
        "counted": "matmuls, convolutions and attention (torch.utils.flop_counter); elementwise work excluded",
        "total": encoders + dit_total + decode,
        "stages": stages,
    }
    if on_gpu:
        peak = peak_tflops(device_name)
        section["peak_tflops_per_gpu"] = peak
        section["device"] = device_name
        enc_seconds = sum(seconds.get(s, 0.0) for s in encoder_flops)
        stages["encoders"].update(_rate(encoders, enc_seconds, 1, peak))
        stages["dit"].update(_rate(dit_total, seconds.get("denoise"), world, peak))
        stages["decode"].update(_rate(decode, seconds.get("decode_write"), world, peak))
    return section
