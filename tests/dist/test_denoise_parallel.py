"""The whole denoise loop on gloo ranks equals one process (fp32 path, deep cache on): final video latents of the
``shift`` and ``blend`` strategies under Ulysses, Ring, CFG-parallel and data-parallel plans (bit-exact without Ring),
with token counts per frame that do not divide the world. The plan, mesh and topology are built by the launcher's own
``launch.plan`` (``resolve_plan`` → ``build_mesh`` → ``topologies``)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.utils.cond import random_conditioning
from tests.utils.spawn import spawn

pytestmark = pytest.mark.slow

NUM_LATENTS = 14  # two blend windows of 9 latents (tiny window: 33 frames); shift: 17 latents in 2 windows
SIDE = 6  # 3×3 tokens per frame: 2 and 4 sequence ranks pad every frame


def setup(parallel: dict, strategy: str):
    from avatar.config import ParallelConfig
    from avatar.models.transformer import AvatarDiT
    from avatar.pipeline import denoise as dn
    from avatar.compose import compose

    cfg = compose(["model=tiny", "sampling.fidelity=fp32"])
    cfg.parallel = ParallelConfig(**{k: str(v) for k, v in parallel.items()})
    torch.manual_seed(0)
    model = AvatarDiT(cfg.model).eval()
    cond = random_conditioning(cfg.model, NUM_LATENTS, SIDE)
    # 20 steps: the cache writes on steps 6, 8, 10, 12, 14 and is read on 7, 9, 11, 13, 15 (data groups exchange it).
    sampling = replace(cfg.sampling, steps=20, cache=True)
    return cfg, model, cond, sampling


def denoise(cfg, model, cond, sampling, topo, strategy: str) -> torch.Tensor:
    from avatar.pipeline import denoise as dn
    from avatar.pipeline import strategies as strat

    plan = strat.make(strategy, cfg.model, cond.num_frames, 2, sampling.fidelity)
    noise = dn.make_noise((1, cfg.model.latent_channels, plan.domain, SIDE, SIDE), seed=5)
    return dn.denoise_window_strategy(
        model, cond, noise, sampling, cfg.model, strategy, overlap=2, topology=topo, dtype=torch.float32
    )


def worker(rank: int, world: int, cases: list):
    from avatar.plan import resolve_plan

    out = {}
    for parallel, strategy in cases:
        cfg, model, cond, sampling = setup(parallel, strategy)
        topo, _ = resolve_plan(cfg, world).build_mesh("cpu").topologies(rank, torch.device("cpu"), cfg.attention)
        model.set_sequence_parallel(topo.seq)
        out[(tuple(parallel.items()), strategy)] = denoise(cfg, model, cond, sampling, topo, strategy)
    return out


def single(parallel: dict, strategy: str) -> torch.Tensor:
    from avatar.pipeline.topology import Topology

    cfg, model, cond, sampling = setup(parallel, strategy)
    return denoise(cfg, model, cond, sampling, Topology(), strategy)


def check(results, cases):
    for parallel, strategy in cases:
        reference = single(parallel, strategy)
        for rank, result in enumerate(results):
            latents = result[(tuple(parallel.items()), strategy)]
            err = ((latents - reference).abs().max() / reference.abs().max()).item()
            if parallel["ring"] == 1:  # Ulysses, CFG and data plans are bit-exact
                assert torch.equal(latents, reference), f"{parallel} {strategy} rank {rank}: rel err {err:.2e}"
            assert err < 1e-5, f"{parallel} {strategy} rank {rank}: rel err {err:.2e}"


@pytest.mark.timeout(240)
def test_two_ranks_every_plan_equals_one_process():
    cases = [
        ({"data": 1, "cfg": 1, "ring": 1, "ulysses": 2}, "shift"),
        ({"data": 1, "cfg": 1, "ring": 2, "ulysses": 1}, "blend"),
        ({"data": 1, "cfg": 2, "ring": 1, "ulysses": 1}, "blend"),
        ({"data": 2, "cfg": 1, "ring": 1, "ulysses": 1}, "blend"),
        ({"data": 2, "cfg": 1, "ring": 1, "ulysses": 1}, "shift"),
    ]
    check(spawn(2, worker, cases, timeout=230), cases)


@pytest.mark.timeout(300)
def test_four_ranks_usp_cfg_and_data_equal_one_process():
    cases = [
        ({"data": 1, "cfg": 1, "ring": 2, "ulysses": 2}, "blend"),
        ({"data": 1, "cfg": 2, "ring": 1, "ulysses": 2}, "shift"),
        ({"data": 2, "cfg": 2, "ring": 1, "ulysses": 1}, "blend"),
    ]
    check(spawn(4, worker, cases, timeout=290), cases)
