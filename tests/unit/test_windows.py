"""Window planning: the official shifted circular windows (dossier §6) and our overlapping plans."""

from __future__ import annotations

import pytest
import torch

from avatar.io.errors import InputError
from avatar.pipeline import windows as win


def test_latents_and_frames():
    assert [win.latents_for_frames(n) for n in (1, 2, 5, 6, 9, 129, 130, 133, 134)] == [1, 2, 2, 3, 3, 33, 34, 34, 35]
    assert [win.frames_for_latents(n) for n in (1, 2, 33, 102)] == [1, 5, 129, 405]
    for n in range(1, 600):
        decoded = win.frames_for_latents(win.latents_for_frames(n))
        assert n <= decoded < n + 4
    assert win.latents_for_frames(17, temporal_ratio=8) == 3
    with pytest.raises(InputError):
        win.latents_for_frames(0)
    with pytest.raises(ValueError):
        win.frames_for_latents(0)


# --- the official scheme -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "audio_frames, padded, infer_length, kept, decoded, windows",
    [
        (1, 129, 33, 33, 129, 1),
        (100, 129, 33, 33, 129, 1),
        (129, 129, 33, 33, 129, 1),
        (200, 205, 65, 52, 205, 2),
        (300, 305, 97, 77, 305, 3),
        (400, 405, 129, 102, 405, 4),
    ],
)
def test_official_table(audio_frames, padded, infer_length, kept, decoded, windows):
    plan = win.official_shift_plan(audio_frames, 129, 4)
    assert plan.padded_audio == padded
    assert plan.infer_length == infer_length
    assert plan.video_length == kept
    assert win.frames_for_latents(plan.video_length) == decoded
    assert plan.windows_per_step == windows
    assert plan.single == (windows == 1)


def test_official_noise_length_and_cap():
    assert win.official_shift_plan(129).noise_length == 65  # noise drawn for 65 latents, 0..32 kept
    assert win.official_shift_plan(200).noise_length == 65
    capped = win.official_shift_plan(1000, max_frames=win.OFFICIAL_MAX_FRAMES)
    assert (capped.used_frames, capped.padded_audio, capped.infer_length, capped.video_length) == (400, 405, 129, 102)
    uncapped = win.official_shift_plan(1000)
    assert (uncapped.padded_audio, uncapped.infer_length, uncapped.video_length) == (1005, 257, 252)
    assert uncapped.windows_per_step == 8


def test_official_plan_uncapped_for_every_length():
    for n in range(1, 3000, 7):
        plan = win.official_shift_plan(n)
        assert win.frames_for_latents(plan.video_length) >= n
        assert plan.video_length >= win.latents_for_frames(n)
        if plan.single:
            assert n <= 129 and plan.infer_length == 33
        else:
            assert plan.video_length < plan.infer_length <= plan.video_length + 32  # 1..32 bridge latents
            assert (plan.infer_length - 1) % 32 == 0
        assert plan.windows_per_step * 33 >= plan.infer_length > (plan.windows_per_step - 1) * 33


def test_official_plan_tiny_window():
    plan = win.official_shift_plan(100, window_frames=33, temporal_ratio=4)
    assert (plan.window, plan.padded_audio, plan.infer_length, plan.video_length) == (9, 105, 33, 27)
    assert win.official_shift_plan(20, window_frames=33).single
    for bad in (1, 32, 130):
        with pytest.raises(ValueError, match="window_frames"):
            win.official_shift_plan(100, window_frames=bad)
    with pytest.raises(InputError):
        win.official_shift_plan(0)


def test_shift_sequence():
    assert [win.shift_at(i, 33, 10) for i in range(12)] == [0, 10, 20, 30, 7, 17, 27, 4, 14, 24, 1, 11]
    assert [win.shift_at(i, 9, 3) for i in range(4)] == [0, 3, 6, 0]


def test_shift_windows_step_0_and_wrap():
    groups = win.shift_windows(0, 65, 33, 10)
    assert groups == [list(range(33)), [*range(33, 65), 0]]
    groups = win.shift_windows(1, 65, 33, 10)  # shift 10: starts −10 and 23
    assert groups[0] == [*range(55, 65), *range(0, 23)]
    assert groups[1] == list(range(23, 56))


@pytest.mark.parametrize("infer_length", [65, 97, 129, 385])
def test_shift_windows_cover_everything_and_move(infer_length):
    previous_starts = None
    for step in range(12):
        groups = win.shift_windows(step, infer_length, 33, 10)
        assert len(groups) == -(-infer_length // 33)
        counts = torch.zeros(infer_length, dtype=torch.long)
        for idx in groups:
            assert len(idx) == 33 and len(set(idx)) == 33
            assert all(0 <= i < infer_length for i in idx)
            assert all((b - a) % infer_length == 1 for a, b in zip(idx, idx[1:]))  # contiguous, circular
            counts[idx] += 1
        assert int(counts.min()) >= 1 and int(counts.sum()) == 33 * len(groups)
        starts = sorted(idx[0] for idx in groups)
        assert starts != previous_starts
        previous_starts = starts


def _shift(num_frames: int):
    from dataclasses import replace

    from avatar.config import ModelConfig
    from avatar.pipeline.strategies import Shift

    return Shift(replace(ModelConfig(name="x"), window_frames=129, shift_offset=10), num_frames)


def test_shift_audio_rows_match_latents():
    shift = _shift(300)  # 97 latents
    assert shift.domain == 97
    for step in range(6):
        starts = [start - win.shift_at(step, 33, 10) for start in range(0, 97, 33)]  # official s = start − shift
        for s, lat in zip(starts, win.shift_windows(step, 97, 33, 10)):
            aud = shift.audio_rows(lat[0])
            assert len(aud) == 129
            assert all(0 <= a < 4 * 97 for a in aud)
            assert [aud[4 * k] for k in range(33)] == [4 * i for i in lat]  # latent k ↔ audio frame 4k of the window
            assert aud == [(4 * s + j) % (4 * 97) for j in range(129)]  # the official circular index
    # step 1 of a 65-latent run: s = −10 → audio starts at (−40) mod 260
    assert _shift(200).audio_rows(win.shift_windows(1, 65, 33, 10)[0][0])[:2] == [220, 221]


def test_single_window_never_shifts():
    for step in range(5):
        assert win.shift_windows(step, 33, 33, 10) == [list(range(33))]
        assert _shift(129).audio_rows(0) == list(range(129))
    with pytest.raises(ValueError):
        win.shift_windows(0, 20, 33, 10)


# --- overlapping plans ---------------------------------------------------------------------------------------------


def test_plan_shorter_than_one_window():
    plan = win.plan_windows(10, 33, 8)
    assert plan == (win.Window(0, 33),)
    assert plan[0].length == 33 and plan[0].clipped_stop(10) == 10
    assert win.plan_windows(1, 33, 0) == (win.Window(0, 33),)
    assert win.plan_windows(33, 33, 8) == (win.Window(0, 33),)


def test_plan_exact_multiples_and_one_over():
    assert [w.start for w in win.plan_windows(33 + 3 * 25, 33, 8)] == [0, 25, 50, 75]
    assert win.plan_windows(34, 33, 8) == (win.Window(0, 33), win.Window(1, 34))
    assert [w.start for w in win.plan_windows(66, 33, 0)] == [0, 33]


def test_plan_long_audio_60_seconds():
    num_latents = win.latents_for_frames(60 * 25)
    plan = win.plan_windows(num_latents, 33, 8)
    assert num_latents == 376 and len(plan) == 15
    assert plan[0].start == 0 and plan[-1].stop == num_latents
    assert all(b.start - a.start == 25 for a, b in zip(plan[:-2], plan[1:-1]))


@pytest.mark.parametrize("overlap", [33, 34, 100])
def test_plan_rejects_overlap_not_below_window(overlap):
    with pytest.raises(InputError, match=rf"overlap_frames={overlap}.*33"):
        win.plan_windows(100, 33, overlap)


def test_plan_rejects_bad_values():
    for args in [(100, 33, -1), (0, 33, 8), (100, 0, 0)]:
        with pytest.raises(InputError):
            win.plan_windows(*args)
    assert win.plan_segments(200, 33, 8) == win.plan_windows(200, 33, 8)


def test_plans_cover_exactly_the_requested_length():
    for window in (1, 2, 9, 33):
        for overlap in range(window):
            for num_latents in range(1, 130):
                plan = win.plan_windows(num_latents, window, overlap)
                assert all(w.length == window for w in plan)
                assert plan[0].start == 0
                assert max(w.clipped_stop(num_latents) for w in plan) == num_latents
                assert all(b.start > a.start for a, b in zip(plan, plan[1:]))
                assert all(a.stop - b.start >= overlap for a, b in zip(plan, plan[1:]))
                covered = set().union(*(range(w.start, w.clipped_stop(num_latents)) for w in plan))
                assert covered == set(range(num_latents))
                stride = window - overlap
                assert len(plan) == (1 if num_latents <= window else -(-(num_latents - window) // stride) + 1)


# --- weights -------------------------------------------------------------------------------------------------------


def test_window_weights_ramp_only_inside_overlaps():
    plan = win.plan_windows(40, 10, 4)  # starts 0, 6, 12, ..., 30
    weights = win.window_weights(plan, 40)
    first, middle = weights[0], weights[1]
    assert torch.equal(first[:6], torch.ones(6)) and bool((first[6:] < 1).all()) and bool((first[6:] > 0).all())
    assert bool((first[7:] <= first[6:-1]).all())  # the outgoing ramp falls
    assert bool((middle[1:4] >= middle[:3]).all())  # the incoming ramp rises
    torch.testing.assert_close(first[6:] + middle[:4], torch.ones(4), rtol=0, atol=1e-6)
    assert [w.tolist() for w in win.window_weights(win.plan_windows(5, 9, 2), 5)] == [[1.0] * 5]


def test_window_weights_partition_unity_on_every_plan():
    for window, overlap in [(33, 8), (33, 16), (33, 30), (9, 2), (5, 0)]:
        for num_latents in (1, window - 1, window, window + 1, 2 * window + 3, 100, 376):
            plan = win.plan_windows(num_latents, window, overlap)
            weights = win.window_weights(plan, num_latents)
            total = torch.zeros(num_latents, dtype=torch.float64)
            for w, wt in zip(plan, weights):
                assert wt.dtype == torch.float32 and wt.shape == (w.clipped_stop(num_latents) - w.start,)
                assert bool((wt > 0).all())
                total[w.start : w.clipped_stop(num_latents)] += wt.double()
            torch.testing.assert_close(total, torch.ones(num_latents, dtype=torch.float64), rtol=0, atol=1e-6)


def test_crossfade_weights():
    for n in (1, 2, 5, 49):
        w = win.crossfade_weights(n)
        torch.testing.assert_close(w, torch.arange(1, n + 1) / (n + 1), rtol=0, atol=1e-7)
        assert w.shape == (n,) and w.dtype == torch.float32
        assert bool((w > 0).all()) and bool((w < 1).all())
        assert bool((w[1:] > w[:-1]).all())
        torch.testing.assert_close(w + w.flip(0), torch.ones(n), rtol=0, atol=1e-6)
    assert win.crossfade_weights(1).tolist() == [0.5]
    assert win.crossfade_weights(0).shape == (0,)
