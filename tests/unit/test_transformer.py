"""AvatarDiT on a tiny config of the real class: shapes, RoPE, audio-to-frame mapping, masks, cache, dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from avatar.config import ModelConfig
from avatar.models.transformer import (
    SHAPE_CACHE_SIZE,
    AvatarDiT,
    CachedInput,
    apply_rope,
    refiner_pair_mask,
    rope_table,
)

NUM_FRAMES = 3
LATENT = 8
TEXT_LEN = 8


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
        adapter_after_double=[1],
    )


@pytest.fixture(scope="module")
def model() -> AvatarDiT:
    torch.manual_seed(0)
    return AvatarDiT(tiny_config()).eval()


def make_inputs(cfg: ModelConfig, batch: int = 1, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    num_audio = 4 * NUM_FRAMES - 3
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
    mask[:, :5] = 1
    return dict(
        x=torch.randn(batch, cfg.latent_channels, NUM_FRAMES, LATENT, LATENT, generator=g),
        t=torch.full((batch,), 700.0),
        ref_latents=torch.randn(batch, cfg.latent_channels, 1, LATENT, LATENT, generator=g).repeat(
            1, 1, NUM_FRAMES, 1, 1
        ),
        text_states=torch.randn(batch, TEXT_LEN, cfg.text_states_dim, generator=g),
        text_mask=mask,
        text_states_2=torch.randn(batch, cfg.text_states_dim_2, generator=g),
        audio_feats=torch.randn(batch, num_audio, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g),
        face_mask=torch.ones(batch, 1, 1, LATENT, LATENT),
    )


@torch.no_grad()
def test_forward_shapes_and_store(model):
    inputs = make_inputs(model.cfg, batch=2)
    velocity = model(**inputs)
    assert velocity.shape == inputs["x"].shape
    assert torch.isfinite(velocity).all()
    velocity_stored, cached = model(**inputs, cache="store")
    assert torch.equal(velocity_stored, velocity)
    assert isinstance(cached, CachedInput)
    assert cached.img.shape == (2, NUM_FRAMES + 1, (LATENT // 2) ** 2, 64)
    assert cached.txt.shape == (2, TEXT_LEN, 64)


@torch.no_grad()
def test_cache_reuse_at_same_t_reproduces_full_forward(model):
    inputs = make_inputs(model.cfg)
    velocity, cached = model(**inputs, cache="store")
    reused = model(**inputs, cache="reuse", cached=cached)
    assert torch.equal(reused, velocity)
    other_t = model(**{**inputs, "t": torch.tensor([300.0])}, cache="reuse", cached=cached)
    assert not torch.equal(other_t, velocity)


def test_rope_table_reference_frame_first_and_direct_formula():
    cfg = tiny_config()
    cos, sin = rope_table(cfg, NUM_FRAMES, 2, 3)
    assert cos.shape == ((NUM_FRAMES + 1) * 6, 16) and cos.dtype == torch.float32
    offsets = [0, 4, 10]
    for row in range(cos.shape[0]):
        frame, rest = divmod(row, 6)
        positions = (frame - 1, rest // 3, rest % 3)  # frame index 0 is the reference at t = -1
        for axis, (axis_dim, pos) in enumerate(zip(cfg.rope_axes, positions)):
            for d in range(axis_dim):
                angle = pos * cfg.rope_theta ** (-2 * (d // 2) / axis_dim)
                col = offsets[axis] + d
                assert cos[row, col].item() == pytest.approx(math.cos(angle), abs=1e-6)
                assert sin[row, col].item() == pytest.approx(math.sin(angle), abs=1e-6)
    # First frame rows carry t = -1: the t-axis angle of dim 0 is -1.
    assert sin[0, 0].item() == pytest.approx(math.sin(-1.0), abs=1e-6)


def test_rope_rotates_interleaved_pairs_as_complex_numbers():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 2, 8, generator=g)
    angles = torch.randn(5, 4, generator=g)
    cos, sin = angles.cos().repeat_interleave(2, 1), angles.sin().repeat_interleave(2, 1)
    expected = torch.view_as_real(
        torch.view_as_complex(x.unflatten(-1, (4, 2))) * torch.polar(torch.ones_like(angles), angles)[None, :, None]
    )
    torch.testing.assert_close(apply_rope(x, cos, sin), expected.flatten(-2))
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


@torch.no_grad()
def test_audio_frames_map_to_latent_frames(model):
    """Latent frame j hears video frames 4j-3..4j (frame 0 repeated for j = 0); seen at the adapter output, which
    is the only place audio enters."""
    inputs = make_inputs(model.cfg)
    outputs = []
    hook = model.audio_adapter_blocks[0].register_forward_hook(lambda m, a, out: outputs.append(out.clone()))
    try:
        model(**inputs)
        base = outputs.pop()
        expected_latent = {0: 0, 1: 1, 3: 1, 4: 1, 5: 2, 8: 2}
        for video_frame, latent in expected_latent.items():
            audio = inputs["audio_feats"].clone()
            audio[:, video_frame] += 1.0
            model(**{**inputs, "audio_feats": audio})
            changed = [not torch.equal(outputs[-1][:, f], base[:, f]) for f in range(NUM_FRAMES + 1)]
            # Adapter frame 0 is the reference frame; latent j is adapter frame j + 1.
            assert changed == [f == latent + 1 for f in range(NUM_FRAMES + 1)], video_frame
    finally:
        hook.remove()
    velocity = model(**inputs)
    audio = inputs["audio_feats"].clone()
    audio[:, 2] += 1.0
    assert not torch.equal(model(**{**inputs, "audio_feats": audio}), velocity)


@torch.no_grad()
def test_face_mask_zero_removes_audio(model):
    inputs = {**make_inputs(model.cfg), "face_mask": torch.zeros(1, 1, 1, LATENT, LATENT)}
    velocity = model(**inputs)
    silent = model(**{**inputs, "audio_feats": torch.zeros_like(inputs["audio_feats"])})
    assert torch.equal(velocity, silent)


@torch.no_grad()
def test_padded_text_never_reaches_the_image(model):
    inputs = make_inputs(model.cfg)
    velocity = model(**inputs)
    states = inputs["text_states"].clone()
    states[:, 5:] = torch.randn_like(states[:, 5:]) * 10
    assert torch.equal(model(**{**inputs, "text_states": states}), velocity)
    states[:, 4] += 1.0  # a valid token does matter
    assert not torch.equal(model(**{**inputs, "text_states": states}), velocity)


@torch.no_grad()
def test_dit_text_key_mask_is_count_based(model):
    """The DiT keeps the first sum(mask) refined tokens whatever the positional holes (official cu_seqlens)."""
    inputs = {**make_inputs(model.cfg), "text_mask": torch.tensor([[1, 1, 0, 1, 1, 0, 0, 0]])}
    velocity = model(**inputs)

    def perturbed(positions):
        def hook(module, args, out):
            out = out.clone()
            out[:, positions] += 1.0
            return out

        handle = model.txt_in.register_forward_hook(hook)
        try:
            return model(**inputs)
        finally:
            handle.remove()

    assert torch.equal(perturbed([4, 5, 6, 7]), velocity)  # beyond the count of 4
    assert not torch.equal(perturbed([2]), velocity)  # a positional hole inside the count is attended


@torch.no_grad()
def test_text_refiner_positional_mask_quirk(model):
    mask = torch.tensor([[0, 1, 1, 0, 1, 0]])
    pair = refiner_pair_mask(mask)[0, 0]
    for i in range(6):
        for j in range(6):
            assert pair[i, j].item() == (j == 0 or bool(mask[0, i] and mask[0, j]))

    g = torch.Generator().manual_seed(3)
    states = torch.randn(1, 6, model.cfg.text_states_dim, generator=g)
    t = torch.tensor([500.0])
    base = model.txt_in(states, t, mask)
    # A masked position (3) is out of the pool and no one's key: only its own output changes.
    moved = states.clone()
    moved[:, 3] += 1.0
    out = model.txt_in(moved, t, mask)
    assert torch.equal(out[:, [0, 1, 2, 4, 5]], base[:, [0, 1, 2, 4, 5]])
    assert not torch.equal(out[:, 3], base[:, 3])
    # Position 0 is masked but every query may see it as a key: every output changes.
    moved = states.clone()
    moved[:, 0] += 1.0
    out = model.txt_in(moved, t, mask)
    assert all(not torch.equal(out[:, i], base[:, i]) for i in range(6))
    # A masked query sees key 0 only.
    qkv_in = model.txt_in.input_embedder(states)
    block = model.txt_in.individual_token_refiner.blocks[0]
    attn_in = block.norm1(qkv_in)
    v0 = block.self_attn_qkv(attn_in)[:, 0].unflatten(-1, (3, -1))[:, 2]
    c = model.txt_in.t_embedder(t) + model.txt_in.c_embedder((states * mask[..., None]).sum(1) / mask.sum())
    gate_msa = block.adaLN_modulation(c).chunk(2, dim=-1)[0]
    after_attn = qkv_in[:, 5] + block.self_attn_proj(v0) * gate_msa
    gate_mlp = block.adaLN_modulation(c).chunk(2, dim=-1)[1]
    expected = after_attn + block.mlp(block.norm2(after_attn)) * gate_mlp
    torch.testing.assert_close(base[:, 5], expected)


def test_fp32_modules_stay_fp32_in_bf16_build():
    torch.manual_seed(0)
    model = AvatarDiT(tiny_config(), dtype=torch.bfloat16)
    fp32_prefixes = ("before_proj.", "audio_proj.", "audio_adapter_blocks.", "final_layer.linear.")
    for name, param in model.named_parameters():
        expected = torch.float32 if name.startswith(fp32_prefixes) else torch.bfloat16
        assert param.dtype == expected, name
    with torch.no_grad():
        velocity = model(**make_inputs(model.cfg))
    assert torch.isfinite(velocity).all()


def test_rejects_wrong_audio_length(model):
    inputs = make_inputs(model.cfg)
    inputs["audio_feats"] = inputs["audio_feats"][:, :-1]
    with pytest.raises(ValueError, match="audio_feats"):
        model(**inputs)


def test_all_official_adapters_load_strictly_into_a_shallower_model_and_extra_ones_never_run(tmp_path):
    """The official constructor builds all 10 adapters (after double blocks 1, 3, …, 19) and runs those whose block
    exists: a checkpoint with all of them loads strictly into a 2-double-block test model, and the adapters past the
    depth do not change the output."""
    from dataclasses import replace

    from avatar.weights.load import load_dit, save_official_checkpoint

    cfg = replace(tiny_config(), adapter_after_double=list(range(1, 20, 2)))
    torch.manual_seed(0)
    source = AvatarDiT(cfg).eval()
    assert len(source.audio_adapter_blocks) == 10 and source.adapter_index == {1: 0}
    path = tmp_path / "ckpts" / "hunyuan-video-t2v-720p" / "transformers" / "mp_rank_00_model_states.pt"
    path.parent.mkdir(parents=True)
    save_official_checkpoint(source.state_dict(), path)
    loaded = load_dit(tmp_path, cfg, dtype=torch.float32, device="cpu").eval()
    inputs = make_inputs(cfg)
    with torch.no_grad():
        before = loaded(**inputs)
        for adapter in loaded.audio_adapter_blocks[1:]:
            for p in adapter.parameters():
                p.add_(torch.randn_like(p))
        assert torch.equal(loaded(**inputs), before)
        for p in loaded.audio_adapter_blocks[0].parameters():
            p.add_(torch.randn_like(p))
        assert not torch.equal(loaded(**inputs), before)
    with pytest.raises(ValueError, match="adapter_after_double"):
        AvatarDiT(replace(cfg, adapter_after_double=[-1]))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_chunked_forward_is_bit_identical(dtype):
    """Chunked linear1/MLP/linear2 (uneven chunks, a chunk per frame, one chunk) == the whole-sequence forward."""
    torch.manual_seed(0)
    model = AvatarDiT(tiny_config(), dtype=dtype).eval()
    inputs = make_inputs(model.cfg, batch=2)
    whole, whole_cached = model(**inputs, cache="store")
    for chunk in (16, 40, 1000):
        model.set_token_chunk(chunk)
        chunked, chunked_cached = model(**inputs, cache="store")
        assert torch.equal(chunked, whole), chunk
        assert torch.equal(chunked_cached.img, whole_cached.img), chunk
    model.set_token_chunk(None)
    with pytest.raises(ValueError, match="token chunk"):
        model.set_token_chunk(0)


@torch.no_grad()
def test_shape_tables_built_once_per_shape_and_reused_bit_identically():
    """A second forward of a shape (and its cached steps) reuses the RoPE tables; a new shape builds its own; the
    cache keeps the last SHAPE_CACHE_SIZE shapes; outputs equal those of a model that builds them afresh."""
    torch.manual_seed(0)
    model = AvatarDiT(tiny_config()).eval()
    inputs = make_inputs(model.cfg)
    first, cached = model(**inputs, cache="store")
    assert model.num_table_builds == 1
    second = model(**inputs)
    reused = model(**inputs, cache="reuse", cached=cached)
    assert model.num_table_builds == 1
    assert torch.equal(second, first) and torch.equal(reused, first)
    cos, sin = rope_table(model.cfg, NUM_FRAMES, LATENT // 2, LATENT // 2)
    ((rope_cos, rope_sin),) = model._tables.values()
    assert torch.equal(rope_cos, cos) and torch.equal(rope_sin, sin)

    # Other shapes: each built once; the first shape's entry is dropped after SHAPE_CACHE_SIZE newer ones.
    channels = model.cfg.latent_channels
    for count, side in enumerate((2, 4, 6, 10)[:SHAPE_CACHE_SIZE], start=1):
        model(
            **{
                **inputs,
                "x": torch.randn(1, channels, NUM_FRAMES, side, side),
                "ref_latents": torch.randn(1, channels, NUM_FRAMES, side, side),
                "face_mask": torch.ones(1, 1, 1, side, side),
            }
        )
        assert model.num_table_builds == 1 + count
        assert len(model._tables) == min(1 + count, SHAPE_CACHE_SIZE)
    assert model(**inputs) is not None and model.num_table_builds == 2 + SHAPE_CACHE_SIZE  # dropped, rebuilt
    model._tables.clear()
    assert torch.equal(model(**inputs), first)
    model.set_sequence_parallel(model.seq)
    assert not model._tables
