"""Tier 3 (CUDA): the memory placements on a real device. Block streaming with the side-stream prefetch equals the
resident model bit for bit and keeps the GPU's weight bytes at about two units; the deep cache in pinned host memory
reads back what was written; through the entry point ``memory=offload`` and ``memory=fsdp_fp8`` (2 GPUs, NCCL)
render the frames of ``memory=fp8``, and ``memory=low`` completes (its encoders run on the CPU in fp32, so its
conditioning, and with it the video, differs from the GPU encoders' in the last bits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.e2e.conftest import generate, tiny_args

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _render(weights, out, *extra, nproc=1):
    from tests.utils.video import read_frames

    args = tiny_args(weights, out, None, "device=cuda", "dtype=fp32", "sampling.fidelity=fp32", *extra)
    result = generate(*args, nproc=nproc)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_frames(str(out)), result.stderr


@pytest.mark.timeout(300)
def test_streamed_blocks_on_cuda_equal_resident(tiny_weights):
    from avatar.compose import compose
    from avatar.memory.apply import place_dit, run_placement
    from avatar.pipeline.topology import Topology
    from avatar.weights.load import load_dit
    from tests.unit.test_offload import _forwards, _inputs

    device = torch.device("cuda")
    cfg = compose(["model=tiny", "memory.offload=blocks", "fp8=true"])
    resident = load_dit(tiny_weights, cfg.model, dtype=torch.bfloat16, device=device, fp8=True)
    model = load_dit(tiny_weights, cfg.model, dtype=torch.bfloat16, device="cpu", fp8=True)
    placed = place_dit(model, run_placement(cfg), Topology(device=device))
    unit = model.single_blocks[0].linear1.weight
    assert unit.device.type == "cpu" and unit.is_pinned()
    inputs = {k: v.to(device) for k, v in _inputs(cfg.model).items()}
    for ours, reference in zip(_forwards(model, inputs), _forwards(resident, inputs)):
        assert torch.equal(ours, reference)
    assert placed.streamer.prefetched > 0 and placed.streamer.device_bytes() == 0


@pytest.mark.timeout(120)
def test_deep_cache_in_pinned_host_memory():
    from avatar.models.transformer import CachedInput
    from avatar.pipeline.cache import CachePlan, DeepCache

    img = torch.randn(1, 4, 5, 8, device="cuda")
    cache = DeepCache(CachePlan.for_steps(16, True), 5, host=True)
    cache.stage(0, 0, [0, 1, 2], CachedInput(img=img, txt=img[:, 0, :3]))
    cache.commit()
    assert cache.buffers[0].img.is_pinned()
    read = cache.read(0, [0, 1, 2])
    assert read.img.device.type == "cuda" and torch.equal(read.img, img)


@pytest.mark.timeout(600)
def test_offload_low_and_fsdp_through_the_entry_point(tiny_weights, tmp_path):
    plain, _ = _render(tiny_weights, tmp_path / "plain.mp4", "memory=fp8")
    streamed, log = _render(tiny_weights, tmp_path / "offload.mp4", "memory=offload")
    assert "blocks streamed from host" in log
    np.testing.assert_array_equal(streamed, plain)
    low, log = _render(tiny_weights, tmp_path / "low.mp4", "memory=low")
    assert "memory: memory=low" in log and low.shape == plain.shape
    if torch.cuda.device_count() >= 2:
        sharded, log = _render(tiny_weights, tmp_path / "fsdp.mp4", "memory=fsdp_fp8", "parallel.cfg=2", nproc=2)
        assert "DiT sharded (FSDP2) over 2 rank(s)" in log
        np.testing.assert_array_equal(sharded, plain)
