"""Measurements of the DiT forward shared by ``bench/dit_bench.py``, the tests and the GPU check (tests/gpu/check.sh):
random inputs of any shape, and the parity checks of the two optional speed paths, ``compile=true`` and
``fp8_compute=true``, against the eager / dequantising forward of the same weights.

Nothing here is on the render path; every function builds what it measures from the shipped classes.
"""

from __future__ import annotations

import copy
import time

import torch

from avatar.config import ModelConfig
from avatar.models.transformer import AUDIO_FRAMES_PER_LATENT, AvatarDiT


def random_dit_inputs(
    cfg: ModelConfig,
    num_frames: int,
    height: int,
    width: int,
    *,
    valid_text: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict:
    """Keyword arguments of one ``AvatarDiT`` forward (batch 1, ``num_frames`` latent frames of ``height × width``
    latents, ``cfg.text_len`` text tokens of which ``valid_text`` (default: half) are valid), seeded."""
    g = torch.Generator().manual_seed(seed)
    num_audio = AUDIO_FRAMES_PER_LATENT * (num_frames - 1) + 1
    valid = cfg.text_len // 2 if valid_text is None else valid_text
    mask = (torch.arange(cfg.text_len) < valid).long()[None]
    latent = (1, cfg.latent_channels, num_frames, height, width)
    floats = dict(
        x=torch.randn(latent, generator=g),
        ref_latents=torch.randn(latent, generator=g),
        text_states=torch.randn(1, cfg.text_len, cfg.text_states_dim, generator=g),
        text_states_2=torch.randn(1, cfg.text_states_dim_2, generator=g),
        audio_feats=torch.randn(1, num_audio, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g),
        face_mask=torch.ones(1, 1, 1, height, width),
    )
    out = {k: v.to(device=device, dtype=dtype) for k, v in floats.items()}
    out.update(t=torch.tensor([700.0], device=device), text_mask=mask.to(device))
    return out


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖value − reference‖ / ‖reference‖`` in fp32."""
    reference = reference.float()
    return float((value.float() - reference).norm() / reference.norm())


def _timed(fn, device: torch.device, repeats: int) -> tuple[torch.Tensor, float]:
    """``fn()``'s result and its mean wall time over ``repeats`` calls after one warm-up (device-synchronised)."""
    out = fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync()
    return out, (time.perf_counter() - start) / repeats


@torch.no_grad()
def fp8_compute_parity(
    cfg: ModelConfig,
    *,
    device: torch.device | str = "cuda",
    num_frames: int = 2,
    height: int = 16,
    width: int = 16,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """One bf16 forward of a model built from ``cfg`` with random weights three ways: unquantised, fp8 weights
    dequantised per call (the default fp8 path), fp8 compute (scaled fp8 matmuls). Returns the relative errors
    against the unquantised forward, the times, and ``ok``: fp8 compute's error is within twice the dequantising
    path's plus 1 % (activation rounding to fp8 adds about as much error as the weights' own rounding)."""
    from avatar.weights.fp8 import enable_fp8_compute, quantize_model_fp8

    device = torch.device(device)
    torch.manual_seed(seed)
    model = AvatarDiT(cfg, dtype=torch.bfloat16, device=device).eval()
    inputs = random_dit_inputs(cfg, num_frames, height, width, device=device, dtype=torch.bfloat16, seed=seed)
    reference, time_bf16 = _timed(lambda: model(**inputs), device, repeats)
    quantize_model_fp8(model)
    dequantised, time_dequantised = _timed(lambda: model(**inputs), device, repeats)
    enable_fp8_compute(model)
    computed, time_compute = _timed(lambda: model(**inputs), device, repeats)
    error_dequantised = relative_error(dequantised, reference)
    error_compute = relative_error(computed, reference)
    return dict(
        error_dequantised=error_dequantised,
        error_compute=error_compute,
        error_compute_vs_dequantised=relative_error(computed, dequantised),
        seconds_bf16=time_bf16,
        seconds_dequantised=time_dequantised,
        seconds_compute=time_compute,
        ok=bool(torch.isfinite(computed).all()) and error_compute <= 2 * error_dequantised + 0.01,
    )


@torch.no_grad()
def compile_parity(
    cfg: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    num_frames: int = 2,
    height: int = 8,
    width: int = 8,
    repeats: int = 2,
    seed: int = 0,
) -> dict:
    """The same weights eager and with ``compile_blocks`` (regional compile), one forward each way (plus a cached
    step): relative error, max abs differences, times (the compiled time excludes the first, compiling call), and
    the number of graphs Dynamo compiled (one per block kind when every block reuses its kind's graph) and graph
    breaks."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from avatar.models.compile import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    device = torch.device(device)
    torch.manual_seed(seed)
    eager = AvatarDiT(cfg, dtype=dtype, device=device).eval()
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    inputs = random_dit_inputs(cfg, num_frames, height, width, device=device, dtype=dtype, seed=seed)
    (ref, ref_cached), time_eager = _timed(lambda: eager(**inputs, cache="store"), device, repeats)
    start = time.perf_counter()
    out, cached = compiled(**inputs, cache="store")
    time_first = time.perf_counter() - start
    (out, cached), time_compiled = _timed(lambda: compiled(**inputs, cache="store"), device, repeats)
    reused = compiled(**inputs, cache="reuse", cached=cached)
    return dict(
        error=relative_error(out, ref),
        max_abs=float((out.float() - ref.float()).abs().max()),
        cached_max_abs=float((reused.float() - ref.float()).abs().max()),
        cache_input_max_abs=float((cached.img.float() - ref_cached.img.float()).abs().max()),
        seconds_eager=time_eager,
        seconds_compiled=time_compiled,
        seconds_first_compiled_call=time_first,
        graphs=int(counters["stats"]["unique_graphs"]),
        graph_breaks=sum(counters["graph_break"].values()),
    )


@torch.no_grad()
def forward_host_syncs(
    cfg: ModelConfig,
    *,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    num_frames: int = 2,
    height: int = 16,
    width: int = 16,
) -> str | None:
    """Run a warm forward (and a cached step) under ``torch.cuda.set_sync_debug_mode("error")``: None when nothing in
    it waits for the GPU (no ``.item()``, no device-to-host copy, no data-dependent shape), else the error."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"forward_host_syncs needs a CUDA device, got {device}")
    torch.manual_seed(0)
    model = AvatarDiT(cfg, dtype=dtype, device=device).eval()
    inputs = random_dit_inputs(cfg, num_frames, height, width, device=device, dtype=dtype)
    _, cached = model(**inputs, cache="store")  # first call of the shape: builds its tables
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(**inputs, cache="store")
        model(**inputs, cache="reuse", cached=cached)
    except RuntimeError as error:
        return str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return None


# --- quality of a faster preset against the official one ------------------------------------------------------------


def psnr(frames, reference) -> float:
    """PSNR in dB of uint8 frames ``[n, H, W, 3]`` against ``reference`` (inf when equal)."""
    import numpy as np

    a = np.asarray(frames, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"frames {a.shape} and reference {b.shape} differ in shape")
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def ssim(frames, reference) -> float:
    """Mean SSIM (luma, 11×11 Gaussian window of σ 1.5, the usual constants) of uint8 frames ``[n, H, W, 3]``."""
    import numpy as np

    def luma(x):
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[:, None]  # [n, 1, H, W]

    a, b = luma(frames), luma(reference)
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :])[None, None]

    def blur(x):
        return torch.nn.functional.conv2d(x, window)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    score = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(score.mean())
