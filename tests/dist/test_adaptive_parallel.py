"""The adaptive step cache on 2 gloo ranks equals one process bit for bit: the same final latents and the same
per-window full/reused schedule under Ulysses (the state in sequence slices), CFG-parallel (each rank one branch's
state) and data-parallel plans (windows spread over the groups, rows exchanged), with the decisions agreed by one
all-reduce per window call. A state snapshot taken on 2 ranks is the one-process snapshot (plan-independent), so a
checkpoint resumes on any plan. Plans come from the launcher's own planner (``avatar.plan``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.utils.cond import random_conditioning
from tests.utils.spawn import spawn

pytestmark = pytest.mark.slow

NUM_LATENTS = 14  # blend: two windows of 9 latents; shift: circular windows whose frames move every step
SIDE = 6  # 3×3 tokens per frame: 2 sequence ranks pad every frame
STEPS = 20
THRESHOLD = 1.0  # shift: some steps reused by the estimate, some refused (not only max_skip)
SNAPSHOT_AFTER = 12


def setup(parallel: dict):
    from avatar.compose import compose
    from avatar.config import ParallelConfig
    from avatar.models.transformer import AvatarDiT

    cfg = compose(["model=tiny", "sampling.fidelity=fp32"])
    cfg.parallel = ParallelConfig(**{k: str(v) for k, v in parallel.items()})
    torch.manual_seed(0)
    model = AvatarDiT(cfg.model).eval()
    cond = random_conditioning(cfg.model, NUM_LATENTS, SIDE)
    sampling = replace(cfg.sampling, steps=STEPS, cache="adaptive", cache_threshold=THRESHOLD, cache_max_skip=2)
    return cfg, model, cond, sampling


def denoise(cfg, model, cond, sampling, topo, strategy: str):
    from avatar.pipeline import denoise as dn
    from avatar.pipeline import strategies as strat

    plan = strat.make(strategy, cfg.model, cond.num_frames, 2, sampling.fidelity)
    noise = dn.make_noise((1, cfg.model.latent_channels, plan.domain, SIDE, SIDE), seed=5)
    stats = dn.DenoiseStats()
    velocity = dn.GuidedVelocity(model, cond, sampling, topo, torch.float32, stats)
    cache = dn.new_cache(sampling, plan.domain)
    kept = {}

    def on_step(step, x):
        if step + 1 == SNAPSHOT_AFTER:
            kept["snapshot"] = cache.snapshot()  # a collective, as the resume takes it

    with torch.inference_mode():
        latents = dn.denoise_lockstep(plan, velocity, noise, cache, on_step=on_step)
    return latents, [(w["window"], w["steps"]) for w in stats.cache_windows], kept["snapshot"]


def worker(rank: int, world: int, cases: list):
    from avatar.plan import resolve_plan

    out = {}
    for parallel, strategy in cases:
        cfg, model, cond, sampling = setup(parallel)
        topo, _ = resolve_plan(cfg, world).build_mesh("cpu").topologies(rank, torch.device("cpu"), cfg.attention)
        model.set_sequence_parallel(topo.seq)
        out[(tuple(parallel.items()), strategy)] = denoise(cfg, model, cond, sampling, topo, strategy)
    return out


def single(parallel: dict, strategy: str):
    from avatar.pipeline.topology import Topology

    cfg, model, cond, sampling = setup(parallel)
    return denoise(cfg, model, cond, sampling, Topology(), strategy)


CASES = [
    ({"data": 1, "cfg": 1, "ring": 1, "ulysses": 2}, "shift"),
    ({"data": 1, "cfg": 2, "ring": 1, "ulysses": 1}, "blend"),
    ({"data": 2, "cfg": 1, "ring": 1, "ulysses": 1}, "shift"),
]


@pytest.mark.timeout(300)
def test_two_ranks_equal_one_process():
    results = spawn(2, worker, CASES, timeout=280)
    for parallel, strategy in CASES:
        latents, schedule, (tensors, meta) = single(parallel, strategy)
        assert any("R" in steps for _, steps in schedule), f"{strategy}: nothing reused, the test would prove nothing"
        for rank, result in enumerate(results):
            got_latents, got_schedule, (got_tensors, got_meta) = result[(tuple(parallel.items()), strategy)]
            assert got_schedule == schedule, f"{parallel} {strategy} rank {rank}"
            assert torch.equal(got_latents, latents), f"{parallel} {strategy} rank {rank}"
            if rank == 0:  # the group's rank 0 holds the gathered snapshot
                assert sorted(got_tensors) == sorted(tensors)
                for name in tensors:
                    assert torch.equal(got_tensors[name], tensors[name]), f"{parallel} {strategy} {name}"
                assert got_meta["windows"].keys() == meta["windows"].keys()
                for w, state in meta["windows"].items():
                    mine = got_meta["windows"][w]
                    # float64 sums over sequence slices add in another order than over the whole: equal to rounding
                    assert mine["rate"] == pytest.approx(state["rate"], rel=1e-12), (w, mine, state)
                    assert mine["skips"] == state["skips"], (w, mine, state)
