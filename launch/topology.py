"""From the launcher's world to the pipeline's ``Topology``: resolve the one ``ParallelPlan``, build its mesh and
hand the groups to the library. Nothing below ``launch/`` builds a plan or reads the environment."""

from __future__ import annotations

import logging
from dataclasses import replace

from avatar.config import RunConfig
from avatar.pipeline.topology import Topology
from launch.dist import DistEnv
from launch.plan import MeshAxis, ParallelPlan

log = logging.getLogger(__name__)


def resolve_plan(cfg: RunConfig, world_size: int) -> ParallelPlan:
    """The plan for ``world_size`` ranks (raises InputError naming the degrees, world and heads)."""
    return ParallelPlan.resolve(cfg.parallel, world_size, cfg.model.num_heads)


def build_topology(cfg: RunConfig, env: DistEnv) -> tuple[Topology, Topology]:
    """``(job, rows)``: the topology for one video rendered by the whole world (windows spread over the data groups)
    and the one for batch rows (each data group renders its own rows; ``rank``/``world`` within the group)."""
    plan = resolve_plan(cfg, env.world_size)
    mesh = plan.build_mesh(env.device.type)
    seq = mesh.sequence(backend=cfg.attention.backend, kernel=cfg.attention.kernel)
    if env.is_main:
        log.info("parallel plan: %s (%s)", plan.describe(), "; ".join(plan.reasons))
    job = Topology(
        rank=env.rank,
        world=env.world_size,
        data_rank=mesh.rank(MeshAxis.DATA),
        data_size=plan.data,
        data_group=mesh.group(MeshAxis.DATA),
        cfg_rank=mesh.rank(MeshAxis.CFG),
        cfg_size=plan.cfg,
        cfg_group=mesh.group(MeshAxis.CFG),
        seq=seq,
        device=env.device,
        mesh=mesh.mesh,
    )
    if plan.data == 1:
        return job, job
    # The mesh is row-major over (data, cfg, ring, ulysses): data group d holds the contiguous ranks d*inner ...
    import torch.distributed as dist

    inner = env.world_size // plan.data
    groups = [dist.new_group(list(range(d * inner, (d + 1) * inner))) for d in range(plan.data)]
    d = job.data_rank
    rows = replace(
        job,
        rank=env.rank - d * inner,
        world=inner,
        data_rank=0,
        data_size=1,
        data_group=None,
        group=groups[d],
        leader=d * inner,
    )
    return job, rows
