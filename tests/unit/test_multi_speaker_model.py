"""Several speakers in the DiT (the face-aware audio adapter with one audio and one disjoint mask per speaker), on a
tiny config of the real class: the forward equals the explicit sum of the masked adapter contributions, a speaker's
audio changes tokens only inside its mask, one speaker given with the speaker axis is the single-speaker forward bit
for bit, and per-latent-frame (time-switched) masks."""

from __future__ import annotations

import pytest
import torch

from avatar.config import ModelConfig
from avatar.models.transformer import AUDIO_FRAMES_PER_LATENT, AvatarDiT

NUM_FRAMES = 3
LATENT = 8
TEXT_LEN = 8
TOKENS_PER_FRAME = (LATENT // 2) ** 2


def tiny_config() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        hidden_size=64,
        num_heads=4,
        depth_double=2,
        depth_single=2,
        refiner_depth=1,
        latent_channels=4,
        rope_axes=[4, 6, 6],
        text_states_dim=32,
        text_states_dim_2=16,
        audio_window=10,
        audio_layers=3,
        audio_channels=8,
        audio_proj_dim=32,
        adapter_dim=32,
        adapter_after_double=[0, 1],
    )


@pytest.fixture(scope="module")
def model() -> AvatarDiT:
    torch.manual_seed(0)
    return AvatarDiT(tiny_config()).eval()


def speaker_masks(frames: int = 1) -> torch.Tensor:
    """``[1, 2, frames, h, w]``: A on the left half, B on the top of the right half (constant over 2×2 patches, so
    the token grid sees them exactly); disjoint."""
    mask = torch.zeros(1, 2, frames, LATENT, LATENT)
    mask[:, 0, :, :, : LATENT // 2] = 1
    mask[:, 1, :, : LATENT // 2, LATENT // 2 :] = 1
    return mask


def make_inputs(cfg: ModelConfig, speakers: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    num_audio = AUDIO_FRAMES_PER_LATENT * (NUM_FRAMES - 1) + 1
    mask = torch.zeros(1, TEXT_LEN, dtype=torch.long)
    mask[:, :5] = 1
    return dict(
        x=torch.randn(1, cfg.latent_channels, NUM_FRAMES, LATENT, LATENT, generator=g),
        t=torch.full((1,), 700.0),
        ref_latents=torch.randn(1, cfg.latent_channels, 1, LATENT, LATENT, generator=g).repeat(1, 1, NUM_FRAMES, 1, 1),
        text_states=torch.randn(1, TEXT_LEN, cfg.text_states_dim, generator=g),
        text_mask=mask,
        text_states_2=torch.randn(1, cfg.text_states_dim_2, generator=g),
        audio_feats=torch.randn(
            1, num_audio, speakers, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g
        ),
        face_mask=speaker_masks()[:, :speakers],
    )


class AdapterProbe:
    """The image tokens around adapter ``j`` (after double block ``j``): ``before`` (the block's output) and
    ``after`` (what the next block gets), captured with hooks on the real modules."""

    def __init__(self, model: AvatarDiT, block: int) -> None:
        self.before: list[torch.Tensor] = []
        self.after: list[torch.Tensor] = []
        num_txt = TEXT_LEN
        hooks = [model.double_blocks[block].register_forward_hook(lambda m, a, out: self.before.append(out[0]))]
        if block + 1 < len(model.double_blocks):
            nxt = model.double_blocks[block + 1]
            hooks.append(nxt.register_forward_pre_hook(lambda m, args: self.after.append(args[0])))
        else:
            nxt = model.single_blocks[0]
            hooks.append(nxt.register_forward_pre_hook(lambda m, args: self.after.append(args[0][:, :-num_txt])))
        self.hooks = hooks

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def explicit_tokens(model: AvatarDiT, feats: torch.Tensor) -> torch.Tensor:
    """One speaker's audio tokens per sequence frame ``[1, T+1, 4A, D]`` written out (frame 0 ×4, zero ref frame)."""
    tokens = model.audio_proj(feats)
    tokens = torch.cat([tokens[:, :1]] * 3 + [tokens], dim=1).reshape(1, NUM_FRAMES, -1, tokens.shape[-1])
    return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)


def explicit_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[1, 1, T or 1, h, w]`` -> ``[1, (T+1)·F, 1]`` on the 2×2 token grid, zero on the reference frame."""
    grid = mask[:, 0, :, ::2, ::2].expand(1, NUM_FRAMES, LATENT // 2, LATENT // 2).reshape(1, -1)
    return torch.cat([torch.zeros(1, TOKENS_PER_FRAME), grid], dim=1)[..., None]


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, NUM_FRAMES])
def test_two_speaker_forward_is_the_explicit_sum_of_masked_adapters(model, frames):
    inputs = make_inputs(model.cfg)
    masks = speaker_masks(frames)
    if frames > 1:  # time-switched: A speaks in latent frames 0 and 2, B in frame 1
        masks[:, 0, 1] = 0
        masks[:, 1, [0, 2]] = 0
    inputs["face_mask"] = masks
    for j, block in enumerate(model.cfg.adapter_after_double):
        probe = AdapterProbe(model, block)
        try:
            model(**inputs)
        finally:
            probe.remove()
        before, after = probe.before[0], probe.after[0]
        adapter = model.audio_adapter_blocks[j]
        video = before.unflatten(1, (NUM_FRAMES + 1, TOKENS_PER_FRAME))
        expected = before.clone()
        for i in range(2):
            out = adapter(explicit_tokens(model, inputs["audio_feats"][:, :, i]), video).flatten(1, 2)
            expected = expected + explicit_token_mask(masks[:, i : i + 1]) * out
        assert (after - expected).abs().max().item() <= 1e-6, j
        assert not torch.equal(after, before)


@torch.no_grad()
def test_a_speakers_audio_changes_tokens_only_inside_its_mask(model):
    inputs = make_inputs(model.cfg)
    mask_a = explicit_token_mask(inputs["face_mask"][:, :1])[0, :, 0].bool()
    first = model.cfg.adapter_after_double[0]

    def after_first_adapter(feats):
        probe = AdapterProbe(model, first)
        try:
            model(**{**inputs, "audio_feats": feats})
        finally:
            probe.remove()
        return probe.after[0][0]

    base = after_first_adapter(inputs["audio_feats"])
    perturbed = inputs["audio_feats"].clone()
    perturbed[:, :, 0] += torch.randn_like(perturbed[:, :, 0])
    changed = after_first_adapter(perturbed)
    assert torch.equal(changed[~mask_a], base[~mask_a])  # bit for bit outside A's mask (B's region included)
    assert (changed[mask_a] != base[mask_a]).any(dim=-1).all()  # every token of A's mask moves
    # Perturbing B changes nothing in A's region.
    perturbed = inputs["audio_feats"].clone()
    perturbed[:, :, 1] += 1.0
    assert torch.equal(after_first_adapter(perturbed)[mask_a], base[mask_a])


@torch.no_grad()
def test_one_speaker_with_the_speaker_axis_is_the_single_speaker_forward_bit_for_bit(model):
    inputs = make_inputs(model.cfg, speakers=1)
    single = {**inputs, "audio_feats": inputs["audio_feats"][:, :, 0]}
    assert single["audio_feats"].dim() == 5 and inputs["face_mask"].shape[1] == 1
    v_single = model(**single)
    assert torch.equal(model(**inputs), v_single)
    v_single_store, cached = model(**single, cache="store")
    v_axis_store, cached_axis = model(**inputs, cache="store")
    assert torch.equal(v_axis_store, v_single_store)
    assert torch.equal(cached_axis.img, cached.img) and torch.equal(cached_axis.txt, cached.txt)


@torch.no_grad()
def test_two_speakers_splitting_one_mask_with_the_same_audio_match_one_speaker(model):
    """Disjoint masks m_A + m_B = m and the same audio for both: Σ m_i·Adapter(a, img) = m·Adapter(a, img)."""
    inputs = make_inputs(model.cfg)
    feats = inputs["audio_feats"][:, :, :1].expand(-1, -1, 2, -1, -1, -1).contiguous()
    masks = inputs["face_mask"]
    two = model(**{**inputs, "audio_feats": feats})
    one = model(**{**inputs, "audio_feats": feats[:, :, 0], "face_mask": masks.sum(dim=1, keepdim=True)})
    assert (two - one).abs().max().item() <= 1e-5
    assert not torch.equal(model(**inputs), one)  # different audio per speaker: a different video


@torch.no_grad()
def test_speaker_axes_must_agree(model):
    inputs = make_inputs(model.cfg)
    with pytest.raises(ValueError, match="one mask per speaker"):
        model(**{**inputs, "face_mask": inputs["face_mask"][:, :1]})
    with pytest.raises(ValueError, match="audio_feats must be"):
        model(**{**inputs, "audio_feats": inputs["audio_feats"][..., None]})
