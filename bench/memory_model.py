"""The memory model (``avatar/memory/plan.py``) as a table, and checks of it against arithmetic and a real run.

    python bench/memory_model.py            # the table, the weights lines, the depth check, predicted vs real

1. The table: world 1, 2, 8 × 24, 48, 80, 141 GB × 5, 20, 60 s at 704×768 (official model): the mode
   ``memory=auto`` picks, the peak per rank and its stage (or "no fit"), and the denoise stage alone.
2. The weights lines: the DiT bytes the memory model measures (the real module on meta) against the parameter
   arithmetic (numel × bytes: bf16, the modules the official keeps fp32 at 4 bytes, fp8 block linears at 1 byte
   plus their fp32 scale).
3. The depth check: the activation peak measured at ``MEASURED_DEPTH`` blocks of each kind equals that of the full
   depth (every block of a kind has the same shapes).
4. Predicted vs real: a mid-size DiT (width 1024, 2+2 blocks, ~9k tokens, fp32) forward run for real on this CPU in
   a fresh process; its peak RSS above the baseline (taken after a warm-up forward of a 1-block model: kernel
   libraries and thread pools are not the model's memory) and the live bytes the tracker counts on the real tensors,
   against the fake-tensor prediction (weights + inputs + activations). Fails (exit 1) beyond 15 %.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avatar.config import MemoryConfig, ModelConfig, ParallelConfig  # noqa: E402
from avatar.io.errors import InputError  # noqa: E402
from avatar.memory import estimate as mp  # noqa: E402
from avatar.memory import measure  # noqa: E402
from avatar.plan import ParallelPlan  # noqa: E402

OFFICIAL = ModelConfig(name="hunyuan_avatar")
GB = 10**9
TOLERANCE = 0.15
#: The mid-size configuration of the real run: the official layout at a third of the width, 2 + 2 blocks.
MID = replace(
    OFFICIAL,
    name="mid",
    hidden_size=1024,
    num_heads=8,
    rope_axes=[16, 56, 56],
    depth_double=2,
    depth_single=2,
    adapter_after_double=[1],
    text_states_dim=1024,
)
MID_FRAMES, MID_TOKENS, MID_TEXT = 8, 1056, 64  # 9 sequence frames × 1056 tokens + 64 text ≈ 9.6k tokens


def table(cache) -> None:
    print("world  GPU GB  seconds  mode       peak per rank  (peak stage)  denoise stage")
    for world in (1, 2, 8):
        plan = ParallelPlan.resolve(ParallelConfig(), world, OFFICIAL.num_heads)
        for gpu in (24, 48, 80, 141):
            for seconds in (5, 20, 60):
                geometry = mp.planning_geometry(OFFICIAL, seconds)
                try:
                    chosen = mp.resolve(MemoryConfig(), plan, OFFICIAL, geometry, gpu * GB, cache=cache).estimate
                    denoise = mp.gb(chosen.stage("denoise").total)
                    row = (
                        f"{chosen.placement.mode.value:<9}  {mp.gb(chosen.peak):>12}  "
                        f"{'(' + chosen.peak_stage.name + ')':<12}  {denoise:>13}"
                    )
                except InputError as err:
                    row = f"no fit     {str(err)[:90]}"
                print(f"{world:>5}  {gpu:>6}  {seconds:>7}  {row}")


def weights_lines() -> None:
    from torch import nn

    model = measure.meta_dit(OFFICIAL, torch.bfloat16)
    keep = model._keep_in_fp32_modules
    fp8_linears = {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(("double_blocks.", "single_blocks."))
    }
    bf16 = fp8 = 0
    for name, param in model.named_parameters():
        size = param.numel() * (4 if any(name.startswith(m + ".") for m in keep) else 2)
        bf16 += size
        owner = name.rpartition(".")[0]
        fp8 += param.numel() + 4 if (owner in fp8_linears and name.endswith(".weight")) else size
    measured = measure.dit_weight_bytes(OFFICIAL, torch.bfloat16)["total"]
    measured_fp8 = measure.dit_weight_bytes(OFFICIAL, torch.bfloat16, fp8=True)["total"]
    print(f"weights bf16: measured {measured / GB:.2f} GB, arithmetic {bf16 / GB:.2f} GB (fp32: {', '.join(keep)})")
    print(f"weights fp8:  measured {measured_fp8 / GB:.2f} GB, arithmetic {fp8 / GB:.2f} GB (block linears 1 byte)")
    assert measured == bf16 and measured_fp8 == fp8, (measured, bf16, measured_fp8, fp8)


def depth_check() -> None:
    frames, tokens = 4, 264
    short = measure.dit_activation_bytes(OFFICIAL, frames, tokens, 831)
    t0 = time.perf_counter()
    full = measure.dit_activation_bytes(OFFICIAL, frames, tokens, 831, full_depth=True)
    print(
        f"depth check ({frames} latent frames × {tokens} tokens): {measure.MEASURED_DEPTH}+{measure.MEASURED_DEPTH} "
        f"blocks {short / GB:.3f} GB, full 20+40 blocks {full / GB:.3f} GB ({time.perf_counter() - t0:.0f} s)"
    )
    assert short == full, (short, full)


def _real_run() -> dict:
    """In this (fresh) process: peak RSS above the baseline and tracked live bytes of one real forward of MID."""
    import resource

    from avatar.memory.tracker import LiveBytes
    from avatar.models.transformer import AvatarDiT

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    # Warm up first (kernel libraries, thread pools, allocator arenas: fixed costs, not the model's memory) with a
    # forward of a 1-block model of the same width, then take the baseline.
    torch.manual_seed(0)
    with torch.no_grad():
        small = replace(MID, depth_double=1, depth_single=1, adapter_after_double=[0])
        AvatarDiT(small, dtype=torch.float32).eval()(**measure.dit_inputs(small, 2, (1, 64), 8))
    base = rss()
    with torch.no_grad():
        model = AvatarDiT(MID, dtype=torch.float32).eval()
        model.set_token_chunk(8192)
        inputs = measure.dit_inputs(MID, MID_FRAMES, (1, MID_TOKENS), MID_TEXT)
        with LiveBytes() as live:
            live.adopt([*model.parameters(), *model.buffers(), *inputs.values()])
            held = live.total
            live.reset_peak()
            model(**inputs, cache="store")
        tracked = live.total_peak
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss_peak_delta": peak_rss - base, "tracked_peak": tracked, "held": held}


def predicted_vs_real() -> bool:
    weights = measure.dit_weight_bytes(MID, torch.float32)["total"]
    with torch.device("meta"):
        inputs = measure.dit_inputs(MID, MID_FRAMES, (1, MID_TOKENS), MID_TEXT)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs.values())
    activations = measure.dit_activation_bytes(
        MID, MID_FRAMES, MID_TOKENS, MID_TEXT, dtype=torch.float32, token_chunk=8192, full_depth=True
    )
    predicted = weights + input_bytes + activations
    # glibc's malloc returns freed blocks above its mmap threshold to the system at once; a fixed 64 KiB threshold
    # (instead of the dynamic one, which grows to 32 MiB and then keeps freed tensors in its heap) makes the RSS
    # follow the live tensors, as the CUDA caching allocator's reserved memory follows them on a GPU.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run(
        [sys.executable, __file__, "--real-run"], capture_output=True, text=True, check=True, cwd=ROOT, env=env
    ).stdout
    real = json.loads(out.strip().splitlines()[-1])
    rss_error = real["rss_peak_delta"] / predicted - 1
    tracked_error = real["tracked_peak"] / predicted - 1
    tokens = (MID_FRAMES + 1) * MID_TOKENS + MID_TEXT
    print(
        f"predicted vs real (width {MID.hidden_size}, {MID.depth_double}+{MID.depth_single} blocks, {tokens} tokens, "
        f"fp32, CPU): predicted {predicted / GB:.3f} GB (weights {weights / GB:.3f} + inputs {input_bytes / GB:.3f} "
        f"+ activations {activations / GB:.3f}); real peak RSS delta {real['rss_peak_delta'] / GB:.3f} GB "
        f"({rss_error:+.1%}), tracked live bytes {real['tracked_peak'] / GB:.3f} GB ({tracked_error:+.1%})"
    )
    return abs(rss_error) <= TOLERANCE and abs(tracked_error) <= TOLERANCE


def main() -> int:
    if "--real-run" in sys.argv:
        print(json.dumps(_real_run()))
        return 0
    cache = measure.MeasureCache(measure.default_cache_dir())
    weights_lines()
    depth_check()
    ok = predicted_vs_real()
    table(cache)
    if not ok:
        print(f"FAIL: the prediction is off by more than {TOLERANCE:.0%}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
