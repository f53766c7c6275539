"""The shipped sampler equals an independent reference loop written from the official pipeline's semantics
(dossier §4, §6): sliding circular windows on the +shift grid, per-absolute-frame cache buffers written by every
full step and read on the hard-coded cached steps, the two CFG phases and the official cast list. Same tiny DiT,
50 steps, one window (129 audio frames) and two windows (200), ``fidelity=fp32`` and ``fidelity=official``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from avatar.compose import compose
from avatar.models.transformer import AvatarDiT, CachedInput
from avatar.pipeline import denoise as dn
from avatar.pipeline import strategies as strat
from avatar.pipeline.topology import Topology

SIDE = 4  # latent side: 2×2 tokens per frame
OFFICIAL_FULL = set(range(15)) | {15, 20, 25, 30, 35} | set(range(40, 50))


def setup(num_frames: int, fidelity: str):
    cfg = compose(["model=tiny", f"sampling.fidelity={fidelity}"])
    # The official window (129 video frames = 33 latents) and grid step (10) around the tiny network.
    # A narrower, shallower tiny network keeps 3 × 50 steps × 2 windows × 2 branches within seconds.
    model_cfg = replace(
        cfg.model,
        window_frames=129,
        shift_offset=10,
        hidden_size=32,
        num_heads=2,
        depth_double=2,
        depth_single=2,
        text_len=16,
        adapter_after_double=[1],
    )
    torch.manual_seed(0)
    model = AvatarDiT(model_cfg).eval()
    m = model_cfg
    gen = torch.Generator().manual_seed(num_frames)
    text_mask = torch.zeros(1, m.text_len, dtype=torch.long)
    text_mask[:, :9] = 1
    neg_mask = torch.zeros(1, m.text_len, dtype=torch.long)
    neg_mask[:, :13] = 1
    face = torch.zeros(1, 1, 1, SIDE, SIDE)
    face[..., 1:3, 1:4] = 0.7  # fractional values: fp16 rounding of the mask matters
    cond = dn.Conditioning(
        audio_feats=torch.randn(num_frames, m.audio_window, m.audio_layers, m.audio_channels, generator=gen),
        face_mask=face,
        text_states=torch.randn(1, m.text_len, m.text_states_dim, generator=gen),
        text_mask=text_mask,
        text_pooled=torch.randn(1, m.text_states_dim_2, generator=gen),
        neg_text_states=torch.randn(1, m.text_len, m.text_states_dim, generator=gen),
        neg_text_mask=neg_mask,
        neg_text_pooled=torch.randn(1, m.text_states_dim_2, generator=gen),
        ref_latents=torch.randn(1, m.latent_channels, 33, SIDE, SIDE, generator=gen),
        num_frames=num_frames,
    )
    sampling = replace(cfg.sampling, steps=50, fidelity=fidelity, cache=True)
    return model_cfg, model, cond, sampling


@torch.no_grad()
def official_loop(model, cond, noise: torch.Tensor, fidelity: str) -> tuple[torch.Tensor, dict]:
    """The official ``__call__`` loop, written out from the dossier (not from our sampler)."""
    official = fidelity == "official"
    num = cond.num_frames
    padded = 129 if num <= 129 else num + 5
    video_length = ((padded // 4 * 4 + 1) - 1) // 4 + 1
    infer_length = (padded // 128 + 1) * 32 + 1
    if video_length == 33:
        infer_length = 33
    assert noise.shape[2] == infer_length
    audio_all = torch.zeros(4 * infer_length, *cond.audio_feats.shape[1:])
    audio_all[: min(num, 4 * infer_length)] = cond.audio_feats[: 4 * infer_length]
    sigmas = torch.linspace(1, 0, 51, dtype=torch.float32)
    sigmas = 5.0 * sigmas / (1 + 4.0 * sigmas)
    timesteps = sigmas[:-1] * 1000

    def as_input(t):  # the official latents and conditioning are fp16
        return t.half().float() if official else t

    store = torch.float16 if official else torch.float32
    latents = noise.to(store)
    caches = {}  # (branch, kind) -> per-absolute-frame buffer
    counts = {"window_calls": 0, "cached_window_calls": 0}
    shift = 0
    for i in range(50):
        pred = torch.zeros_like(latents)
        counter = torch.zeros(infer_length, dtype=store)
        cached_step = i not in OFFICIAL_FULL
        for start in range(0, infer_length, 33):
            s = start - shift
            idx = [(s + k) % infer_length for k in range(33)]
            aidx = [(4 * s + j) % (4 * infer_length) for j in range(129)]
            if i < 10:
                w = (1 - i / 50) * (7.5 - 2.0) + 2.0
                mask = cond.face_mask.half() * 0.6 if official else cond.face_mask * 0.6
                uncond_text = (cond.neg_text_states, cond.neg_text_mask, cond.neg_text_pooled)
            else:
                w = (1 - i / 50) * (6.5 - 3.5) + 3.5
                mask = cond.face_mask.half() if official else cond.face_mask
                uncond_text = (cond.text_states, cond.text_mask, cond.text_pooled)
            cond_text = (cond.text_states, cond.text_mask, cond.text_pooled)
            outs = []
            for b, (states, tmask, pooled) in enumerate((uncond_text, cond_text)):
                audio = audio_all[aidx]
                kwargs = dict(
                    x=as_input(latents[:, :, idx].float()),
                    t=timesteps[i : i + 1],
                    ref_latents=as_input(cond.ref_latents),
                    text_states=as_input(states),
                    text_mask=tmask,
                    text_states_2=as_input(pooled),
                    audio_feats=as_input(torch.zeros_like(audio) if b == 0 else audio)[None],
                    face_mask=mask.float(),
                )
                if cached_step:
                    img = torch.cat([caches[b, "ref"][idx[0]][None], caches[b, "img"][idx]])
                    cached = CachedInput(img=img[None], txt=caches[b, "txt"][idx[0]][None])
                    out = model(**kwargs, cache="reuse", cached=cached)
                else:
                    out, c = model(**kwargs, cache="store")
                    frames_all = (infer_length, *c.img.shape[2:])
                    caches.setdefault((b, "img"), torch.zeros(frames_all))
                    caches.setdefault((b, "ref"), torch.zeros(frames_all))
                    caches.setdefault((b, "txt"), torch.zeros((infer_length, *c.txt.shape[1:])))
                    caches[b, "img"][idx] = c.img[0, 1:]
                    caches[b, "ref"][idx] = c.img[0, 0]
                    caches[b, "txt"][idx] = c.txt[0]
                outs.append(out.to(torch.bfloat16) if official else out)
            noise_pred = outs[0] + w * (outs[1] - outs[0])
            stepped = latents[:, :, idx].float() + noise_pred.float() * (sigmas[i + 1] - sigmas[i])
            if official:
                stepped = stepped.to(torch.bfloat16)
            pred[:, :, idx] += stepped
            counter[idx] += 1
            counts["window_calls"] += 1
            counts["cached_window_calls"] += int(cached_step)
        latents = pred / counter.view(1, 1, -1, 1, 1)
        if infer_length != 33:
            shift = (shift + 10) % 33
    return latents.float(), counts


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fidelity", ["fp32", "official"])
@pytest.mark.parametrize("num_frames,windows", [(129, 1), (200, 2)])
def test_shipped_sampler_equals_the_official_loop(num_frames, windows, fidelity):
    model_cfg, model, cond, sampling = setup(num_frames, fidelity)
    plan = strat.make("shift", model_cfg, num_frames, 0, fidelity)
    assert plan.windows_per_step == windows
    noise = dn.make_noise((1, model_cfg.latent_channels, plan.domain, SIDE, SIDE), seed=3)
    reference, counts = official_loop(model, cond, noise, fidelity)

    # The stand-alone API ...
    standalone = dn.denoise_window_strategy(model, cond, noise, sampling, model_cfg, "shift")
    assert torch.equal(standalone, reference), f"max diff {(standalone - reference).abs().max():.3e}"
    # ... and the loop the renderer runs (``Renderer._denoise_and_decode``), with its call counts.
    stats = dn.DenoiseStats()
    velocity = dn.GuidedVelocity(model, cond, sampling, Topology(), torch.float32, stats)
    with torch.inference_mode():
        shipped = dn.denoise_lockstep(plan, velocity, noise, dn.new_cache(sampling, plan.domain))
    assert torch.equal(shipped, reference)
    assert (stats.window_calls, stats.cached_window_calls) == (counts["window_calls"], counts["cached_window_calls"])
    assert (stats.window_calls, stats.cached_window_calls) == (50 * windows, 20 * windows)
    assert (stats.forwards, stats.cached_forwards) == (100 * windows, 40 * windows)


@pytest.mark.timeout(120)
def test_cache_really_changes_the_result():
    """The comparison above can fail: without the cache the latents differ from the official (cached) loop."""
    model_cfg, model, cond, sampling = setup(200, "fp32")
    plan = strat.make("shift", model_cfg, 200, 0, "fp32")
    noise = dn.make_noise((1, model_cfg.latent_channels, plan.domain, SIDE, SIDE), seed=3)
    reference, _ = official_loop(model, cond, noise, "fp32")
    uncached = dn.denoise_window_strategy(model, cond, noise, sampling, model_cfg, "shift", use_cache=False)
    assert not torch.equal(uncached, reference)
