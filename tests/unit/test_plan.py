"""ParallelPlan: the auto rule for worlds 1..8, validation messages, the CLI, and the world-of-one mesh."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from avatar.config import ParallelConfig
from avatar.io.errors import InputError
from launch.plan import MeshAxis, ParallelPlan, main, model_num_heads

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


def test_token_cap_moves_surplus_ranks_to_data():
    plan = ParallelPlan.resolve(ParallelConfig(), 64, 24, num_tokens=34)
    assert degrees(plan) == (1, 2, 4, 8)
    plan = ParallelPlan.resolve(ParallelConfig(), 16, 4, num_tokens=2)
    assert degrees(plan) == (4, 2, 1, 2)


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
