"""Sampling schedules of the official sampler (dossier §4.1, §4.3, §4.4): pure functions, no I/O.

- Timesteps: σ = linspace(1, 0, steps + 1) in fp32, shifted σ' = shift·σ / (1 + (shift − 1)·σ); the model sees
  t = σ'[:-1]·1000 and the Euler step is ``x + v·(σ'[i+1] − σ'[i])``, all in fp32 as the official scheduler does.
- Guidance: steps ``i < joint_cfg_steps`` use a joint text + audio CFG ramping from ``cfg_scale`` towards
  ``joint_cfg_floor`` (face mask × ``joint_face_mask_scale`` in both branches, negative prompt in the unconditional
  branch); later steps use an audio-only CFG ramping from ``audio_cfg_max`` towards ``audio_cfg_min`` (positive prompt
  in both branches, full face mask). The unconditional branch always gets zero audio features. Both ramps are
  ``(1 − i/steps)·(top − bottom) + bottom``, so they scale with the step count; the phase boundary is the configured
  step count, as in the official code (which hard-codes 10).
- Cache ("DeepCache"): at 50 steps the official refreshes the cache on steps 0–15, 20, 25, 30, 35 and 40–49 and
  reuses it on the other 20 steps. :func:`cached_steps` scales that rule with the step count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avatar.config import SamplingConfig

#: Number of training timesteps the model's ``t`` is scaled to.
NUM_TRAIN_TIMESTEPS = 1000

#: The official cache rule at its native 50 steps, as fractions of the step count (tenths): always full before
#: ``CACHE_START`` (15 of 50) and from ``CACHE_END`` (40 of 50), in between full every ``CACHE_INTERVAL`` (5 of 50)
#: steps counted from ``CACHE_START``, cached otherwise.
CACHE_START_TENTHS = 3
CACHE_END_TENTHS = 8
CACHE_INTERVAL_TENTHS = 1

#: The official hard-coded list of full-forward steps (pipeline_hunyuan_video_audio.py), independent of the step count.
OFFICIAL_FULL_STEPS = frozenset([*range(15), *range(15, 42, 5), *range(41, 50)])


def flow_timesteps(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted flow-matching sigmas ``[steps + 1]`` (1 → 0) and model timesteps ``[steps]`` (fp32, in [0, 1000])."""
    if steps < 1:
        raise ValueError(f"sampling.steps={steps}: need at least 1 step")
    if shift <= 0:
        raise ValueError(f"sampling.shift={shift}: must be > 0")
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float32)
    sigmas = (shift * sigmas) / (1 + (shift - 1) * sigmas)
    timesteps = (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).to(torch.float32)
    return sigmas, timesteps


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor
) -> torch.Tensor:
    """One flow-matching Euler step in fp32: ``x + v·(σ_next − σ)`` with the difference rounded to fp32 once."""
    dt = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    return x.to(torch.float32) + v.to(torch.float32) * dt.to(x.device)


def official_round(x: torch.Tensor) -> torch.Tensor:
    """The official storage rounding of a stepped window: the fp32 Euler result cast to bf16 (returned as fp32).

    The official adds these bf16 values into an fp16 buffer (each sum formed in fp32 and rounded to fp16) and divides
    by an fp16 counter; ``stitch.WindowAccumulator(fidelity="official")`` does exactly that with this function.
    """
    return x.to(torch.bfloat16).to(torch.float32)


def _check_step(step: int, sampling: SamplingConfig) -> None:
    if not 0 <= step < sampling.steps:
        raise ValueError(f"step {step} outside 0..{sampling.steps - 1} (sampling.steps={sampling.steps})")


def cfg_phase(step: int, sampling: SamplingConfig) -> str:
    """``"joint"`` (text + audio guidance) for the first ``joint_cfg_steps`` steps, ``"audio"`` after."""
    _check_step(step, sampling)
    return "joint" if step < sampling.joint_cfg_steps else "audio"


def guidance_scale(step: int, sampling: SamplingConfig) -> float:
    """CFG weight ``w`` of ``v = v_uncond + w·(v_cond − v_uncond)`` at ``step`` (computed in float64 like the
    official Python arithmetic)."""
    progress = 1 - step / sampling.steps
    if cfg_phase(step, sampling) == "joint":
        return progress * (sampling.cfg_scale - sampling.joint_cfg_floor) + sampling.joint_cfg_floor
    return progress * (sampling.audio_cfg_max - sampling.audio_cfg_min) + sampling.audio_cfg_min


def face_mask_scale(step: int, sampling: SamplingConfig) -> float:
    """Multiplier of the face mask in both branches: ``joint_face_mask_scale`` in the joint phase, 1 after."""
    return sampling.joint_face_mask_scale if cfg_phase(step, sampling) == "joint" else 1.0


@dataclass(frozen=True)
class Guidance:
    """What each CFG branch gets at one step. The unconditional branch always has zero audio features and the
    conditional branch the positive prompt and the real audio; the reference image, motion and fps are never
    dropped."""

    phase: str  # "joint" | "audio"
    scale: float  # CFG weight
    face_mask_scale: float  # applied to the face mask of both branches
    uncond_prompt: str  # "negative" (joint phase) | "positive" (audio phase)


def guidance(step: int, sampling: SamplingConfig) -> Guidance:
    """The whole CFG recipe of ``step``."""
    phase = cfg_phase(step, sampling)
    return Guidance(
        phase=phase,
        scale=guidance_scale(step, sampling),
        face_mask_scale=face_mask_scale(step, sampling),
        uncond_prompt="negative" if phase == "joint" else "positive",
    )


def _round_tenths(steps: int, tenths: int) -> int:
    """``round(steps·tenths/10)`` with halves rounded up, in integers."""
    return (steps * tenths + 5) // 10


def cached_steps(steps: int) -> frozenset[int]:
    """Steps that reuse the cached input of the last single block instead of a full forward.

    The official rule (50 steps: full on 0–15, 20, 25, 30, 35, 40–49; cached on 16–19, 21–24, 26–29, 31–34, 36–39)
    is a warm-up of 30 % of the steps, a refresh every 10 % until 80 %, and full steps to the end. Other step counts
    use the same fractions (rounded half up), e.g. 20 steps → full 0–6, 8, 10, 12, 14, 16–19, cached 7, 9, 11, 13, 15.
    At 50 steps this is exactly the official set; below 10 steps nothing is cached.
    """
    if steps < 1:
        raise ValueError(f"sampling.steps={steps}: need at least 1 step")
    start = _round_tenths(steps, CACHE_START_TENTHS)
    end = _round_tenths(steps, CACHE_END_TENTHS)
    interval = max(1, _round_tenths(steps, CACHE_INTERVAL_TENTHS))
    return frozenset(i for i in range(start + 1, end) if (i - start) % interval != 0)
