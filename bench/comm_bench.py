"""Bytes each rank sends per DiT forward, per sequence-parallel plan, next to the theoretical minimum.

``python bench/comm_bench.py [--frames 5 --side 8]`` runs the tiny AvatarDiT (configs/model/tiny.yaml) on 1, 2 and 4
gloo ranks on this machine (CPU), counts every collective through ``avatar.parallel.comm`` and prints, per plan,
what one rank sends per forward (attention exchanges and frame gathers) and the minimum any scheme of that kind
must send:

- Ulysses U, per attention: q, k, v out and the output back, (U−1)/U of them (4·(U−1)/U·S·H·D elements), and the
  text output heads to the U−1 others ((U−1)·L·H/U·D).
- Ring R, per attention: this rank's k and v to the R−1 others (2·(R−1)·S'·h·D) and the text queries' partial
  results ((R−1)·L·h·D; we send them in fp32 with their log-sum-exp).
- Gathers: the rank's output frames to the W−1 others, once for the final layer (and once more when storing the
  cache, not done here).

S is this rank's image tokens (padded), S' = U·S the tokens a ring rank holds after the head scatter, h = H/U.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

REPEATS = 3
PLANS = [(1, 1), (2, 1), (1, 2), (4, 1), (1, 4), (2, 2)]  # (ulysses, ring)


def tiny_model_config():
    from omegaconf import OmegaConf

    from avatar.config import ModelConfig

    path = ROOT / "configs" / "model" / "tiny.yaml"
    schema = OmegaConf.structured(ModelConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(path)))


def make_inputs(cfg, num_frames: int, side: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    text_len = 8
    text_mask = torch.zeros(1, text_len, dtype=torch.long)
    text_mask[:, :5] = 1
    channels = cfg.latent_channels
    return {
        "x": torch.randn(1, channels, num_frames, side, side, generator=gen),
        "t": torch.full((1,), 700.0),
        "ref_latents": torch.randn(1, channels, 1, side, side, generator=gen).repeat(1, 1, num_frames, 1, 1),
        "text_states": torch.randn(1, text_len, cfg.text_states_dim, generator=gen),
        "text_mask": text_mask,
        "text_states_2": torch.randn(1, cfg.text_states_dim_2, generator=gen),
        "audio_feats": torch.randn(
            1, 4 * num_frames - 3, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=gen
        ),
        "face_mask": torch.ones(1, 1, 1, side, side),
    }


def minimum_bytes(cfg, ulysses: int, ring: int, num_frames: int, side: int, text_len: int, elem: int) -> int:
    """The theoretical minimum a rank sends per forward (module docstring), in bytes."""
    world = ulysses * ring
    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    tokens_per_frame = (side // cfg.patch_size[1]) * (side // cfg.patch_size[2])
    local = -(-(num_frames + 1) // world) * tokens_per_frame
    per_attention = 0
    if ulysses > 1:
        per_attention += 4 * (ulysses - 1) * local * heads * head_dim // ulysses
        per_attention += (ulysses - 1) * text_len * (heads // ulysses) * head_dim
    if ring > 1:
        per_attention += 2 * (ring - 1) * ulysses * local * (heads // ulysses) * head_dim
        per_attention += (ring - 1) * text_len * (heads // ulysses) * head_dim
    num_attention = cfg.depth_double + cfg.depth_single
    out_channels = cfg.latent_channels * cfg.patch_size[1] * cfg.patch_size[2]
    gather = (world - 1) * local * out_channels
    return (num_attention * per_attention + gather) * elem


def worker(rank: int, world: int, port: int, ulysses: int, ring: int, num_frames: int, side: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from launch.dist import destroy, init_distributed

    try:
        init_distributed("cpu", timeout=120)
        run_forward(rank, world, ulysses, ring, num_frames, side, results)
    except Exception:  # noqa: BLE001 - reported to the parent
        results.put((rank, None, traceback.format_exc()))
    finally:
        destroy()


def run_forward(rank: int, world: int, ulysses: int, ring: int, num_frames: int, side: int, results) -> None:
    from avatar.config import ParallelConfig
    from avatar.models.transformer import AvatarDiT
    from avatar.parallel.comm import counting
    from avatar.plan import ParallelPlan

    cfg = tiny_model_config()
    plan = ParallelPlan.resolve(
        ParallelConfig(data="1", cfg="1", ring=str(ring), ulysses=str(ulysses)), world, cfg.num_heads
    )
    torch.manual_seed(0)
    model = AvatarDiT(cfg).eval()
    model.set_sequence_parallel(plan.build_mesh("cpu").sequence())
    inputs = make_inputs(cfg, num_frames, side)
    with torch.no_grad(), counting() as stats:
        velocity = model(**inputs)
    with torch.no_grad():  # CPU time of this rank for REPEATS more forwards (after the warm-up above)
        cpu_start = time.process_time()
        for _ in range(REPEATS):
            model(**inputs)
        cpu = (time.process_time() - cpu_start) / REPEATS
    results.put((rank, (stats.snapshot(), cpu), float(velocity.float().abs().sum())))


def run_plan(ulysses: int, ring: int, num_frames: int, side: int):
    world = ulysses * ring
    context = mp.get_context("spawn")
    results = context.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = [
        context.Process(target=worker, args=(rank, world, port, ulysses, ring, num_frames, side, results))
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    collected = {}
    for _ in range(world):
        rank, measured, checksum = results.get(timeout=300)
        if measured is None:
            raise RuntimeError(f"rank {rank} failed:\n{checksum}")
        collected[rank] = (measured, checksum)
    for process in processes:
        process.join(timeout=30)
    (snapshot, _), checksum = collected[0]
    cpu_total = sum(measured[1] for measured, _ in collected.values())
    return snapshot, checksum, cpu_total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5, help="latent frames per window (the reference adds one)")
    parser.add_argument("--side", type=int, default=8, help="latent height = width")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = tiny_model_config()
    rows = [
        ("plan", "ranks", "sent/rank (measured)", "minimum", "ratio", "CPU-s all ranks / 1 process", "by category")
    ]
    reference = None
    cpu_one = None
    for ulysses, ring in PLANS:
        snapshot, checksum, cpu_total = run_plan(ulysses, ring, args.frames, args.side)
        reference = checksum if reference is None else reference
        cpu_one = cpu_total if cpu_one is None else cpu_one
        sent = sum(num_bytes for _, num_bytes in snapshot.values())
        minimum = minimum_bytes(cfg, ulysses, ring, args.frames, args.side, text_len=8, elem=4)
        ratio = "-" if minimum == 0 else f"{sent / minimum:.3f}"
        detail = ", ".join(f"{name} {calls}×/{num_bytes} B" for name, (calls, num_bytes) in snapshot.items())
        rows.append(
            (
                f"ulysses {ulysses} × ring {ring}",
                str(ulysses * ring),
                f"{sent} B",
                f"{minimum} B",
                ratio,
                f"{cpu_total / cpu_one:.2f}",
                detail,
            )
        )
        if abs(checksum - reference) > 1e-3 * abs(reference):
            raise RuntimeError(f"plan ulysses={ulysses} ring={ring} changed the output ({checksum} vs {reference})")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        sys.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() + "\n")
    sys.stdout.write(
        f"tiny DiT ({cfg.depth_double}+{cfg.depth_single} attention blocks, {cfg.num_heads} heads), "
        f"{args.frames}+1 frames of {args.side // 2}x{args.side // 2} tokens, 8 text tokens, fp32; CPU time is the "
        f"mean of {REPEATS} forwards per rank, summed over the ranks, relative to the one-process plan\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
