"""The memory model (``avatar/memory/plan.py``) on the official model at 704×768: the modes ``memory=auto`` picks
for the issue's GPUs, the activation line with token chunking, the weights against the parameter arithmetic, the
refusal with its reason, and ``python -m launch.plan``'s memory lines. Measurements come from the real modules on
fake tensors, cached on disk by code hash (``avatar/memory/measure.py``): the first session measures (tens of
seconds), later ones read the cache."""

from __future__ import annotations

import pytest
import torch

from avatar.config import MemoryConfig, MemoryMode, ModelConfig, Offload, ParallelConfig, Shard
from avatar.io.errors import InputError
from avatar.memory import estimate as mp
from avatar.memory import measure
from avatar.plan import ParallelPlan
from launch.plan import main as plan_main

OFFICIAL = ModelConfig(name="hunyuan_avatar")
GB = 10**9


@pytest.fixture(scope="session")
def cache():
    return measure.MeasureCache(measure.default_cache_dir())


def resolve(world: int, gpu_gb: float, seconds: float, cache, mode: str = "auto") -> mp.MemoryPlan:
    plan = ParallelPlan.resolve(ParallelConfig(), world, OFFICIAL.num_heads)
    geometry = mp.planning_geometry(OFFICIAL, seconds)
    assert (geometry.width, geometry.height) == (704, 768)
    return mp.resolve(MemoryConfig(mode=MemoryMode(mode)), plan, OFFICIAL, geometry, int(gpu_gb * GB), cache=cache)


@pytest.mark.timeout(300)
def test_the_issue_gpus_at_704x768_129_frames(cache):
    seconds = 129 / 25
    one_80 = resolve(1, 80, seconds, cache).placement
    assert one_80.mode == MemoryMode.none and one_80.offload == Offload.none and not one_80.fp8
    assert resolve(1, 48, seconds, cache).estimate.fits
    one_24 = resolve(1, 24, seconds, cache).placement
    assert one_24.fp8 and one_24.offload == Offload.blocks and one_24.mode == MemoryMode.offload
    assert resolve(1, 8, seconds, cache).mode == MemoryMode.low
    eight_24 = resolve(8, 24, seconds, cache).placement
    assert eight_24.shard == Shard.fsdp and eight_24.offload == Offload.none and not eight_24.fp8
    assert resolve(8, 80, 60, cache).estimate.fits
    with pytest.raises(InputError) as refused:
        resolve(1, 2, seconds, cache)
    message = str(refused.value)
    assert "\n" not in message
    assert "no memory mode fits 704x768, 129 frames" in message and "1 × 2.0 GB" in message
    assert "memory=low at " in message and "would fit: a GPU with ≥ " in message


@pytest.mark.timeout(300)
def test_a_mode_that_does_not_fit_says_what_would(cache):
    with pytest.raises(InputError) as refused:
        resolve(1, 24, 5, cache, mode="none")
    message = str(refused.value)
    assert message.startswith("memory=none needs ") and "more than the 22.8 GB usable" in message
    assert "would fit: memory=low" in message and "GPUs (memory=" in message


@pytest.mark.timeout(300)
def test_encoders_peak_alone_and_the_stages_add_up(cache):
    chosen = resolve(1, 80, 5, cache).estimate
    encode, denoise = chosen.stage("encode"), chosen.stage("denoise")
    assert encode.parts["encoders"] > 16 * GB and "encoders" not in denoise.parts  # freed before the denoise
    assert chosen.peak == max(stage.total for stage in chosen.stages)
    low = resolve(1, 8, 5, cache).estimate
    assert low.stage("encode").parts["encoders"] == 0 and low.stage("denoise").parts["deep cache"] == 0


@pytest.mark.timeout(300)
def test_one_704x768_forward_is_within_8_gb_above_the_weights_with_chunking(cache):
    tokens = mp.tokens_per_frame(OFFICIAL, mp.planning_geometry(OFFICIAL, 5))
    assert 34 * tokens + mp.text_tokens(OFFICIAL) == 72639
    chunked = measure.dit_activation_bytes(OFFICIAL, 33, tokens, 831, token_chunk=8192, cache=cache)
    whole = measure.dit_activation_bytes(OFFICIAL, 33, tokens, 831, token_chunk=None, cache=cache)
    assert chunked <= 8 * GB < whole * 1.3 and chunked < 0.7 * whole
    assert resolve(1, 80, 5, cache).estimate.stage("denoise").parts["activations"] == chunked


@pytest.mark.timeout(120)
def test_dit_weights_equal_the_parameter_arithmetic():
    model = measure.meta_dit(OFFICIAL, torch.bfloat16)
    keep = model._keep_in_fp32_modules
    arithmetic = 0
    for name, param in model.named_parameters():
        arithmetic += param.numel() * (4 if any(name.startswith(m + ".") for m in keep) else 2)
    weights = measure.dit_weight_bytes(OFFICIAL, torch.bfloat16)
    assert weights["total"] == arithmetic + sum(b.numel() * b.element_size() for b in model.buffers())
    assert round(weights["total"] / GB, 1) == 26.3 and keep
    assert round(measure.dit_weight_bytes(OFFICIAL, torch.bfloat16, fp8=True)["total"] / GB, 1) == 13.9


@pytest.mark.timeout(300)
def test_launch_plan_prints_the_memory_lines_and_refuses_with_exit_2(capsys):
    argv = ["world=8", "model=hunyuan_avatar", "gpu_memory=24", "image_size=704", "seconds=5"]
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    assert "world 8 = data 1 × cfg 2 × ring 1 × ulysses 4" in out
    assert "\nmemory: fsdp (auto: " in out and "\npeak per rank: " in out and " of 24.0 GB (peak at " in out
    assert plan_main(["world=1", "model=hunyuan_avatar", "gpu_memory=2", "image_size=704", "seconds=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no memory mode fits") and err.count("\n") == 1
    assert plan_main(["world=1", "gpu_memory=24", "memory=huge"]) == 2
    assert "memory='huge' is not valid: use one of auto, none" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_free_memory_comes_from_the_override_then_the_provider_then_the_device():
    from avatar.memory.device import fixed_provider, free_bytes, set_provider

    cpu = torch.device("cpu")
    assert free_bytes(cpu, MemoryConfig()) == (None, "cpu (no GPU memory to check)")
    set_provider(fixed_provider(3.5))
    try:
        assert free_bytes(cpu, MemoryConfig()) == (3_500_000_000, "the device-memory provider")
        assert free_bytes(cpu, MemoryConfig(gpu_memory_gb=80.0)) == (80 * GB, "memory.gpu_memory_gb")
    finally:
        set_provider(None)


@pytest.mark.timeout(120)
def test_the_renderer_preflight_resolves_or_refuses_before_loading(tiny_weights):
    from avatar.compose import compose
    from avatar.pipeline.run import preflight
    from avatar.pipeline.topology import Topology

    cfg = compose(["model=tiny", f"weights={tiny_weights}"])
    chosen = preflight(cfg, Topology())  # CPU, nothing to plan for
    assert chosen.mode == MemoryMode.none and chosen.why.startswith("auto: no GPU memory")
    cfg = compose(["model=tiny", f"weights={tiny_weights}", "memory.gpu_memory_gb=0.001"])
    with pytest.raises(InputError, match=r"^pre-flight \(free memory from memory.gpu_memory_gb.*no memory mode fits"):
        preflight(cfg, Topology())
    cfg = compose(["model=tiny", f"weights={tiny_weights}", "memory.gpu_memory_gb=1"])
    assert preflight(cfg, Topology()).mode == MemoryMode.none  # the tiny model fits 1 GB as it is


def test_several_speakers_count_their_audio_features_and_adapter_work(cache):
    """Each extra speaker track adds its Whisper features and its audio tokens / adapter outputs to the denoise."""
    plan = ParallelPlan.resolve(ParallelConfig(), 1, OFFICIAL.num_heads)
    one = mp.planning_geometry(OFFICIAL, 5)
    two = mp.Geometry(one.width, one.height, one.num_frames, speakers=2)
    chosen = mp.placement(MemoryConfig(), MemoryMode.none)
    d1 = mp.estimate(plan, OFFICIAL, one, None, chosen, cache=cache).stage("denoise").parts
    d2 = mp.estimate(plan, OFFICIAL, two, None, chosen, cache=cache).stage("denoise").parts
    per_track = 4 * one.num_frames * OFFICIAL.audio_window * OFFICIAL.audio_layers * OFFICIAL.audio_channels
    assert d1["audio features"] == per_track and d2["audio features"] == 2 * per_track
    assert d2["activations"] > d1["activations"]
    assert "2 speakers" in two.describe() and "speakers" not in one.describe()
