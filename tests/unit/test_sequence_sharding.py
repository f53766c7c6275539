"""Token-level sequence sharding and the mask-free attention segments (pure functions, one process): shards cover
the sequence with less than one padding token per rank, frame runs, the ``padding:`` line of ``launch.plan`` at the
real geometry, the official ``cu_seqlens`` segments and the refiner's positional mask reproduced without a mask."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from avatar.config import ModelConfig, ParallelConfig
from avatar.models.transformer import refiner_attention, refiner_pair_mask, refiner_segments
from avatar.parallel.base import (
    JointLengths,
    LocalSequence,
    frame_runs,
    sequence_padding,
    shard_tokens,
    token_range,
    tokens_per_rank,
    unshard_tokens,
)
from avatar.plan import ParallelPlan, sequence_padding_line
from launch.plan import main

PADDING = re.compile(r"padding: (\d+) tokens \(([\d.]+) %\)")


@pytest.mark.parametrize("image_size", [(704, 704), (704, 768)])
@pytest.mark.parametrize("ranks", [2, 4, 8, 16, 24])
def test_real_geometry_pads_at_most_a_tenth_of_a_percent(image_size, ranks):
    line = sequence_padding_line(ranks, ModelConfig(), image_size, 129)
    tokens, percent = PADDING.match(line).groups()
    height, width = image_size
    num_tokens = 34 * (height // 16) * (width // 16)  # 33 latent frames + the reference frame, 2×2 patches
    assert int(tokens) == sequence_padding(num_tokens, ranks) < ranks
    assert float(percent) <= 0.1, line  # whole-frame shards: 34 frames over 8 ranks padded to 40 (+18 %)


@pytest.mark.parametrize("world", [2, 4, 8, 16, 24])
def test_cli_prints_the_padding_of_its_plan(capsys, world):
    assert main([f"world={world}", "model=hunyuan_avatar"]) == 0
    out = capsys.readouterr().out
    plan = ParallelPlan.resolve(ParallelConfig(), world, 24)
    # the video the memory lines plan for (704 wide, 768 high by default) is the one the padding is of
    assert sequence_padding_line(plan.sequence_size, ModelConfig(), (768, 704)) in out
    assert float(PADDING.search(out).group(2)) <= 0.1


@pytest.mark.parametrize("num_tokens", [1, 5, 27, 34 * 9, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_token_shards_cover_the_sequence_with_padding_only_at_the_end(num_tokens, world):
    x = torch.arange(num_tokens, dtype=torch.float32)[None, :, None] + 1  # no zero token: padding is visible
    per = tokens_per_rank(num_tokens, world)
    shards = [shard_tokens(x, rank, world) for rank in range(world)]
    assert all(s.shape[1] == per for s in shards)
    assert torch.equal(unshard_tokens(shards, num_tokens), x)
    assert sequence_padding(num_tokens, world) == sum(int((s == 0).sum()) for s in shards) < world
    ends = [token_range(rank, world, num_tokens) for rank in range(world)]
    assert ends[0][0] == 0 and ends[-1][1] == num_tokens
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:]))  # contiguous, in rank order


@pytest.mark.parametrize("tokens_per_frame", [1, 3, 9])
def test_frame_runs_cover_a_range_by_whole_frames_and_partial_ends(tokens_per_frame):
    total = 7 * tokens_per_frame
    for start in range(total):
        for stop in range(start + 1, total + 1):
            runs = frame_runs(start, stop, tokens_per_frame)
            assert len(runs) <= 3
            assert runs[0][2] == 0 and runs[-1][3] == stop - start
            for (first, count, begin, end), nxt in zip(runs, [*runs[1:], None]):
                frames = [(start + i) // tokens_per_frame for i in range(begin, end)]
                assert frames == sorted(frames) and frames[0] == first and frames[-1] == first + count - 1
                if count > 1:
                    assert end - begin == count * tokens_per_frame
                if nxt is not None:
                    assert nxt[2] == end


def cu_seqlens_reference(img_q, img_k, img_v, txt_q, txt_k, txt_v, counts):
    """The official varlen semantics spelled out with a block mask: per batch row, [img; valid text] is one
    segment and the padded text tokens are another."""
    q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((img_q, txt_q), (img_k, txt_k), (img_v, txt_v)))
    num_img, num_txt = img_q.shape[1], txt_q.shape[1]
    segment = torch.zeros(len(counts), num_img + num_txt, dtype=torch.long)
    for row, count in enumerate(counts):
        segment[row, num_img + count :] = 1
    mask = segment[:, None, :, None] == segment[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    return out[:, :num_img], out[:, num_img:]


@pytest.mark.parametrize("counts", [(5, 5), (3, 3), (5, 2), (0, 4)])
def test_joint_attention_is_the_official_cu_seqlens_segments_without_a_mask(counts):
    gen = torch.Generator().manual_seed(sum(counts))
    img = [torch.randn(2, 7, 3, 8, generator=gen) for _ in range(3)]
    txt = [torch.randn(2, 5, 3, 8, generator=gen) for _ in range(3)]
    img_out, txt_out = LocalSequence().joint_attention(*img, *txt, JointLengths(num_img=7, num_txt=counts))
    ref_img, ref_txt = cu_seqlens_reference(*img, *txt, counts)
    torch.testing.assert_close(img_out, ref_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(txt_out, ref_txt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "mask",
    [
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]],  # all valid: one plain attention
        [[1, 1, 0, 1, 0, 0], [1, 1, 0, 1, 0, 0]],  # the same holes in both rows: one segment
        [[0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0]],  # position 0 masked (still every query's key); rows differ
        [[0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]],  # nothing valid: every query sees key 0 only
    ],
)
def test_refiner_attention_equals_the_positional_pair_mask(mask):
    mask = torch.tensor(mask)
    gen = torch.Generator().manual_seed(int(mask.sum()))
    q, k, v = (torch.randn(2, 6, 3, 8, generator=gen) for _ in range(3))
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=refiner_pair_mask(mask)
    ).transpose(1, 2)
    torch.testing.assert_close(refiner_attention(q, k, v, refiner_segments(mask)), expected, rtol=1e-5, atol=1e-6)


def test_fake_tensor_forward_needs_no_host_values():
    """The memory model's forward on fake tensors (no values to read): the text layout falls back to every token
    valid, so the measurement still runs."""
    from avatar.compose import compose
    from avatar.memory.measure import dit_activation_bytes

    assert dit_activation_bytes(compose(["model=tiny"]).model, 3, 16, 8) > 0
