"""Sequence parallelism on gloo (fp32): Ulysses, Ring and both equal one process's LocalSequence, for token counts
that do not divide the world (the last rank padded, a rank holding only padding too), with padded text (valid counts
differing per batch row); shard/gather round trips; collectives counted.

Each spawn costs a few seconds, so one spawned function checks several plans on the same ranks.
"""

from __future__ import annotations

import pytest
import torch

from avatar.config import ModelConfig
from avatar.models.transformer import AvatarDiT
from avatar.parallel.base import JointLengths, LocalSequence, frame_slice, sequence_padding, token_range
from avatar.parallel.comm import (
    broadcast_object,
    cfg_exchange,
    counting,
    data_all_gather_windows,
)
from avatar.plan import MeshAxis, ParallelPlan
from tests.utils.spawn import spawn

pytestmark = pytest.mark.slow

BATCH, HEADS, HEAD_DIM, TOKENS_PER_FRAME, NUM_TXT = 2, 4, 8, 3, 5
TXT_COUNTS = (5, 2)  # valid text tokens per batch row (the official cu_seqlens count): one text group per row


def make_inputs(num_frames: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(num_frames)
    num_img = num_frames * TOKENS_PER_FRAME

    def draw(length: int) -> torch.Tensor:
        return torch.randn(BATCH, length, HEADS, HEAD_DIM, generator=gen)

    return {
        "img_q": draw(num_img),
        "img_k": draw(num_img),
        "img_v": draw(num_img),
        "txt_q": draw(NUM_TXT),
        "txt_k": draw(NUM_TXT),
        "txt_v": draw(NUM_TXT),
    }


def lengths(num_frames: int) -> JointLengths:
    return JointLengths(num_img=num_frames * TOKENS_PER_FRAME, num_txt=TXT_COUNTS)


def reference(num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = make_inputs(num_frames)
    return LocalSequence().joint_attention(
        x["img_q"], x["img_k"], x["img_v"], x["txt_q"], x["txt_k"], x["txt_v"], lengths(num_frames)
    )


def run_plan(seq, num_frames: int) -> dict:
    """One joint_attention on this rank's shard; returns the gathered outputs and the collectives it issued."""
    x = make_inputs(num_frames)
    shard = {name: seq.shard_tokens(x[name]) for name in ("img_q", "img_k", "img_v")}
    with counting() as stats:
        img_out, txt_out = seq.joint_attention(
            shard["img_q"],
            shard["img_k"],
            shard["img_v"],
            x["txt_q"],
            x["txt_k"],
            x["txt_v"],
            lengths(num_frames),
        )
    calls = dict(stats.calls)
    return {"img": seq.gather_tokens(img_out, num_frames * TOKENS_PER_FRAME), "txt": txt_out, "calls": calls}


def check_round_trip(seq, num_frames: int) -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, num_frames * TOKENS_PER_FRAME, 6, generator=gen)
    table = torch.randn(num_frames * TOKENS_PER_FRAME, 6, generator=gen)  # RoPE tables are sharded along dim 0
    num_tokens = num_frames * TOKENS_PER_FRAME
    local = seq.shard_tokens(x)
    per = seq.tokens_per_rank(num_tokens)
    assert local.shape[1] == per
    assert torch.equal(seq.gather_tokens(local, num_tokens), x)
    shard = seq.shard_tokens(table, dim=0)
    assert torch.equal(seq.gather_tokens(shard, num_tokens, dim=0), table)
    # Token-level: a contiguous slice of the flat sequence, zero padding after it (less than one token per rank).
    start, stop = seq.token_range(num_tokens)
    assert (start, stop) == token_range(seq.rank, seq.world, num_tokens)
    assert torch.equal(local[:, : stop - start], x[:, start:stop])
    assert not local[:, stop - start :].any()
    assert sequence_padding(num_tokens, seq.world) < seq.world
    # The deep cache's frame-sliced layout round-trips through this rank's token shard.
    slices = seq.to_frame_slices(local, num_frames, TOKENS_PER_FRAME)
    assert slices.shape[1:3] == (num_frames, frame_slice(TOKENS_PER_FRAME, seq.world))
    assert torch.equal(seq.from_frame_slices(slices, TOKENS_PER_FRAME), local)


def tiny_dit() -> tuple[AvatarDiT, dict[str, torch.Tensor]]:
    """The real DiT at a CPU size (4 heads) and inputs for 2 latent frames (3 sequence frames with the reference) of
    3×3 tokens, so 2 and 4 sequence ranks pad every frame."""
    cfg = ModelConfig(
        name="tiny",
        hidden_size=32,
        num_heads=HEADS,
        depth_double=2,
        depth_single=2,
        refiner_depth=1,
        latent_channels=4,
        rope_axes=[2, 2, 4],
        text_states_dim=16,
        text_states_dim_2=8,
        audio_window=4,
        audio_layers=2,
        audio_channels=8,
        audio_proj_dim=16,
        audio_tokens=2,
        adapter_dim=16,
        adapter_after_double=[1],
    )
    torch.manual_seed(0)
    model = AvatarDiT(cfg).eval()
    gen = torch.Generator().manual_seed(3)
    num_frames, side, text_len = 2, 6, 6
    text_mask = torch.zeros(1, text_len, dtype=torch.long)
    text_mask[:, :4] = 1
    inputs = {
        "x": torch.randn(1, 4, num_frames, side, side, generator=gen),
        "t": torch.full((1,), 700.0),
        "ref_latents": torch.randn(1, 4, 1, side, side, generator=gen).repeat(1, 1, num_frames, 1, 1),
        "text_states": torch.randn(1, text_len, cfg.text_states_dim, generator=gen),
        "text_mask": text_mask,
        "text_states_2": torch.randn(1, cfg.text_states_dim_2, generator=gen),
        "audio_feats": torch.randn(1, 4 * num_frames - 3, 4, 2, 8, generator=gen),
        "face_mask": torch.ones(1, 1, 1, side, side),
    }
    return model, inputs


@torch.no_grad()
def dit_forward(model: AvatarDiT, inputs: dict, seq) -> dict[str, torch.Tensor]:
    """Full forward (storing the cache) and a cached-step forward under ``seq``; the cache holds this rank's slice of
    every frame (gathered here only to compare it)."""
    model.set_sequence_parallel(seq)
    velocity, cached = model(**inputs, cache="store")
    reused = model(**inputs, cache="reuse", cached=cached)
    num_seq_frames, tokens_per_frame = cached.img.shape[1], 9
    assert cached.img.shape[2] == frame_slice(tokens_per_frame, seq.world)
    full = seq.gather_tokens(seq.from_frame_slices(cached.img, tokens_per_frame), num_seq_frames * tokens_per_frame)
    return {"velocity": velocity, "cached_img": full, "cached_txt": cached.txt, "reused": reused}


def check_exchanges(rank: int) -> dict:
    """The pipeline helpers over the whole world."""
    payload = {"prompt": "hello", "latents": torch.arange(6.0).reshape(2, 3)} if rank == 0 else None
    with counting() as stats:
        received = broadcast_object(payload, src=0)
    windows = data_all_gather_windows({rank: torch.full((1, rank + 1), float(rank))}, torch.distributed.group.WORLD)
    return {
        "object": received,
        "windows": windows,
        "broadcasts": stats.calls["broadcast"],
    }


def sequence_parallel_worker(
    rank: int, world_size: int, layouts: list[tuple[int, int, int]], num_frames: int, dit=None, extra_frames=None
):
    """For each (cfg, ring, ulysses) layout: build the mesh, check round trips, run one joint attention (and the
    DiT when ``dit`` = (model, inputs) is given; and one more joint attention over ``extra_frames``)."""
    results = {"exchanges": check_exchanges(rank)}
    for cfg, ring, ulysses in layouts:
        plan = ParallelPlan(cfg=cfg, ring=ring, ulysses=ulysses, world_size=world_size, num_heads=HEADS)
        mesh = plan.build_mesh("cpu")
        seq = mesh.sequence()
        assert seq.world == ring * ulysses
        if seq.world > 1:
            assert (seq.ring_size, seq.ulysses_size) == (ring, ulysses)
        check_round_trip(seq, num_frames)
        result = run_plan(seq, num_frames)
        if extra_frames is not None:
            check_round_trip(seq, extra_frames)
            result["extra"] = run_plan(seq, extra_frames)
        if dit is not None:
            result["dit"] = dit_forward(*dit, seq)
        if cfg == 2:
            branch = torch.full((1, 3), float(mesh.rank(MeshAxis.CFG)))
            result["cfg"] = cfg_exchange(branch, mesh.group(MeshAxis.CFG))
        results[(cfg, ring, ulysses)] = result
    return results


def assert_matches_reference(results: list[dict], layouts, num_frames: int, dit=None, extra_frames=None) -> None:
    ref_img, ref_txt = reference(num_frames)
    extra_ref = None if extra_frames is None else reference(extra_frames)
    dit_ref = None if dit is None else dit_forward(*dit, LocalSequence())
    for rank, result in enumerate(results):
        exchanges = result["exchanges"]
        assert exchanges["object"]["prompt"] == "hello"
        assert torch.equal(exchanges["object"]["latents"], torch.arange(6.0).reshape(2, 3))
        assert sorted(exchanges["windows"]) == list(range(len(results)))
        assert exchanges["windows"][len(results) - 1].shape == (1, len(results)), f"rank {rank}"
        assert exchanges["broadcasts"] == 2  # size, then payload
    for layout in layouts:
        per_rank = [result[layout] for result in results]
        for rank, result in enumerate(per_rank):
            img_err = (result["img"] - ref_img).abs().max() / ref_img.abs().max()
            txt_err = (result["txt"] - ref_txt).abs().max() / ref_txt.abs().max()
            assert img_err < 1e-5, f"layout (cfg, ring, ulysses)={layout} rank {rank}: image rel err {img_err:.2e}"
            assert txt_err < 1e-5, f"layout {layout} rank {rank}: text rel err {txt_err:.2e}"
            # The text stream is replicated: every rank must hold bit-identical text outputs.
            assert torch.equal(result["txt"], per_rank[0]["txt"]), f"layout {layout}: text differs on rank {rank}"
            if "extra" in result:
                for got, want in zip((result["extra"]["img"], result["extra"]["txt"]), extra_ref):
                    err = (got - want).abs().max() / want.abs().max()
                    assert err < 1e-5, f"layout {layout} rank {rank}: {extra_frames} frames rel err {err:.2e}"
            if "dit" in result:
                for name, value in result["dit"].items():
                    err = (value - dit_ref[name]).abs().max() / dit_ref[name].abs().max()
                    assert err < 1e-5, f"layout {layout} rank {rank}: DiT {name} rel err {err:.2e}"
            if "cfg" in result:
                assert result["cfg"][:, 0].tolist() == [0.0, 1.0]


def expected_calls(ring: int, ulysses: int) -> dict[str, int]:
    """Per text group (here one per batch row, ``TXT_COUNTS``): Ulysses 2 all_to_all + 1 all_gather (text heads);
    Ring R−1 send/recv pairs + 1 all_gather (text partials)."""
    groups = len(set(TXT_COUNTS))
    calls: dict[str, int] = {}
    if ulysses > 1:
        calls["all_to_all"] = 2 * groups
        calls["all_gather"] = groups
    if ring > 1:
        calls["p2p"] = (ring - 1) * groups
        calls["all_gather"] = calls.get("all_gather", 0) + groups
    return calls


@pytest.mark.timeout(120)
def test_two_ranks_ulysses_and_ring_with_padding():
    layouts = [(1, 1, 2), (1, 2, 1), (2, 1, 1)]
    num_frames = 5  # 15 tokens over 2 ranks: rank 1 holds one padding token
    dit = tiny_dit()  # 27 tokens over 2 ranks: padding inside the real model too, frame 1 split across ranks
    results = spawn(2, sequence_parallel_worker, layouts, num_frames, dit, timeout=110)
    assert_matches_reference(results, layouts, num_frames, dit)
    for ring, ulysses in ((1, 2), (2, 1)):
        assert results[0][(1, ring, ulysses)]["calls"] == expected_calls(ring, ulysses)
    assert results[0][(2, 1, 1)]["calls"] == {}


@pytest.mark.timeout(150)
def test_four_ranks_usp_ulysses_ring_and_cfg():
    layouts = [(1, 2, 2), (1, 1, 4), (1, 4, 1), (2, 1, 2)]
    num_frames = 5  # 15 tokens over 4 ranks: 4, 4, 4 and 3 + 1 padding
    extra_frames = 2  # 6 tokens over 4 ranks: 2, 2, 2 and rank 3 only padding (an empty Ring block)
    dit = tiny_dit()
    results = spawn(4, sequence_parallel_worker, layouts, num_frames, dit, extra_frames, timeout=140)
    assert_matches_reference(results, layouts, num_frames, dit, extra_frames)
    for layout in layouts:
        assert results[0][layout]["calls"] == expected_calls(*layout[1:])


@pytest.mark.timeout(120)
def test_three_ranks_ring():
    layouts = [(1, 3, 1)]
    num_frames = 4
    results = spawn(3, sequence_parallel_worker, layouts, num_frames, timeout=110)
    assert_matches_reference(results, layouts, num_frames)
    assert results[2][(1, 3, 1)]["calls"] == expected_calls(3, 1)
