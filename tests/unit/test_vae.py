"""VAE: official-format loading, reference encoding, and our temporal tiling against diffusers' own decode."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from avatar.config import ModelConfig
from avatar.io.errors import InputError
from avatar.models.vae import (
    blend_and_emit,
    blend_frames_of,
    configure_tiling,
    decode_tiles,
    decode_video,
    encode_reference,
    iter_decoded_frames,
    load_vae,
    plan_for_vae,
    plan_temporal_tiles,
    reference_pixels,
)
from avatar.weights.tiny_cond import make_tiny_vae

ROOT = Path(__file__).resolve().parents[2]


def tiny_config() -> ModelConfig:
    """The tiny model with small VAE tiles (16/12 frames, 64/48 px), so short test videos cross several tiles."""
    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / "configs/model/tiny.yaml"))
    )
    return replace(cfg, vae_tile_frames=16, vae_tile_stride_frames=12, vae_tile_size=64, vae_tile_stride=48)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("weights"), tiny_config(), seed=5)


@pytest.fixture(scope="module")
def vae(vae_dir):
    model = load_vae(vae_dir, dtype=torch.float32)
    configure_tiling(model, tiny_config())
    return model


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    # 9 latent frames (33 video frames) at 10×10 (80×80 px): 3 temporal tiles, each tiled spatially (64 px tiles).
    return torch.randn(1, 4, 9, 10, 10, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def whole(vae, latents) -> torch.Tensor:
    return decode_video(vae, latents)


def test_official_layout_loads_strictly_and_round_trips(vae_dir, tmp_path):
    checkpoint = torch.load(vae_dir / "pytorch_model.pt", weights_only=True)
    assert set(checkpoint) == {"state_dict"}
    assert all(k.startswith("vae.") for k in checkpoint["state_dict"])
    model = load_vae(vae_dir, dtype=torch.float32)
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"]["vae." + key]), key
    assert model.spatial_compression_ratio == 8 and model.temporal_compression_ratio == 4
    assert model.config.latent_channels == 4
    # a diffusers save_pretrained folder loads too
    model.save_pretrained(tmp_path / "diffusers_vae")
    again = load_vae(tmp_path / "diffusers_vae", dtype=torch.float32)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    # a bare state dict without the prefix and wrapper is accepted; a missing key is not
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((vae_dir / "config.json").read_text())
    torch.save(model.state_dict(), bare / "pytorch_model.pt")
    assert torch.equal(load_vae(bare, torch.float32).decoder.conv_out.conv.weight, model.decoder.conv_out.conv.weight)
    state = model.state_dict()
    state.pop("decoder.conv_out.conv.bias")
    torch.save(state, bare / "pytorch_model.pt")
    with pytest.raises(RuntimeError, match="conv_out"):
        load_vae(bare, torch.float32)


def test_official_config_names_are_mapped(tmp_path, vae_dir):
    raw = json.loads((vae_dir / "config.json").read_text())
    official = {k: v for k, v in raw.items() if k not in ("temporal_compression_ratio", "spatial_compression_ratio")}
    official.update(
        _class_name="AutoencoderKLCausal3D",
        time_compression_ratio=4,
        down_block_types=["DownEncoderBlockCausal3D"] * 4,
        up_block_types=["UpDecoderBlockCausal3D"] * 4,
        sample_tsize=64,
    )
    (tmp_path / "config.json").write_text(json.dumps(official))
    (tmp_path / "pytorch_model.pt").write_bytes((vae_dir / "pytorch_model.pt").read_bytes())
    model = load_vae(tmp_path, torch.float32)
    assert model.spatial_compression_ratio == 8 and model.temporal_compression_ratio == 4


def test_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        load_vae(tmp_path / "nowhere")


def test_tiny_vae_decodes_to_varied_pixels(vae):
    with torch.no_grad():
        video = vae.decode(torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(1))).sample
    assert video.shape == (1, 3, 1, 64, 64)
    assert video.clamp(-1, 1).std() > 0.1


def test_plan_matches_diffusers_tiles():
    # official sizes: 33 latents, tiles of 16+1 every 12, the 1-latent tile at 36 does not exist (33 < 36)
    tiles = plan_temporal_tiles(33, 16, 12)
    assert [(t.latent_start, t.latent_stop) for t in tiles] == [(0, 17), (12, 29), (24, 33)]
    assert [(t.frame_start, t.frame_stop, t.emit_stop) for t in tiles] == [(0, 65, 49), (49, 113, 97), (97, 129, 129)]
    # 25 latents: the tile at 24 would hold one latent, i.e. only its dropped first frame
    assert [(t.latent_start, t.latent_stop) for t in plan_temporal_tiles(25, 16, 12)] == [(0, 17), (12, 25)]
    # short videos are one tile
    assert [(t.frame_start, t.frame_stop, t.emit_stop) for t in plan_temporal_tiles(16, 16, 12)] == [(0, 61, 61)]
    with pytest.raises(InputError):
        plan_temporal_tiles(33, 12, 16)


def test_tiled_decode_equals_diffusers_decode(vae, latents, whole):
    tiles = plan_for_vae(vae, latents.shape[2])
    assert len(tiles) == 3
    with torch.no_grad():
        reference = vae.decode(latents).sample
    ours = whole
    assert ours.shape == reference.shape == (1, 3, 33, 80, 80)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_tiles_decoded_apart_then_blended_equal_the_whole(vae, latents, whole):
    tiles = plan_for_vae(vae, latents.shape[2])
    # as if rank 0 decoded tiles 0 and 2 and rank 1 tile 1
    decoded = {**decode_tiles(vae, latents, tiles, [2, 0]), **decode_tiles(vae, latents, tiles, [1])}
    blended = torch.cat(list(blend_and_emit(tiles, decoded, blend_frames_of(vae))), dim=2)
    assert torch.equal(blended, whole)


def test_streaming_decode_equals_the_whole(vae, latents, whole):
    chunks = list(iter_decoded_frames(vae, latents))
    assert [c.shape[1] for c in chunks] == [13, 12, 8]
    assert all(c.dtype == torch.float32 and c.shape[0] == 3 for c in chunks)
    torch.testing.assert_close(torch.cat(chunks, dim=1)[None], whole, atol=0, rtol=0)


def test_encode_reference_shape_and_generator(vae):
    pixels = reference_pixels(torch.randint(0, 256, (48, 64, 3), dtype=torch.uint8).numpy(), num_frames=9)
    assert pixels.shape == (1, 3, 9, 48, 64) and -1.0 <= pixels.min() and pixels.max() <= 1.0
    first = encode_reference(vae, pixels, torch.Generator().manual_seed(7))
    again = encode_reference(vae, pixels, torch.Generator().manual_seed(7))
    other = encode_reference(vae, pixels, torch.Generator().manual_seed(8))
    mean = encode_reference(vae, pixels)
    assert first.shape == (1, 4, 3, 6, 8) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    with torch.no_grad():
        expected_mean = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(mean, expected_mean)
