"""The GPU check (``tests/gpu/check.sh``; what it measures: ``docs/performance.md``). One GPU, a few minutes:

1. the attention kernel our facade runs for a mask-free call at the real head layout, and every SDPA backend's time
   at the real token count;
2. a full-width forward of 2 double + 2 single blocks (the memory model's measured depth) at the real token count
   of a 704×768 × 129-frame window: time, TFLOP/s (``avatar.memory.flops``), MFU against ``PEAK_TFLOPS``, and the
   attention kernels it ran;
3. the peak GPU memory of that forward against the memory model's prediction
   (``avatar.memory.measure.dit_activation_bytes`` + weights + inputs);
4. ``attention.kernel=sage`` (where ``sageattention`` is installed): its error against SDPA and its speed-up at the
   real token count;
5. fp8 compute and compile parity and the host syncs of a warm forward (``avatar.perf.fp8_compute_parity`` /
   ``compile_parity`` / ``forward_host_syncs`` where this checkout has them).

Every section is guarded: a missing piece or a failure is recorded and the others still run. Results go to stdout
and, when ``$OUT`` is set, to ``$OUT/gpu_check.json`` and ``$OUT/gpu_check.md``. Exit 0 when every check that ran
passed (or without a GPU: skipped), 1 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

#: What the check runs: the official model at a 704×768 × 129-frame window on the GPU.
MODEL = "hunyuan_avatar"
DEVICE = "cuda"
FRAMES = 129
HEIGHT, WIDTH = 704, 768
#: The small token grid (latent frames, latent height, latent width) of the fp8 / compile / sync checks.
SMALL_GRID = dict(num_frames=9, height=44, width=48)
REPEATS = 3


def log(message: str) -> None:
    print(message, flush=True)


def _timed(fn, repeats: int = REPEATS) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _kernels(fn) -> list[str]:
    """The attention ops ``fn`` dispatches (``aten::_scaled_dot_product_*``) and the kernels they launch (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    words = ("flash", "fmha", "attention", "attn", "cudnn", "sdpa", "softmax")
    names = {e.key for e in prof.key_averages() if any(w in e.key.lower() for w in words)}
    return sorted(names)


def _kind(kernels: list[str]) -> str:
    """The SDPA backend that ran: from the aten op (unambiguous), else from the kernel names."""
    ops = " ".join(k for k in kernels if k.startswith("aten::")).lower()
    for word, kind in (("cudnn", "cudnn"), ("flash", "flash"), ("efficient", "efficient")):
        if f"_scaled_dot_product_{word}" in ops:
            return kind
    if "_scaled_dot_product_attention_math" in ops:
        return "math"
    text = " ".join(kernels).lower()
    for word, kind in (("cudnn", "cudnn"), ("fmha", "efficient"), ("flash", "flash")):
        if word in text:
            return kind
    return "math" if "softmax" in text else "unknown"


def real_shape():
    from avatar.compose import compose

    cfg = compose([f"model={MODEL}"]).model
    latent_frames = (FRAMES - 1) // cfg.vae_temporal_ratio + 1
    h_lat, w_lat = HEIGHT // cfg.vae_spatial_ratio, WIDTH // cfg.vae_spatial_ratio
    grid = (h_lat // cfg.patch_size[1], w_lat // cfg.patch_size[2])
    return cfg, latent_frames, grid


def check_attention(result: dict) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from avatar.attention import attention

    cfg, latent_frames, grid = real_shape()
    tokens = (latent_frames + 1) * grid[0] * grid[1] + cfg.text_len
    head_dim = cfg.hidden_size // cfg.num_heads
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (
        torch.randn(1, tokens, cfg.num_heads, head_dim, device=DEVICE, dtype=torch.bfloat16, generator=g)
        for _ in range(3)
    )
    out = {"tokens": tokens, "heads": cfg.num_heads, "head_dim": head_dim}
    kernels = _kernels(lambda: attention(q, k, v))
    out["facade_kernels"] = kernels
    out["facade_backend"] = _kind(kernels)
    out["facade_seconds"] = _timed(lambda: attention(q, k, v))
    flops = 4 * tokens * tokens * head_dim * cfg.num_heads
    out["facade_tflops"] = flops / out["facade_seconds"] / 1e12
    backends = {}
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                seconds = _timed(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
            backends[name.lower()] = {"seconds": seconds, "tflops": flops / seconds / 1e12}
        except RuntimeError as error:
            backends[name.lower()] = {"error": str(error).splitlines()[0][:200]}
    out["sdpa_backends"] = backends
    import avatar.attention as facade

    chosen = getattr(facade, "chosen_backends", None)  # the facade's own record of its choice, where it has one
    out["facade_chosen"] = chosen() if chosen is not None else None
    result["attention"] = out
    log(f"attention: facade runs {out['facade_backend']} ({', '.join(kernels) or 'no kernel seen'})")
    if out["facade_chosen"] is not None:
        log(f"attention: facade's choice per dtype/head dim: {out['facade_chosen']}")
    log(f"attention: {tokens} tokens × {cfg.num_heads} heads: facade {out['facade_seconds'] * 1e3:.1f} ms")
    for name, value in backends.items():
        if "seconds" in value:
            log(f"attention:   {name}: {value['seconds'] * 1e3:.1f} ms, {value['tflops']:.0f} TFLOP/s")
        else:
            log(f"attention:   {name}: not available ({value['error']})")


def check_forward(result: dict) -> None:
    from avatar.memory import flops as fl
    from avatar.memory import measure
    from avatar.models.transformer import AvatarDiT

    cfg, latent_frames, grid = real_shape()
    small = measure.measured_config(cfg)
    tokens_per_frame = grid[0] * grid[1]
    device = torch.device(DEVICE)
    name = torch.cuda.get_device_name(device)
    peak = fl.peak_tflops(name)
    torch.manual_seed(0)
    model = AvatarDiT(small, dtype=torch.bfloat16, device=device).eval()
    inputs = measure.dit_inputs(small, latent_frames, grid, small.text_len, device=DEVICE)
    inputs = {k: (v.to(torch.bfloat16) if v.is_floating_point() and k != "t" else v) for k, v in inputs.items()}
    out = {
        "device": name,
        "peak_tflops": peak,
        "blocks": {"double": small.depth_double, "single": small.depth_single},
        "latent_frames": latent_frames,
        "tokens": (latent_frames + 1) * tokens_per_frame + small.text_len,
    }
    with torch.no_grad():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _, stored = model(**inputs, cache="store")
        torch.cuda.synchronize()
        out["peak_activation_bytes"] = torch.cuda.max_memory_allocated() - base
        out["seconds_full"] = _timed(lambda: model(**inputs, cache="store"))
        out["seconds_cached"] = _timed(lambda: model(**inputs, cache="reuse", cached=stored))
        out["forward_kernels"] = _kernels(lambda: model(**inputs))
    out["forward_backend"] = _kind(out["forward_kernels"])
    counted = fl.dit_forward_flops(small, latent_frames, grid, small.text_len, cache=measure.MeasureCache(None))
    out["flops_full"], out["flops_cached"] = counted["full"], counted["cached"]
    out["tflops_full"] = counted["full"] / out["seconds_full"] / 1e12
    out["tflops_cached"] = counted["cached"] / out["seconds_cached"] / 1e12
    if peak:
        out["mfu_full"] = out["tflops_full"] / peak
        out["mfu_cached"] = out["tflops_cached"] / peak
    result["forward"] = out
    mfu = f", MFU {out['mfu_full']:.1%}" if peak else " (no peak for this GPU in PEAK_TFLOPS)"
    log(
        f"forward: 2 double + 2 single blocks, {out['tokens']} tokens: {out['seconds_full'] * 1e3:.0f} ms, "
        f"{out['flops_full'] / 1e12:.1f} TFLOP, {out['tflops_full']:.0f} TFLOP/s{mfu}; attention {out['forward_backend']}"
    )
    log(f"forward: cached step {out['seconds_cached'] * 1e3:.1f} ms ({out['tflops_cached']:.0f} TFLOP/s)")
    try:
        predicted = measure.dit_activation_bytes(
            cfg, latent_frames, tokens_per_frame, cfg.text_len, dtype=torch.bfloat16, cache=measure.MeasureCache(None)
        )
        out["predicted_activation_bytes"] = predicted
        out["measured_over_predicted"] = out["peak_activation_bytes"] / predicted
        log(
            f"memory: peak {out['peak_activation_bytes'] / 2**30:.2f} GiB above weights and inputs, memory model "
            f"{predicted / 2**30:.2f} GiB (measured/predicted {out['measured_over_predicted']:.3f})"
        )
    except Exception as error:  # noqa: BLE001 - the memory model is another engineer's; report and go on
        out["memory_model_error"] = f"{type(error).__name__}: {error}"
        log(f"memory: peak {out['peak_activation_bytes'] / 2**30:.2f} GiB; memory model failed: {error}")


def _perf(name: str):
    """``avatar.perf.<name>`` (the ``host`` engineer's parity helpers); ImportError when this checkout lacks it."""
    import importlib

    function = getattr(importlib.import_module("avatar.perf"), name, None)
    if function is None:
        raise ImportError(f"avatar.perf has no {name}")
    return function


def check_fp8(result: dict) -> None:
    from avatar.memory.measure import measured_config

    parity = _perf("fp8_compute_parity")

    cfg, _, _ = real_shape()
    try:
        from avatar.weights.fp8 import fp8_compute_supported

        reason = fp8_compute_supported(DEVICE)
    except ImportError:
        reason = None
    if reason:
        result["fp8_compute"] = {"skipped": reason}
        log(f"fp8 compute: skipped ({reason})")
        return
    out = parity(measured_config(cfg), device=DEVICE, **SMALL_GRID)
    result["fp8_compute"] = out
    log(
        f"fp8 compute: rel err {out['error_compute']:.4f} (dequantise {out['error_dequantised']:.4f}), "
        f"{out['seconds_compute'] * 1e3:.1f} ms vs {out['seconds_dequantised'] * 1e3:.1f} ms dequantised, "
        f"{out['seconds_bf16'] * 1e3:.1f} ms bf16: {'ok' if out['ok'] else 'FAILED'}"
    )
    if not out["ok"]:
        raise AssertionError(f"fp8 compute parity failed: {out}")


def check_compile(result: dict) -> None:
    from avatar.memory.measure import measured_config

    parity = _perf("compile_parity")

    cfg, _, _ = real_shape()
    out = parity(measured_config(cfg), device=DEVICE, dtype=torch.bfloat16, **SMALL_GRID)
    result["compile"] = out
    ok = out["graph_breaks"] == 0 and out["error"] < 2e-2
    out["ok"] = ok
    log(
        f"compile: rel err {out['error']:.2e}, {out['seconds_compiled'] * 1e3:.1f} ms vs eager "
        f"{out['seconds_eager'] * 1e3:.1f} ms, first call {out['seconds_first_compiled_call']:.0f} s, "
        f"{out['graphs']} graphs, {out['graph_breaks']} graph breaks: {'ok' if ok else 'FAILED'}"
    )
    if not ok:
        raise AssertionError(f"compile parity failed: {out}")


def check_syncs(result: dict) -> None:
    from avatar.memory.measure import measured_config

    find = _perf("forward_host_syncs")
    cfg, _, _ = real_shape()
    first = find(measured_config(cfg), device=DEVICE, **SMALL_GRID)
    result["host_syncs"] = {"first_sync": first, "ok": first is None}
    log(f"host syncs: {'none in a warm forward and a cached step' if first is None else 'FAILED: ' + first}")
    if first is not None:
        raise AssertionError(f"the forward synchronises with the host: {first}")


def check_sage(result: dict) -> None:
    """``attention.kernel=sage``: the facade's SageAttention call against SDPA at the real token count and head
    layout (bf16): relative error, cosine similarity, time and speed-up. Skipped where the package is missing."""
    import importlib.util

    from avatar.attention import attention
    from avatar.attention.sage import check_kernel

    if importlib.util.find_spec("sageattention") is None:
        raise ImportError("sageattention is not installed (pip install avatar-launcher[sage])")
    check_kernel("sage", "cuda")
    cfg, latent_frames, grid = real_shape()
    tokens = (latent_frames + 1) * grid[0] * grid[1] + cfg.text_len
    head_dim = cfg.hidden_size // cfg.num_heads
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (
        torch.randn(1, tokens, cfg.num_heads, head_dim, device=DEVICE, dtype=torch.bfloat16, generator=g)
        for _ in range(3)
    )
    reference = attention(q, k, v, kernel="sdpa").float()
    got = attention(q, k, v, kernel="sage").float()
    out = {
        "tokens": tokens,
        "relative_error": float((got - reference).norm() / reference.norm()),
        "max_abs_error": float((got - reference).abs().max()),
        "cosine": float(torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0)),
        "sdpa_seconds": _timed(lambda: attention(q, k, v, kernel="sdpa")),
        "sage_seconds": _timed(lambda: attention(q, k, v, kernel="sage")),
    }
    out["speedup"] = out["sdpa_seconds"] / out["sage_seconds"]
    result["sage"] = out
    log(
        f"sage: {tokens} tokens, relative error {out['relative_error']:.2e} (cosine {out['cosine']:.6f}) against "
        f"SDPA; {out['sage_seconds'] * 1e3:.1f} ms vs {out['sdpa_seconds'] * 1e3:.1f} ms ({out['speedup']:.2f}×)"
    )
    if not out["cosine"] > 0.99:
        raise AssertionError(f"SageAttention differs from SDPA: cosine {out['cosine']:.4f}")


CHECKS = {
    "attention": check_attention,
    "sage": check_sage,
    "forward": check_forward,
    "fp8": check_fp8,
    "compile": check_compile,
    "syncs": check_syncs,
}


def markdown(result: dict) -> str:
    lines = [
        f"# GPU check: {result.get('device')}",
        "",
        f"torch {result.get('torch')}, {result.get('seconds', 0):.0f} s",
        "",
    ]
    for name, value in result.items():
        if isinstance(value, dict):
            lines.append(f"## {name}")
            lines.append("")
            lines.extend(f"- {k}: {v}" for k, v in value.items())
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not torch.cuda.is_available():
        log("gpu check: skipped (no CUDA GPU visible to torch)")
        return 0
    wanted = argv or list(CHECKS)
    unknown = [name for name in wanted if name not in CHECKS]
    if unknown:
        log(f"gpu check: unknown check(s) {unknown}; valid: {list(CHECKS)}")
        return 2
    start = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "errors": {}}
    for name in wanted:
        try:
            CHECKS[name](result)
        except ImportError as error:
            result[name] = {"skipped": f"not on this checkout ({error})"}
            log(f"{name}: skipped, not on this checkout ({error})")
        except Exception as error:  # noqa: BLE001 - every check runs; failures are reported at the end
            result["errors"][name] = traceback.format_exc()
            log(f"{name}: FAILED: {type(error).__name__}: {error}")
        torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - start
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
        (Path(out_dir) / "gpu_check.md").write_text(markdown(result))
        log(f"gpu check: results in {out_dir}/gpu_check.json and gpu_check.md")
    log(f"gpu check: {len(result['errors'])} failure(s) in {result['seconds']:.0f} s")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
