"""Sampling schedules against the official numbers (dossier §4.1, §4.3, §4.4)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from avatar.config import SamplingConfig
from avatar.pipeline import schedule as sched


def test_timesteps_golden_50_steps_shift_5():
    sigmas, t = sched.flow_timesteps(50, 5.0)
    assert sigmas.dtype == torch.float32 and t.dtype == torch.float32
    assert sigmas.shape == (51,) and t.shape == (50,)
    assert [round(v, 2) for v in t[:3].tolist()] == [1000.0, 995.93, 991.74]
    assert [round(v, 2) for v in t[-3:].tolist()] == [241.94, 172.41, 92.59]
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_timesteps_follow_the_shift_formula():
    for steps, shift in [(1, 5.0), (7, 3.0), (50, 5.0), (30, 1.0)]:
        sigmas, t = sched.flow_timesteps(steps, shift)
        plain = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        expected = shift * plain / (1 + (shift - 1) * plain)
        torch.testing.assert_close(sigmas.double(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(t, (sigmas[:-1] * 1000).float())
    _, linear = sched.flow_timesteps(4, 1.0)
    assert linear.tolist() == [1000.0, 750.0, 500.0, 250.0]


@pytest.mark.parametrize("steps, shift", [(0, 5.0), (-1, 5.0), (10, 0.0), (10, -2.0)])
def test_timesteps_reject_bad_values(steps, shift):
    with pytest.raises(ValueError):
        sched.flow_timesteps(steps, shift)


def test_euler_step_is_fp32_and_uses_the_sigma_difference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 2, 2, generator=gen).to(torch.float16)
    v = torch.randn(1, 4, 3, 2, 2, generator=gen).to(torch.bfloat16)
    sigmas, _ = sched.flow_timesteps(50, 5.0)
    out = sched.euler_step(x, v, sigmas[3], sigmas[4])
    assert out.dtype == torch.float32
    dt = sigmas[4] - sigmas[3]
    assert torch.equal(out, x.float() + v.float() * dt)
    assert torch.equal(sched.euler_step(x, v, float(sigmas[3]), float(sigmas[4])), out)


def test_euler_integrates_a_constant_velocity_exactly_to_the_end():
    sigmas, _ = sched.flow_timesteps(20, 5.0)
    noise = torch.full((5,), 0.25)
    v = torch.full((5,), -2.0)  # x(σ) = x0 + v·(σ − 1): the endpoint is noise − v
    x = noise
    for i in range(20):
        x = sched.euler_step(x, v, sigmas[i], sigmas[i + 1])
    torch.testing.assert_close(x, noise - v, rtol=0, atol=1e-5)


def test_guidance_golden_values_at_50_steps():
    cfg = SamplingConfig()
    joint = [sched.guidance_scale(i, cfg) for i in range(10)]
    audio = [sched.guidance_scale(i, cfg) for i in range(10, 50)]
    assert round(joint[0], 2) == 7.5 and round(joint[1], 2) == 7.39 and round(joint[-1], 2) == 6.51
    assert round(audio[0], 2) == 5.9 and round(audio[-1], 2) == 3.56
    assert joint == pytest.approx([(1 - i / 50) * 5.5 + 2 for i in range(10)], abs=1e-12)
    assert audio == pytest.approx([(1 - i / 50) * 3.0 + 3.5 for i in range(10, 50)], abs=1e-12)
    assert all(a > b for a, b in zip(audio, audio[1:])) and all(a > b for a, b in zip(joint, joint[1:]))


def test_phases_face_mask_and_branch_prompts():
    cfg = SamplingConfig()
    assert [sched.cfg_phase(i, cfg) for i in (0, 9, 10, 49)] == ["joint", "joint", "audio", "audio"]
    assert sched.face_mask_scale(0, cfg) == 0.6 and sched.face_mask_scale(9, cfg) == 0.6
    assert sched.face_mask_scale(10, cfg) == 1.0
    g0, g10 = sched.guidance(0, cfg), sched.guidance(10, cfg)
    assert (g0.phase, g0.uncond_prompt, g0.face_mask_scale) == ("joint", "negative", 0.6)
    assert (g10.phase, g10.uncond_prompt, g10.face_mask_scale) == ("audio", "positive", 1.0)
    assert g0.scale == sched.guidance_scale(0, cfg)


def test_cfg_scale_changes_only_the_joint_phase():
    base, other = SamplingConfig(), SamplingConfig(cfg_scale=4.5)
    assert sched.guidance_scale(0, other) == 4.5 and sched.guidance_scale(0, base) == 7.5
    assert all(sched.guidance_scale(i, other) == sched.guidance_scale(i, base) for i in range(10, 50))


def test_guidance_ramps_scale_with_steps_and_phase_boundary_is_configured():
    cfg = dataclasses.replace(SamplingConfig(), steps=20, joint_cfg_steps=4)
    assert [sched.cfg_phase(i, cfg) for i in (3, 4)] == ["joint", "audio"]
    assert sched.guidance_scale(4, cfg) == pytest.approx((1 - 4 / 20) * 3.0 + 3.5)
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="step"):
            sched.cfg_phase(bad, cfg)


def test_cached_steps_official_set_at_50():
    expected = {*range(16, 20), *range(21, 25), *range(26, 30), *range(31, 35), *range(36, 40)}
    assert sched.cached_steps(50) == frozenset(expected)
    assert sched.cached_steps(50) == frozenset(range(50)) - sched.OFFICIAL_FULL_STEPS
    assert len(expected) == 20


def test_cached_steps_scale_with_the_step_count():
    assert sched.cached_steps(20) == frozenset({7, 9, 11, 13, 15})
    assert sched.cached_steps(100) == frozenset(i for i in range(31, 80) if i % 10 != 0)
    for steps in range(1, 10):
        assert sched.cached_steps(steps) == frozenset()
    for steps in range(1, 201):
        cached = sched.cached_steps(steps)
        assert cached <= set(range(1, steps - 1)), steps  # the first and last steps are always full
        full_before = [i for i in range(steps) if i not in cached]
        assert all(any(f < c for f in full_before) for c in cached)
    with pytest.raises(ValueError):
        sched.cached_steps(0)


def test_official_round_is_a_bf16_rounding():
    x = torch.tensor([1.0, 1.0 + 2**-9, 1.0 + 2**-7, 3.14159, -2.71828])
    r = sched.official_round(x)
    assert r.dtype == torch.float32
    assert torch.equal(r, x.to(torch.bfloat16).float())
    assert r[1].item() == 1.0 and r[2].item() == 1.0 + 2**-7
