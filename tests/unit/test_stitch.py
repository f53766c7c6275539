"""Stitching window results: weighted averages, order independence, official fp16 storage."""

from __future__ import annotations

import itertools

import pytest
import torch

from avatar.pipeline import stitch
from avatar.pipeline import windows as win


def _random(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_counter_average_of_overlapping_windows():
    acc = stitch.WindowAccumulator((1, 2, 5, 1, 1))
    a, b = _random((1, 2, 3, 1, 1), 0), _random((1, 2, 3, 1, 1), 1)
    acc.add(0, [0, 1, 2], a)
    acc.add(1, [2, 3, 4], b)
    out = acc.result()
    assert out.dtype == torch.float32
    assert torch.equal(out[:, :, :2], a[:, :, :2]) and torch.equal(out[:, :, 3:], b[:, :, 1:])
    assert torch.equal(out[:, :, 2], (a[:, :, 2] + b[:, :, 0]) / 2)


def test_circular_positions_and_other_time_dim():
    acc = stitch.WindowAccumulator((4, 3), time_dim=0)
    x = torch.arange(12, dtype=torch.float32).view(4, 3)
    acc.add(0, [2, 3, 0, 1], x[[2, 3, 0, 1]])
    assert torch.equal(acc.result(), x)


def test_result_does_not_depend_on_add_order():
    shape = (1, 3, 12, 2, 2)
    positions = [
        [0, 1, 2, 3, 4, 5],
        [3, 4, 5, 6, 7, 8],
        [6, 7, 8, 9, 10, 11],
        [10, 11, 0, 1, 2, 3],
        [1, 4, 7, 10, 2, 5],
    ]
    values = [_random((1, 3, 6, 2, 2), i) * 10 ** (i % 3) for i in range(5)]
    weights = [torch.rand(6, generator=torch.Generator().manual_seed(100 + i)) + 0.1 for i in range(5)]
    for use_weights in (False, True):
        outputs = []
        for order in itertools.permutations(range(5)):
            acc = stitch.WindowAccumulator(shape)
            for i in order:
                acc.add(i, positions[i], values[i], weights[i] if use_weights else None)
            outputs.append(acc.result())
        assert all(torch.equal(outputs[0], o) for o in outputs[1:])
        assert torch.isfinite(outputs[0]).all()


def test_add_order_would_matter_without_the_fixed_order():
    # fp32 addition is not associative: a naive sum in arrival order gives different bits.
    a, b, c = torch.tensor([1e8]), torch.tensor([1.0]), torch.tensor([-1e8])
    assert ((a + b) + c).item() != ((a + c) + b).item()
    results = []
    for order in ([0, 1, 2], [0, 2, 1], [2, 1, 0]):
        acc = stitch.WindowAccumulator((1,), time_dim=0)
        for i in order:
            acc.add(i, [0], [a, b, c][i])
        results.append(acc.result())
    assert all(torch.equal(results[0], r) for r in results)
    assert results[0].item() == ((a + b) + c).item() / 3


def test_blend_plan_reproduces_constant_and_linear_videos():
    num_latents, window = 100, 33
    plan = win.plan_windows(num_latents, window, 8)
    weights = win.window_weights(plan, num_latents)
    video = torch.arange(num_latents, dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, 2, -1, 3, 3).contiguous()
    acc = stitch.WindowAccumulator(video.shape)
    for i, (w, wt) in enumerate(zip(plan, weights)):
        stop = w.clipped_stop(num_latents)
        acc.add(i, list(range(w.start, stop)), video[:, :, w.start : stop], wt)
    torch.testing.assert_close(acc.result(), video, rtol=1e-6, atol=1e-5)


def _official_loop(x_all, groups, stepped):
    """The official accumulation, written as the official pipeline does it (fp16 buffer, bf16 windows)."""
    pred = torch.zeros_like(x_all, dtype=torch.float16)
    counter = torch.zeros((1, x_all.shape[1], x_all.shape[2], 1, 1), dtype=torch.float16)
    for idx, latents in zip(groups, stepped):
        latents = latents.to(torch.bfloat16)
        for k, p in enumerate(idx):
            pred[:, :, p] += latents[:, :, k]
            counter[:, :, p] += 1
    return pred / counter


@pytest.mark.parametrize("step", [0, 1, 4])
def test_official_fidelity_matches_the_official_loop(step):
    infer_length, window = 65, 33
    x_all = torch.zeros(1, 4, infer_length, 2, 2)
    groups = win.shift_windows(step, infer_length, window, 10)
    stepped = [_random((1, 4, window, 2, 2), 10 + i) * 3 for i in range(len(groups))]
    expected = _official_loop(x_all, groups, stepped)
    acc = stitch.WindowAccumulator(x_all.shape, fidelity="official")
    for i in reversed(range(len(groups))):
        acc.add(i, groups[i], stepped[i])
    got = acc.result()
    assert got.dtype == torch.float32
    assert torch.equal(got, expected.float())
    plain_acc = stitch.WindowAccumulator(x_all.shape)
    for i, (idx, latents) in enumerate(zip(groups, stepped)):
        plain_acc.add(i, idx, latents)
    plain = plain_acc.result()
    assert not torch.equal(got, plain)  # the roundings are really applied
    torch.testing.assert_close(got, plain, rtol=1e-2, atol=2e-2)


def test_accumulator_rejects_bad_input():
    acc = stitch.WindowAccumulator((1, 1, 4, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        acc.add(0, [0, 1], torch.zeros(1, 1, 3, 1, 1))
    with pytest.raises(ValueError, match="positions"):
        acc.add(0, [3, 4], torch.zeros(1, 1, 2, 1, 1))
    with pytest.raises(ValueError, match="repeated"):
        acc.add(0, [1, 1], torch.zeros(1, 1, 2, 1, 1))
    with pytest.raises(ValueError, match="weights"):
        acc.add(0, [0, 1], torch.zeros(1, 1, 2, 1, 1), torch.ones(3))
    acc.add(0, [0, 1], torch.zeros(1, 1, 2, 1, 1))
    with pytest.raises(ValueError, match="twice"):
        acc.add(0, [2, 3], torch.zeros(1, 1, 2, 1, 1))
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        acc.result()
    official = stitch.WindowAccumulator((1, 1, 2, 1, 1), fidelity="official")
    with pytest.raises(ValueError, match="counter"):
        official.add(0, [0, 1], torch.zeros(1, 1, 2, 1, 1), torch.ones(2))
    with pytest.raises(ValueError, match="fidelity"):
        stitch.WindowAccumulator((1,), time_dim=0, fidelity="bf16")
    partial = stitch.WindowAccumulator((1, 1, 4, 1, 1))
    partial.add(0, [0, 1], torch.zeros(1, 1, 2, 1, 1))
    with pytest.raises(ValueError, match="covered by no window"):
        partial.result()
