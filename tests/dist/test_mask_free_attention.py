"""No attention kernel gets a mask on the default path: every SDPA call of the tiny DiT (text refiner, double and
single blocks, the padded-text segment, a cached step) is recorded at the ``torch.nn.functional`` level (a
``TorchFunctionMode``) and at the ATen level (a ``TorchDispatchMode``: the kernels SDPA lowers to and the ones Ring
calls directly), with padded text and a refiner mask with holes, for the default 1-, 2- and 4-rank plans and a USP
layout (Ring with a padded last block). One spawn of 4 ranks (the 2-rank default plan runs as its two data-parallel
replicas: data 2 × the 2-rank degrees); one process runs the whole denoise loop (CFG, deep cache) under the recorder.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.utils.spawn import spawn

pytestmark = pytest.mark.slow

MASK_ARGS = ("attn_mask", "attn_bias")


class FunctionRecorder(TorchFunctionMode):
    """Every ``F.scaled_dot_product_attention`` call: True where it got a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.masked: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.masked.append(mask is not None)
        return func(*args, **kwargs)


class KernelRecorder(TorchDispatchMode):
    """Every ATen scaled-dot-product op (``_scaled_dot_product_*``): True where its mask/bias argument is set."""

    def __init__(self) -> None:
        super().__init__()
        self.masked: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if "scaled_dot_product" in name:
            masked = False
            for index, arg in enumerate(func._schema.arguments):
                value = kwargs.get(arg.name) if (arg.kwarg_only or index >= len(args)) else args[index]
                masked |= arg.name in MASK_ARGS and value is not None
            self.masked.append((name, masked))
        return func(*args, **kwargs)


def recorded(fn):
    """``(fn(), F-level mask flags, ATen-level (op, mask) flags)``."""
    with FunctionRecorder() as functions, KernelRecorder() as kernels:
        out = fn()
    return out, functions.masked, kernels.masked


def holed_inputs(inputs: dict) -> dict:
    """The tiny DiT's inputs with a text mask that has a hole (refiner) and padding (3 valid tokens of 6)."""
    return {**inputs, "text_mask": torch.tensor([[1, 1, 0, 1, 0, 0]])}


def forward_worker(rank: int, world: int, layouts: list) -> dict:
    from avatar.config import ParallelConfig
    from avatar.plan import ParallelPlan
    from tests.dist.test_sequence_parallel import HEADS, tiny_dit

    model, inputs = tiny_dit()
    inputs = holed_inputs(inputs)
    out = {}
    for layout in layouts:
        if layout == "default":
            plan = ParallelPlan.resolve(ParallelConfig(), world, HEADS)
        elif layout == "default of 2 ranks":
            two = ParallelPlan.resolve(ParallelConfig(), 2, HEADS).degrees()
            plan = ParallelPlan(**{**two, "data": world // 2}, world_size=world, num_heads=HEADS)
        else:
            cfg, ring, ulysses = layout
            plan = ParallelPlan(cfg=cfg, ring=ring, ulysses=ulysses, world_size=world, num_heads=HEADS)
        model.set_sequence_parallel(plan.build_mesh("cpu").sequence())

        @torch.no_grad()
        def run():
            velocity, cached = model(**inputs, cache="store")
            return velocity, model(**inputs, cache="reuse", cached=cached)

        outputs, functions, kernels = recorded(run)
        out[layout] = {"plan": plan.degrees(), "outputs": outputs, "functions": functions, "kernels": kernels}
    return out


def assert_mask_free(functions: list[bool], kernels: list[tuple[str, bool]], where: str) -> None:
    assert kernels, f"{where}: no SDPA kernel recorded (the recorder saw nothing)"
    assert not any(functions), f"{where}: {sum(functions)} of {len(functions)} F.sdpa calls got attn_mask"
    masked = [name for name, flag in kernels if flag]
    assert not masked, f"{where}: kernels called with a mask: {sorted(set(masked))}"


@pytest.mark.timeout(150)
def test_default_plans_of_two_and_four_ranks_and_usp_call_sdpa_without_a_mask():
    from avatar.parallel.base import LocalSequence
    from tests.dist.test_sequence_parallel import tiny_dit

    model, inputs = tiny_dit()
    with torch.no_grad():
        velocity, cached = model(**holed_inputs(inputs), cache="store")
        reference = (velocity, model(**holed_inputs(inputs), cache="reuse", cached=cached))
    model.set_sequence_parallel(LocalSequence())
    world, layouts = 4, ["default", "default of 2 ranks", (1, 2, 2)]
    results = spawn(world, forward_worker, layouts, timeout=140)
    assert results[0]["default"]["plan"] == {"data": 1, "cfg": 2, "ring": 1, "ulysses": 2}
    assert results[0]["default of 2 ranks"]["plan"] == {"data": 2, "cfg": 2, "ring": 1, "ulysses": 1}
    for rank, result in enumerate(results):
        for layout, got in result.items():
            where = f"world {world} {layout} {got['plan']} rank {rank}"
            assert_mask_free(got["functions"], got["kernels"], where)
            for value, want in zip(got["outputs"], reference):
                err = (value - want).abs().max() / want.abs().max()
                assert err < 1e-5, f"{where}: rel err {err:.2e}"


@pytest.mark.timeout(120)
def test_one_process_denoise_loop_calls_sdpa_without_a_mask():
    from dataclasses import replace

    from avatar.pipeline.topology import Topology
    from tests.dist.test_denoise_parallel import denoise, setup

    cfg, model, cond, sampling = setup({"data": 1, "cfg": 1, "ring": 1, "ulysses": 1}, "shift")
    cond = replace(cond, text_mask=torch.tensor([[1, 1, 0, 1, 1, 1, 1] + [0] * (cfg.model.text_len - 7)]))
    sampling = replace(sampling, steps=12)  # full steps, then cached ones (the deep cache is read)
    latents, functions, kernels = recorded(lambda: denoise(cfg, model, cond, sampling, Topology(), "shift"))
    assert torch.isfinite(latents).all()
    assert_mask_free(functions, kernels, "one process, shift strategy, deep cache")
    assert len(functions) >= 12 * 2  # every step and branch went through F.sdpa
