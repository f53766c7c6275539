"""The adaptive step cache (``sampling.cache=adaptive``) on the shipped sampler loop and a tiny DiT, 50 steps: at
threshold 0 it is ``cache=off`` bit for bit; at the default threshold of ``sampling=fast`` it runs at most 60 % of
the forwards of ``off`` with its first and last steps full and never more than ``cache_max_skip`` reused steps in a
row; it never stacks on the deep cache; a state saved mid-run and restored into a new cache continues exactly; bad
settings are one-line input errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from avatar.io.errors import InputError
from avatar.pipeline import denoise as dn
from avatar.pipeline import strategies as strat
from avatar.pipeline.adaptive import AdaptiveCache, check_cache_settings, warmup_steps
from avatar.pipeline.topology import Topology
from tests.unit.test_sampler_official import SIDE, setup

pytestmark = pytest.mark.timeout(240)


def _run(model_cfg, model, cond, sampling, num_frames, *, stop_after=None, state=None):
    """The renderer's lockstep loop; returns (latents, stats, cache). ``stop_after``: end after that many steps;
    ``state``: ``(start_step, latents, snapshot)`` to continue from."""
    plan = strat.make("shift", model_cfg, num_frames, 0, sampling.fidelity)
    noise = dn.make_noise((1, model_cfg.latent_channels, plan.domain, SIDE, SIDE), seed=3)
    stats = dn.DenoiseStats()
    velocity = dn.GuidedVelocity(model, cond, sampling, Topology(), torch.float32, stats)
    cache = dn.new_cache(sampling, plan.domain)
    start, latents = 0, None
    if state is not None:
        start, latents, snapshot = state
        cache.bind(velocity.topo)
        cache.restore(*snapshot)
    with torch.inference_mode():
        if stop_after is None:
            out = dn.denoise_lockstep(plan, velocity, noise, cache, start_step=start, latents=latents)
        else:

            class Stop(Exception):
                pass

            kept = {}

            def on_step(step, x):
                if step + 1 == stop_after:
                    kept["latents"], kept["snapshot"] = x.clone(), cache.snapshot()
                    raise Stop

            with pytest.raises(Stop):
                dn.denoise_lockstep(plan, velocity, noise, cache, on_step=on_step)
            return kept, stats, cache
    return out, stats, cache


@pytest.mark.parametrize("fidelity", ["fp32", "official"])
def test_threshold_zero_is_cache_off_bit_for_bit(fidelity):
    model_cfg, model, cond, sampling = setup(129, fidelity)
    off, off_stats, _ = _run(model_cfg, model, cond, replace(sampling, cache="off"), 129)
    zero, stats, cache = _run(model_cfg, model, cond, replace(sampling, cache="adaptive", cache_threshold=0.0), 129)
    assert isinstance(cache, AdaptiveCache)
    assert torch.equal(zero, off)
    assert (stats.forwards, stats.reused_forwards, stats.cached_forwards) == (off_stats.forwards, 0, 0) == (100, 0, 0)
    assert stats.cache_windows[0]["steps"] == "F" * 50


def test_default_threshold_runs_at_most_60_percent_of_the_forwards_of_off():
    from avatar.compose import compose

    fast = compose(["model=tiny", "sampling=fast"]).sampling
    assert (fast.cache, fast.steps) == ("adaptive", 50)
    model_cfg, model, cond, sampling = setup(129, "official")
    sampling = replace(
        sampling, cache="adaptive", cache_threshold=fast.cache_threshold, cache_max_skip=fast.cache_max_skip
    )
    off, off_stats, _ = _run(model_cfg, model, cond, replace(sampling, cache="off"), 129)
    out, stats, _ = _run(model_cfg, model, cond, sampling, 129)
    assert stats.forwards <= 0.6 * off_stats.forwards, (stats.forwards, off_stats.forwards)
    assert stats.forwards + stats.reused_forwards == off_stats.forwards
    assert stats.cached_forwards == 0  # never stacked on the deep cache
    assert not torch.equal(out, off)  # the reuse did change the result ...
    assert torch.isfinite(out).all()
    pattern = stats.cache_windows[0]["steps"]
    warm = warmup_steps(50)
    assert pattern[:warm] == "F" * warm and pattern[-1] == "F"
    assert "R" * (fast.cache_max_skip + 1) not in pattern
    assert stats.cache_windows[0]["reused"] == pattern.count("R") == stats.reused_forwards // 2


def test_adaptive_replaces_the_deep_cache():
    model_cfg, model, cond, sampling = setup(129, "fp32")
    assert type(dn.new_cache(replace(sampling, cache="official"), 33)).__name__ == "DeepCache"
    assert isinstance(dn.new_cache(replace(sampling, cache="adaptive"), 33), AdaptiveCache)
    assert dn.new_cache(replace(sampling, cache="off"), 33) is None
    assert dn.new_cache(replace(sampling, cache=False), 33) is None  # the former boolean


# One window, and two circular windows whose frames move every step (a higher threshold: there the frames' outputs
# change with their place in the window, which the transformation rate sees).
@pytest.mark.parametrize("num_frames,threshold", [(129, 0.1), (200, 2.0)])
def test_a_restored_state_continues_exactly(num_frames, threshold):
    model_cfg, model, cond, sampling = setup(num_frames, "official")
    sampling = replace(sampling, cache="adaptive", cache_threshold=threshold)
    whole, stats, _ = _run(model_cfg, model, cond, sampling, num_frames)
    assert stats.reused_forwards > 0
    for stop in (7, 23):
        kept, _, _ = _run(model_cfg, model, cond, sampling, num_frames, stop_after=stop)
        resumed, _, _ = _run(
            model_cfg, model, cond, sampling, num_frames, state=(stop, kept["latents"], kept["snapshot"])
        )
        assert torch.equal(resumed, whole), f"resumed after step {stop}"


def test_without_the_state_a_resume_would_differ():
    """The exactness above depends on the restored state: a fresh cache at the same step gives other latents."""
    model_cfg, model, cond, sampling = setup(129, "official")
    sampling = replace(sampling, cache="adaptive", cache_threshold=0.1)
    whole, _, _ = _run(model_cfg, model, cond, sampling, 129)
    kept, _, _ = _run(model_cfg, model, cond, sampling, 129, stop_after=7)
    empty = ({"adaptive.valid": torch.zeros(33, dtype=torch.bool)}, {})
    fresh, _, _ = _run(model_cfg, model, cond, sampling, 129, state=(7, kept["latents"], empty))
    assert not torch.equal(fresh, whole)


@pytest.mark.parametrize(
    "threshold,max_skip,expect",
    [(-0.1, 3, "cache_threshold=-0.1"), (float("nan"), 3, "cache_threshold=nan"), (0.1, 0, "cache_max_skip=0")],
)
def test_bad_settings_are_one_line_input_errors(threshold, max_skip, expect):
    _, _, _, sampling = setup(129, "fp32")
    with pytest.raises(InputError) as err:
        check_cache_settings(replace(sampling, cache_threshold=threshold, cache_max_skip=max_skip))
    assert expect in str(err.value) and "\n" not in str(err.value)
