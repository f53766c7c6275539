"""FSDP2 weight sharding (``memory.shard=fsdp``) on gloo ranks equals one unsharded process, bit for bit.

The tiny DiT is loaded from the tiny checkpoint the way the renderer loads it (``load_dit`` on the host, then
``avatar.memory.apply.place_dit`` with the run's placement), and the whole denoise loop runs. Bit-exact, not within a tolerance:
all-gathering shards copies bytes, so every matmul sees the same weights as in one process; the reference runs with
the ranks' thread count (one, ``OMP_NUM_THREADS=1``), since CPU kernels may sum in another order with more threads.

One 4-rank run (start-up and per-collective latency dominate on the 2-core machine) with two cases: the fp8
checkpoint (float8 weights beside fp32 biases: gathered as bytes, which gloo can carry) sharded four ways over cfg 2
× ulysses 2, one window, the deep cache on (16 steps: cached steps 6, 8, 10, 12, where only the last single block
runs); and data 2 × cfg 2 with three windows per step (data group 0 runs two, group 1 one), where each data group
shards over its own two ranks (the data axis is never in the shard group). In both the two CFG ranks of a shard
group run different branches (negative / conditioned) with the same gathered weights.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.utils.cond import random_conditioning
from tests.utils.spawn import spawn

#: ``(parallel, fp8, latents, steps)``. blend, 9-latent windows with overlap 2: 9 latents are one window, 23 are
#: three (which do not split evenly over two data groups). The cache is on; below 10 steps nothing is cached.
CASES = [
    ({"data": 1, "cfg": 2, "ring": 1, "ulysses": 2}, True, 9, 16),
    ({"data": 2, "cfg": 2, "ring": 1, "ulysses": 1}, False, 23, 3),
]
SIDE = 6  # 3×3 tokens per frame: 2 sequence ranks pad every frame


def setup(weights: str, parallel: dict, fp8: bool, latents: int, steps: int):
    from avatar.config import MemoryMode, ParallelConfig
    from avatar.pipeline import denoise as dn
    from avatar.weights.load import load_dit
    from avatar.compose import compose

    cfg = compose(["model=tiny", "sampling.fidelity=fp32"])
    cfg.parallel = ParallelConfig(**{k: str(v) for k, v in parallel.items()})
    cfg.memory.mode = MemoryMode.fsdp_fp8 if fp8 else MemoryMode.fsdp
    model = load_dit(weights, cfg.model, dtype=torch.float32, device="cpu", fp8=fp8)
    cond = random_conditioning(cfg.model, latents, SIDE)
    return cfg, model, cond, replace(cfg.sampling, steps=steps, cache=True)


def denoise(cfg, model, cond, sampling, topo) -> torch.Tensor:
    from avatar.pipeline import denoise as dn
    from avatar.pipeline import strategies as strat

    plan = strat.make("blend", cfg.model, cond.num_frames, 2, sampling.fidelity)
    noise = dn.make_noise((1, cfg.model.latent_channels, plan.domain, SIDE, SIDE), seed=5)
    return dn.denoise_window_strategy(
        model, cond, noise, sampling, cfg.model, "blend", overlap=2, topology=topo, dtype=torch.float32
    )


def worker(rank: int, world: int, weights: str, cases: list):
    from torch.distributed.tensor import DTensor

    from avatar.memory.apply import place_dit, run_placement
    from avatar.parallel.fsdp import local_weight_bytes
    from avatar.plan import resolve_plan

    out = {}
    for case in cases:
        parallel, fp8 = case[:2]
        cfg, model, cond, sampling = setup(weights, *case)
        full = local_weight_bytes(model)
        topo, _ = resolve_plan(cfg, world).build_mesh("cpu").topologies(rank, torch.device("cpu"), cfg.attention)
        model.set_sequence_parallel(topo.seq)
        placed = place_dit(model, run_placement(cfg), topo)
        block = placed.model.single_blocks[0].linear1.weight
        assert isinstance(block, DTensor) and block.dtype == (torch.float8_e4m3fn if fp8 else torch.float32)
        shards = world // int(parallel["data"])
        held = local_weight_bytes(placed.model)
        assert held < full / shards * 1.2, (held, full, shards)  # each rank holds ~1/shards of the weights
        out[str(case)] = denoise(cfg, placed.model, cond, sampling, topo)
        # resharded after every forward: no unit is left gathered
        assert all(isinstance(p, DTensor) for unit in model.block_sequence() for p in unit.parameters())
    return out


def check(weights, results, cases):
    from avatar.pipeline.topology import Topology

    for case in cases:
        cfg, model, cond, sampling = setup(weights, *case)
        reference = denoise(cfg, model, cond, sampling, Topology())
        for rank, result in enumerate(results):
            latents = result[str(case)]
            err = (latents - reference).abs().max().item()
            assert torch.equal(latents, reference), f"{case} rank {rank}: max err {err:.2e}"


@pytest.mark.timeout(240)
def test_fsdp_sharded_over_four_and_two_ranks_equals_one_process(tiny_weights):
    check(tiny_weights, spawn(4, worker, str(tiny_weights), CASES, timeout=230), CASES)
