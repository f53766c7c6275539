"""The FLOP model of one window of the official model (``avatar.memory.flops``), the numbers of docs/performance.md.

Counts on fake tensors of the real modules (no GPU, no weights): a full and a cached DiT step of one CFG branch,
the tiled VAE decode and the reference encode of ``--frames`` frames at ``--height`` × ``--width``, and the total of
a run of ``--steps`` steps with the official cache plan, with the floor on ``--gpus`` GPUs of ``--peak`` TFLOP/s.

    .venv/bin/python bench/flop_model.py [--height 704 --width 768 --frames 129 --steps 50 --gpus 8 --peak 989.4]
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--frames", type=int, default=129)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--peak", type=float, default=989.4, help="TFLOP/s per GPU (default: H100 SXM bf16 dense)")
    args = parser.parse_args()

    from diffusers import AutoencoderKLHunyuanVideo
    from torch._subclasses.fake_tensor import FakeTensorMode

    from avatar.compose import compose
    from avatar.memory import flops as fl
    from avatar.memory.measure import MeasureCache, default_cache_dir, to_fake
    from avatar.models.vae import configure_tiling, plan_spatial_tiles, plan_temporal_tiles
    from avatar.pipeline.cache import CachePlan
    from avatar.pipeline.decode import plan_decode

    cfg = compose(["model=hunyuan_avatar"]).model
    cache = MeasureCache(default_cache_dir())
    ratio_t, ratio_s = cfg.vae_temporal_ratio, cfg.vae_spatial_ratio
    latents = (args.frames - 1) // ratio_t + 1
    h_lat, w_lat = args.height // ratio_s, args.width // ratio_s
    grid = (h_lat // cfg.patch_size[1], w_lat // cfg.patch_size[2])
    dit = fl.dit_forward_flops(cfg, latents, grid, cfg.text_len, cache=cache)

    tiles = plan_temporal_tiles(
        latents, cfg.vae_tile_frames // ratio_t, cfg.vae_tile_stride_frames // ratio_t, ratio_t
    )
    spatial = plan_spatial_tiles(h_lat, w_lat, cfg.vae_tile_size // ratio_s, cfg.vae_tile_stride // ratio_s, ratio_s)
    vae_config = {"latent_channels": cfg.latent_channels}
    decode = fl.vae_decode_flops(vae_config, plan_decode(tiles, spatial, args.gpus), cache=cache)

    def encode() -> int:
        with torch.device("meta"):
            vae = AutoencoderKLHunyuanVideo(**vae_config).half()
        configure_tiling(vae, cfg)
        mode = FakeTensorMode()
        to_fake(vae, mode)
        with mode:
            pixels = torch.zeros(1, 3, args.frames, args.height, args.width, dtype=torch.half)
        with mode, torch.no_grad(), fl.counter() as count:
            vae.encode(pixels)
        return count.get_total_flops()

    key = fl._key("vae_encode_flops", frames=args.frames, size=[args.height, args.width], code=fl._code())
    encode_flops = cache.get(key, encode)
    cached_steps = len(CachePlan.for_steps(args.steps, True).reuse_steps)
    full_steps = args.steps - cached_steps
    total = 2 * (full_steps * dit["full"] + cached_steps * dit["cached"]) + decode + encode_flops
    print(
        f"{args.height}x{args.width}, {args.frames} frames ({latents} latents, {grid[0] * grid[1]} tokens per frame)"
    )
    print(f"  DiT full step, one CFG branch:   {dit['full'] / 1e15:8.3f} PFLOP")
    print(f"  DiT cached step, one CFG branch: {dit['cached'] / 1e15:8.3f} PFLOP")
    print(f"  VAE decode ({len(tiles)} x {len(spatial.tiles)} tiles):".ljust(35) + f"{decode / 1e15:8.3f} PFLOP")
    print(f"  VAE encode of the reference:     {encode_flops / 1e15:8.3f} PFLOP")
    print(
        f"  run of {args.steps} steps ({full_steps} full, {cached_steps} cached, 2 branches): {total / 1e15:.1f} PFLOP"
    )
    floor = total / (args.gpus * args.peak * 1e12)
    print(
        f"  floor on {args.gpus} GPUs of {args.peak:g} TFLOP/s: {floor:.1f} s at 100 % MFU, {2 * floor:.1f} s at 50 %"
    )


if __name__ == "__main__":
    main()
