"""The FLOP model: counted on fake tensors of the real modules (``avatar.memory.flops``), cached, per stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avatar.compose import compose
from avatar.memory import flops as fl
from avatar.memory.measure import MeasureCache
from avatar.models.vae import plan_spatial_tiles, plan_temporal_tiles, whole_frame_plan
from avatar.pipeline.decode import plan_decode
from avatar.weights.tiny_cond import tiny_vae_config


def test_cpu_attention_is_counted_like_the_cuda_kernels():
    q = torch.randn(1, 2, 10, 8)
    k = torch.randn(1, 2, 12, 8)
    with fl.counter() as count:
        F.scaled_dot_product_attention(q, k, k)
    assert count.get_total_flops() == 4 * 2 * 10 * 12 * 8


def test_dit_full_step_costs_more_than_a_cached_step_and_is_cached(tmp_path):
    cfg = compose(["model=tiny"]).model
    cache = MeasureCache(tmp_path)
    one = fl.dit_forward_flops(cfg, 9, (4, 4), cfg.text_len, cache=cache)
    assert one["full"] > one["cached"] > 0
    # more tokens, more work; attention makes it super-linear in the tokens
    two = fl.dit_forward_flops(cfg, 9, (8, 4), cfg.text_len, cache=cache)
    assert two["full"] > 2 * one["full"] * 0.9 and two["full"] > one["full"]
    assert MeasureCache(tmp_path).values == cache.values and len(cache.values) == 2
    # a deeper model costs more per full step, not per cached step (only the last single block runs)
    deeper = fl.dit_forward_flops(
        compose(["model=tiny", "model.depth_single=4"]).model, 9, (4, 4), cfg.text_len, cache=cache
    )
    assert deeper["full"] > one["full"] and deeper["cached"] == one["cached"]


def test_each_extra_speaker_costs_one_adapter_attention_per_adapter(tmp_path):
    """Several speakers: every adapter attends once more per track (its k/v projection and attention under the
    speaker's mask), so the count is linear in the tracks, each track costs the same per adapter, and an extra
    speaker is a small fraction of a forward."""
    cache = MeasureCache(tmp_path)

    def full(adapters: list[int], speakers: int) -> int:
        cfg = compose(["model=tiny", "model.depth_double=3", f"model.adapter_after_double={adapters}"]).model
        return fl.dit_forward_flops(cfg, 9, (4, 4), cfg.text_len, cache=cache, speakers=speakers)["full"]

    one, two, three = (full([1], n) for n in (1, 2, 3))
    assert two - one == three - two > 0
    assert (two - one) / one < 0.05
    # the extra speaker's cost grows by the same amount with every adapter (plus its audio projection once)
    extra = [full(adapters, 2) - full(adapters, 1) for adapters in ([], [1], [1, 2])]
    assert extra[2] - extra[1] == extra[1] - extra[0] > 0


def test_decode_flops_follow_the_pieces(tmp_path):
    config = tiny_vae_config(compose(["model=tiny"]).model)
    tiles = plan_temporal_tiles(9, 8, 6)
    cache = MeasureCache(tmp_path)
    one = fl.vae_decode_flops(config, plan_decode(tiles, plan_spatial_tiles(4, 4, 3, 2), 1), dtype=torch.float32)
    four = fl.vae_decode_flops(
        config, plan_decode(tiles, plan_spatial_tiles(4, 4, 3, 2), 4), dtype=torch.float32, cache=cache
    )
    assert one == four > 0  # who decodes does not change the work
    # the spatial overlap costs: 3+2 rows and columns decoded for 4
    untiled = fl.vae_decode_flops(config, plan_decode(tiles, whole_frame_plan(4, 4), 4), dtype=torch.float32)
    assert 1.2 < four / untiled < (5 / 4) ** 2 * 1.05


def test_peak_table_and_rates():
    assert fl.peak_tflops("NVIDIA H200") == 989.4
    assert fl.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert fl.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert fl.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert fl.peak_tflops("Some GPU") is None and fl.peak_tflops(None) is None
    assert fl._rate(2e15, 2.0, 4, 1000.0) == {"seconds": 2.0, "gpus": 4, "tflops_per_gpu": 250.0, "mfu": 0.25}
