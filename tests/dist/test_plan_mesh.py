"""Every process group of a run comes from the plan's one ``DeviceMesh``: on 4 gloo ranks the mesh's groups are the
plan's row-major ``axis_groups``, and ``ParallelMesh.topologies`` gives the pipeline's job and batch-row topologies
(row groups = the flattened ``video`` sub-mesh, their leaders, the exchanges working in them)."""

from __future__ import annotations

import pytest
import torch

from tests.utils.spawn import spawn


def worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from avatar.config import AttentionConfig, ParallelConfig
    from avatar.plan import MESH_AXES, ParallelPlan

    out = {}
    for name, parallel, gpus_per_node in (
        ("data2_cfg2", ParallelConfig(data="2", cfg="2"), None),
        ("nodes_of_2", ParallelConfig(), 2),
    ):
        plan = ParallelPlan.resolve(parallel, world, 4, gpus_per_node=gpus_per_node)
        mesh = plan.build_mesh("cpu")
        groups = {
            axis.value: dist.get_process_group_ranks(mesh.group(axis)) for axis in MESH_AXES if plan.size(axis) > 1
        }
        job, rows = mesh.topologies(rank, torch.device("cpu"), AttentionConfig())
        result = {"degrees": plan.degrees(), "groups": groups, "job": (job.rank, job.world, job.data_rank)}
        if plan.data > 1:
            result["rows"] = (rows.rank, rows.world, rows.leader, dist.get_process_group_ranks(rows.group))
            result["video"] = mesh.video_mesh().mesh.flatten().tolist()
            # The row group's exchanges: its leader's object reaches only its own ranks; a barrier in each group.
            result["broadcast"] = rows.broadcast_object({"from": rank})
            rows.barrier()
            result["gathered"] = sorted(job.all_gather_data({job.data_rank: torch.tensor([float(rank)])}))
        if plan.cfg > 1:
            result["cfg"] = job.all_gather_cfg(torch.full((1, 2), float(job.cfg_rank))).tolist()
        out[name] = result
    return out


@pytest.mark.timeout(120)
def test_mesh_groups_and_topologies_on_four_ranks():
    from avatar.config import ParallelConfig
    from avatar.plan import ParallelPlan

    results = spawn(4, worker, timeout=110)
    for rank, out in enumerate(results):
        first = out["data2_cfg2"]
        assert first["degrees"] == {"data": 2, "cfg": 2, "ring": 1, "ulysses": 1}
        plan = ParallelPlan.resolve(ParallelConfig(data="2", cfg="2"), 4, 4)
        for axis, ranks in first["groups"].items():
            assert ranks == next(g for g in plan.axis_groups(axis) if rank in g), (rank, axis)
        leader = 2 * (rank // 2)
        assert first["rows"] == (rank - leader, 2, leader, [leader, leader + 1])
        assert first["video"] == [leader, leader + 1]
        assert first["broadcast"] == {"from": leader}
        assert first["gathered"] == [0, 1] and first["job"] == (rank, 4, rank // 2)
        assert first["cfg"] == [[0.0, 0.0], [1.0, 1.0]]

        nodes = out["nodes_of_2"]  # 2 nodes of 2: Ulysses pairs are the nodes, CFG crosses them
        assert nodes["degrees"] == {"data": 1, "cfg": 2, "ring": 1, "ulysses": 2}
        assert nodes["groups"]["ulysses"] == [leader, leader + 1]
        assert nodes["groups"]["cfg"] == [rank % 2, rank % 2 + 2]
        assert "rows" not in nodes
