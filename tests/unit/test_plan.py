"""ParallelPlan: the auto rule for worlds 1..8, the node-aware rule (Ulysses inside a node, CFG and data across
nodes), the 10 % padding bound, validation messages, the CLI, and the world-of-one mesh."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from avatar.config import ParallelConfig
from avatar.io.errors import InputError
from avatar.plan import MESH_AXES, MeshAxis, ParallelPlan, model_num_heads, sequence_padding
from launch.plan import main

# world -> (data, cfg, ring, ulysses) under the all-auto rule.
AUTO_24_HEADS = {
    1: (1, 1, 1, 1),
    2: (1, 2, 1, 1),
    3: (1, 1, 1, 3),
    4: (1, 2, 1, 2),
    5: (1, 1, 5, 1),
    6: (1, 2, 1, 3),
    7: (1, 1, 7, 1),
    8: (1, 2, 1, 4),
}
AUTO_4_HEADS = {
    1: (1, 1, 1, 1),
    2: (1, 2, 1, 1),
    3: (1, 1, 3, 1),
    4: (1, 2, 1, 2),
    5: (1, 1, 5, 1),
    6: (1, 2, 3, 1),
    7: (1, 1, 7, 1),
    8: (1, 2, 1, 4),
}


def degrees(plan: ParallelPlan) -> tuple[int, int, int, int]:
    return plan.data, plan.cfg, plan.ring, plan.ulysses


@pytest.mark.parametrize(("num_heads", "table"), [(24, AUTO_24_HEADS), (4, AUTO_4_HEADS)])
def test_auto_rule_worlds_1_to_8(num_heads, table):
    for world, expected in table.items():
        plan = ParallelPlan.resolve(ParallelConfig(), world, num_heads)
        assert degrees(plan) == expected, f"world {world}, {num_heads} heads"
        assert len(plan.reasons) == 4


def test_explicit_data_gives_sequence_parallelism_the_rest():
    plan = ParallelPlan.resolve(ParallelConfig(data="2"), 8, 24)
    assert degrees(plan) == (2, 2, 1, 2)
    plan = ParallelPlan.resolve(ParallelConfig(data="1", cfg="1"), 8, 24)
    assert degrees(plan) == (1, 1, 1, 8)
    plan = ParallelPlan.resolve(ParallelConfig(data="1", cfg="1", ulysses="2"), 8, 24)
    assert degrees(plan) == (1, 1, 4, 2)


def test_data_preset_puts_every_rank_on_its_own_windows():
    plan = ParallelPlan.resolve(ParallelConfig(data="auto", cfg="1", ulysses="1", ring="1"), 6, 24)
    assert degrees(plan) == (6, 1, 1, 1)


def test_padding_bound_moves_surplus_ranks_to_data():
    # The rule used to cap ulysses·ring at the token count: 34 tokens got 32 sequence ranks (2 slots each, 64 slots:
    # 88 % padding). Now no automatic degree pads by more than 10 %: 4 ranks hold 9 slots each (36, 5.9 %), and 8
    # (40 slots, 17.6 %) is refused, so the surplus becomes data parallelism.
    assert sequence_padding(34, 32) == 30 and sequence_padding(34, 4) == 2 and sequence_padding(34, 8) == 6
    plan = ParallelPlan.resolve(ParallelConfig(), 64, 24, num_tokens=34)
    assert degrees(plan) == (8, 2, 1, 4)
    assert "pads the 34 tokens by ≤ 10%" in plan.reasons[1]
    plan = ParallelPlan.resolve(ParallelConfig(), 16, 4, num_tokens=2)
    assert degrees(plan) == (4, 2, 1, 2)
    # 704×768, 129 frames: 34 frames of 2112 tokens; every degree up to 48 pads by a few tokens at most.
    assert degrees(ParallelPlan.resolve(ParallelConfig(), 48, 24, num_tokens=34 * 2112)) == (1, 2, 1, 24)


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 7, 9, 34, 100, 1000])
def test_no_automatic_plan_pads_by_more_than_ten_percent(num_tokens):
    for world in range(1, 65):
        for gpus_per_node in (None, 4, 8):
            if gpus_per_node is not None and world % gpus_per_node:
                continue
            plan = ParallelPlan.resolve(ParallelConfig(), world, 24, num_tokens, gpus_per_node=gpus_per_node)
            assert sequence_padding(num_tokens, plan.sequence_size) <= 0.1 * num_tokens, (world, plan.describe())


def test_world_48_on_8_gpu_nodes_keeps_ulysses_inside_a_node():
    plan = ParallelPlan.resolve(ParallelConfig(), 48, 24, gpus_per_node=8)
    assert degrees(plan) == (3, 2, 1, 8)
    assert plan.warnings == ()
    assert "8 GPUs of a node" in plan.reasons[1]
    for group in plan.axis_groups(MeshAxis.ULYSSES):
        assert group == list(range(group[0], group[0] + 8)) and group[0] % 8 == 0  # consecutive local ranks
    assert (plan.placement("ulysses"), plan.placement("cfg"), plan.placement("data")) == (
        "inside a node",
        "across nodes",
        "across nodes",
    )
    # Without node information the old single-node rule stands (one Ulysses group over three nodes' worth).
    assert degrees(ParallelPlan.resolve(ParallelConfig(), 48, 24)) == (1, 2, 1, 24)
    # data given: sequence parallelism takes the rest, Ulysses in the node and Ring across nodes.
    plan = ParallelPlan.resolve(ParallelConfig(data="1"), 48, 24, gpus_per_node=8)
    assert degrees(plan) == (1, 2, 3, 8) and plan.placement("ring") == "across nodes"


@pytest.mark.parametrize("num_heads", [24, 4])
@pytest.mark.parametrize("gpus_per_node", [2, 4, 8])
def test_automatic_sequence_groups_never_span_nodes(num_heads, gpus_per_node):
    for world in range(gpus_per_node, 129, gpus_per_node):
        plan = ParallelPlan.resolve(ParallelConfig(), world, num_heads, gpus_per_node=gpus_per_node)
        for axis in (MeshAxis.ULYSSES, MeshAxis.RING):
            assert plan.placement(axis) in ("-", "inside a node"), (world, plan.describe())
        assert plan.warnings == ()
    # One node (gpus_per_node ≥ world) is the single-node rule.
    for world, expected in AUTO_24_HEADS.items():
        assert degrees(ParallelPlan.resolve(ParallelConfig(), world, 24, gpus_per_node=8)) == expected


def test_axis_groups_are_the_row_major_mesh_layout():
    plan = ParallelPlan(data=2, cfg=2, ring=1, ulysses=2, world_size=8)
    assert plan.axis_groups("ulysses") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan.axis_groups("cfg") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert plan.axis_groups("data") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert plan.axis_groups("ring") == [[r] for r in range(8)]
    for axis in MESH_AXES:  # every rank in exactly one group per axis
        assert sorted(r for g in plan.axis_groups(axis) for r in g) == list(range(8))


def test_explicit_ulysses_across_nodes_is_allowed_with_a_warning(capsys):
    plan = ParallelPlan.resolve(ParallelConfig(ulysses="24"), 48, 24, gpus_per_node=8)
    assert degrees(plan) == (1, 2, 1, 24)
    assert plan.placement("ulysses") == "across nodes"
    (warning,) = plan.warnings
    assert "parallel.ulysses=24" in warning and "nodes of 8 GPUs" in warning and "parallel.ulysses=8" in warning
    # Inside a node (explicit or on one node) there is nothing to warn about.
    assert ParallelPlan.resolve(ParallelConfig(ulysses="4"), 48, 24, gpus_per_node=8).warnings == ()
    assert ParallelPlan.resolve(ParallelConfig(ulysses="6"), 6, 24, gpus_per_node=8).warnings == ()
    assert main(["world=48", "gpus_per_node=8", "model=hunyuan_avatar", "parallel.ulysses=24"]) == 0
    assert "warning: parallel.ulysses=24 puts Ulysses groups across nodes" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("gpus_per_node", "needle"),
    [(5, "gpus_per_node=5 does not divide the world size 8"), (0, "gpus_per_node=0 is invalid")],
)
def test_gpus_per_node_must_divide_the_world(gpus_per_node, needle):
    with pytest.raises(InputError, match=needle):
        ParallelPlan.resolve(ParallelConfig(), 8, 24, gpus_per_node=gpus_per_node)
    with pytest.raises(InputError, match="num_tokens=0"):
        ParallelPlan.resolve(ParallelConfig(), 8, 24, num_tokens=0)


@pytest.mark.parametrize(
    ("parallel", "world", "heads", "needle"),
    [
        (ParallelConfig(ulysses="3"), 6, 4, "not divisible by ulysses=3"),
        (ParallelConfig(data="1", cfg="1", ring="1", ulysses="2"), 4, 24, "multiply to 2"),
        (ParallelConfig(cfg="3"), 6, 24, "cfg must be 1 or 2"),
        (ParallelConfig(ring="0"), 4, 24, "≥ 1"),
        (ParallelConfig(ring="3"), 4, 24, "do not divide|does not divide"),
        (ParallelConfig(data="1", cfg="2", ring="1"), 8, 3, "multiply to 2, leaving 4×"),
    ],
)
def test_invalid_plans_name_every_degree_world_and_heads(parallel, world, heads, needle):
    with pytest.raises(InputError) as info:
        ParallelPlan.resolve(parallel, world, heads)
    message = str(info.value)
    for name in ("data=", "cfg=", "ring=", "ulysses="):
        assert name in message
    assert f"world size {world}" in message and f"{heads} heads" in message
    assert any(part in message for part in needle.split("|")), message


def test_direct_construction_is_validated():
    with pytest.raises(ValueError, match="world size 8"):
        ParallelPlan(data=1, cfg=2, ring=1, ulysses=2, world_size=8)
    with pytest.raises(ValueError, match="not divisible"):
        ParallelPlan(ulysses=3, world_size=3, num_heads=4)


def test_bad_degree_string_is_an_input_error():
    with pytest.raises(InputError, match="parallel.ring='two'"):
        ParallelPlan.resolve(ParallelConfig(ring="two"), 2, 4)


def test_world_of_one_mesh_needs_no_process_group():
    mesh = ParallelPlan.resolve(ParallelConfig(), 1, 24).build_mesh("cpu")
    for axis in MeshAxis:
        assert (mesh.group(axis), mesh.rank(axis), mesh.size(axis)) == (None, 0, 1)
    seq = mesh.sequence()
    assert type(seq).__name__ == "LocalSequence"
    job, rows = mesh.topologies(0, torch.device("cpu"))
    assert rows is job and (job.world, job.data_size, job.cfg_size, job.group, job.mesh) == (1, 1, 1, None, None)
    assert mesh.video_mesh() is None


def test_model_heads_from_configs():
    assert model_num_heads("hunyuan_avatar") == 24
    assert model_num_heads("tiny") == 4
    with pytest.raises(InputError, match="no such|no .*nope.yaml"):
        model_num_heads("nope")


def test_cli_prints_plan_and_reasons(capsys):
    assert main(["world=8", "model=hunyuan_avatar"]) == 0
    out = capsys.readouterr().out
    assert "world 8 = data 1 × cfg 2 × ring 1 × ulysses 4" in out
    assert "ulysses=4: auto, the largest divisor of 24 heads" in out
    assert main(["world=8", "model=tiny", "parallel.ulysses=2", "parallel.data=1"]) == 0
    assert "cfg 2 × ring 2 × ulysses 2" in capsys.readouterr().out
    assert main(["world=8", "model=tiny", "parallel.ulysses=3"]) == 2
    assert "ulysses=3" in capsys.readouterr().err


def test_cli_world_48_on_8_gpu_nodes_says_where_each_axis_lies(capsys):
    assert main(["world=48", "gpus_per_node=8", "model=hunyuan_avatar"]) == 0
    out = capsys.readouterr().out
    assert "world 48 = data 3 × cfg 2 × ring 1 × ulysses 8" in out
    assert "nodes 6 × 8 ranks" in out
    assert "ulysses groups of 8: inside a node" in out and "cfg groups of 2: across nodes" in out
    assert "its all-to-alls stay on the node's links" in out and "warning" not in out
    assert main(["world=48", "gpus_per_node=7"]) == 2
    assert "gpus_per_node=7 does not divide the world size 48" in capsys.readouterr().err


def test_cli_as_module():
    result = subprocess.run(
        [sys.executable, "-m", "launch.plan", "world=6", "model=tiny", "parallel=sp"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "world 6 = data 1 × cfg 2 × ring 3 × ulysses 1" in result.stdout


def test_single_process_gets_no_process_group(monkeypatch):
    from launch import dist as launch_dist

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    env = launch_dist.init_distributed("cpu")
    assert (env.rank, env.world_size, env.local_rank, env.device.type) == (0, 1, 0, "cpu")
    assert not torch.distributed.is_initialized()
    launch_dist.destroy()  # safe without a group
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_dist.peek_rank() == 3
    with pytest.raises(ValueError, match="RANK=3 WORLD_SIZE=2"):
        launch_dist.init_distributed("cpu")
