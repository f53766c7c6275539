"""Block offload (``memory.offload=blocks``) on the CPU: the tiny DiT, placed by the renderer's own ``place_dit``,
gives bit-identical outputs to the resident model for a full, a cache-storing and a cache-reusing forward (bf16 and
fp8 checkpoints), copies each unit in once per use (a cached forward only the last single block), holds at most
two units (the running one and the prefetched next) and leaves every unit's weights in host memory after."""

from __future__ import annotations

import pytest
import torch

from avatar.memory.apply import check_placement, place_dit, run_placement
from avatar.pipeline.topology import Topology
from avatar.weights.load import load_dit


def _config(*overrides: str):
    from avatar.compose import compose

    return compose(["model=tiny", *overrides])


def _inputs(cfg):
    from avatar.memory.measure import dit_inputs

    gen = torch.Generator().manual_seed(3)
    out = {}
    for key, value in dit_inputs(cfg, 3, (3, 3), cfg.text_len).items():
        out[key] = torch.randn(value.shape, generator=gen) if key in ("x", "ref_latents", "audio_feats") else value
    return out


def _forwards(model, inputs):
    with torch.inference_mode():
        full = model(**inputs)
        stored, cached = model(**inputs, cache="store")
        reused = model(**inputs, cache="reuse", cached=cached)
    return full, stored, reused


@pytest.mark.parametrize("fp8", [False, True])
def test_streamed_blocks_equal_the_resident_model(tiny_weights, fp8):
    cfg = _config("memory.offload=blocks", f"fp8={str(fp8).lower()}")
    chosen = run_placement(cfg)
    assert chosen.offload == "blocks" and chosen.fp8 == fp8
    resident = load_dit(tiny_weights, cfg.model, dtype=torch.float32, device="cpu", fp8=fp8)
    model = load_dit(tiny_weights, cfg.model, dtype=torch.float32, device="cpu", fp8=fp8)
    placed = place_dit(model, chosen, Topology())
    streamer = placed.streamer
    units = model.block_sequence()
    assert streamer is not None and len(units) == 1 + 2 + 1 + 2  # txt_in, 2 double, 1 adapter, 2 single
    host = {id(p): p.data for unit in units for p in unit.parameters()}

    seen = []
    for unit in units:
        unit.register_forward_pre_hook(lambda *_: seen.append((len(streamer.loaded), streamer.device_bytes())))
    inputs = _inputs(cfg.model)
    for ours, reference in zip(_forwards(model, inputs), _forwards(resident, inputs)):
        assert torch.equal(ours, reference)
    # A full forward copies every unit in (all but the first prefetched by its predecessor), twice; the cached one
    # only the last single block.
    assert streamer.onloads == 2 * len(units) + 1
    assert streamer.prefetched == 2 * (len(units) - 1)
    assert max(count for count, _ in seen) <= 2
    largest = max(sum(p.numel() * p.element_size() for p in unit.parameters()) for unit in units)
    assert 0 < max(size for _, size in seen) <= 2 * largest
    assert streamer.loaded == {}
    for unit in units:
        for param in unit.parameters():
            assert param.data.data_ptr() == host[id(param)].data_ptr()  # back on the host copy


def test_shard_with_model_offload_is_refused_before_loading():
    from avatar.io.errors import InputError

    with pytest.raises(InputError, match=r"memory.shard=fsdp with memory.offload=model .* not supported"):
        check_placement(_config("memory=fsdp", "memory.offload=model"))
    check_placement(_config("memory=fsdp", "memory.offload=blocks"))  # FSDP's own CPU offload: fine


def test_deep_cache_in_host_memory_reads_what_was_written():
    from avatar.models.transformer import CachedInput
    from avatar.pipeline.cache import CachePlan, DeepCache

    gen = torch.Generator().manual_seed(0)
    writes = [([0, 1, 2], torch.randn(1, 4, 5, 8, generator=gen)), ([2, 3, 4], torch.randn(1, 4, 5, 8, generator=gen))]
    reads = {}
    for host in (False, True):
        cache = DeepCache(CachePlan.for_steps(16, True), 5, host=host)
        for window, (frames, img) in enumerate(writes):
            cache.stage(1, window, frames, CachedInput(img=img, txt=img[:, 0, :3] * 2))
        cache.commit()
        buffer = cache.buffers[1]
        assert buffer.img.device.type == "cpu" and buffer.img.is_pinned() == (host and torch.cuda.is_available())
        reads[host] = [cache.read(1, frames) for frames, _ in writes]
        cache.free()
    for plain, hosted in zip(reads[False], reads[True]):
        assert torch.equal(plain.img, hosted.img) and torch.equal(plain.txt, hosted.txt)
