"""Strict DiT loading: official .pt (module / ema), safetensors shards, fp8 + scale map, and refusals."""

from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import save_file

from avatar.config import OFFICIAL_DIT_FILE, OFFICIAL_DIT_FP8_FILE, ModelConfig
from avatar.models.transformer import AvatarDiT
from avatar.weights.files import BadCheckpoint
from avatar.weights.fp8 import FP8Linear
from avatar.weights.layout import expected_state_dict, fp8_map_path
from avatar.weights.load import (
    CheckpointMismatch,
    load_dit,
    save_fp8_checkpoint,
    save_official_checkpoint,
    verify_dit_checkpoint,
)


def tiny_config() -> ModelConfig:
    return ModelConfig(
        name="tiny", hidden_size=64, num_heads=4, depth_double=2, depth_single=2, refiner_depth=1, latent_channels=4,
        rope_axes=[4, 6, 6], text_states_dim=32, text_states_dim_2=16, audio_window=10, audio_layers=3,
        audio_channels=8, audio_proj_dim=32, adapter_dim=32, adapter_after_double=[1],
    )  # fmt: skip


def random_state(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in AvatarDiT(cfg).state_dict().items()}


def inputs(cfg: ModelConfig) -> dict:
    g = torch.Generator().manual_seed(5)
    frames, side = 2, 4
    return dict(
        x=torch.randn(1, cfg.latent_channels, frames, side, side, generator=g),
        t=torch.tensor([600.0]),
        ref_latents=torch.randn(1, cfg.latent_channels, frames, side, side, generator=g),
        text_states=torch.randn(1, 6, cfg.text_states_dim, generator=g),
        text_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
        text_states_2=torch.randn(1, cfg.text_states_dim_2, generator=g),
        audio_feats=torch.randn(
            1, 4 * frames - 3, cfg.audio_window, cfg.audio_layers, cfg.audio_channels, generator=g
        ),
        face_mask=torch.ones(1, 1, 1, side, side),
    )


def assert_state_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key


def test_official_pt_round_trip_module_and_ema(tmp_path):
    cfg = tiny_config()
    module, ema = random_state(cfg, 0), random_state(cfg, 1)
    path = tmp_path / OFFICIAL_DIT_FILE
    path.parent.mkdir(parents=True)
    torch.save({"module": module, "ema": ema}, path)
    assert_state_equal(load_dit(tmp_path, cfg, dtype=torch.float32, device="cpu"), module)
    assert_state_equal(load_dit(tmp_path, cfg, dtype=torch.float32, device="cpu", load_key="ema"), ema)
    assert verify_dit_checkpoint(path, cfg) == []

    model = load_dit(tmp_path, cfg, dtype=torch.bfloat16, device="cpu")
    assert model.before_proj.weight.dtype == torch.float32 and model.img_in.proj.weight.dtype == torch.bfloat16
    assert torch.equal(model.before_proj.weight, module["before_proj.weight"])
    assert torch.equal(model.img_in.proj.weight, module["img_in.proj.weight"].bfloat16())
    assert not any(p.is_meta or p.requires_grad for p in model.parameters())


def test_mismatches_are_all_reported(tmp_path):
    cfg = tiny_config()
    state = random_state(cfg, 0)
    del state["double_blocks.1.img_attn_proj.bias"]
    state["double_blocks.0.extra.weight"] = torch.zeros(3)
    state["single_blocks.1.linear2.weight"] = torch.zeros(64, 7)
    path = save_official_checkpoint(state, tmp_path / OFFICIAL_DIT_FILE)
    with pytest.raises(CheckpointMismatch) as err:
        load_dit(tmp_path, cfg, dtype=torch.float32, device="cpu")
    message = str(err.value)
    assert "3 problems" in message
    assert "missing key double_blocks.1.img_attn_proj.bias (expected (64,) bfloat16" not in message  # fp32 build
    assert "missing key double_blocks.1.img_attn_proj.bias (expected (64,) float32)" in message
    assert "unexpected key double_blocks.0.extra.weight (found (3,) float32)" in message
    assert "wrong shape single_blocks.1.linear2.weight: expected (64, 320) float32, found (64, 7) float32" in message
    problems = verify_dit_checkpoint(path, cfg)
    assert len(problems) == 3 and any("linear2" in p for p in problems)
    with pytest.raises(CheckpointMismatch, match="no 'ema' entry"):
        load_dit(tmp_path, cfg, dtype=torch.float32, device="cpu", load_key="ema")


def test_safetensors_shards(tmp_path):
    cfg = tiny_config()
    state = random_state(cfg, 2)
    keys = sorted(state)
    folder = (tmp_path / OFFICIAL_DIT_FILE).parent
    folder.mkdir(parents=True)
    save_file({k: state[k] for k in keys[:100]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[100:]}, str(folder / "model-00002-of-00002.safetensors"))
    assert_state_equal(load_dit(tmp_path, cfg, dtype=torch.float32, device="cpu"), state)
    assert verify_dit_checkpoint(tmp_path, cfg) == []


def test_fp8_checkpoint_stays_fp8_and_matches(tmp_path):
    cfg = tiny_config()
    state = random_state(cfg, 3)
    path, map_path = save_fp8_checkpoint(state, tmp_path / OFFICIAL_DIT_FP8_FILE)
    assert map_path == fp8_map_path(path) and map_path.name == "mp_rank_00_model_states_fp8_map.pt"
    scales = torch.load(map_path, weights_only=True)["module"]
    weight = state["double_blocks.0.img_attn_qkv.weight"]
    assert torch.equal(scales["double_blocks.0.img_attn_qkv"], weight.abs().max() / 448)
    assert verify_dit_checkpoint(path, cfg, fp8=True) == []

    fp8_model = load_dit(tmp_path, cfg, dtype=torch.float32, device="cpu", fp8=True)
    layer = fp8_model.double_blocks[0].img_attn_qkv
    assert isinstance(layer, FP8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    assert isinstance(fp8_model.single_blocks[1].modulation.linear, FP8Linear)
    assert isinstance(fp8_model.txt_in.input_embedder, torch.nn.Linear)  # outside the blocks: not quantised
    expected = expected_state_dict(cfg, dtype=torch.float32, fp8=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in fp8_model.state_dict().items()} == expected

    reference = AvatarDiT(cfg)
    reference.load_state_dict(state)
    with torch.no_grad():
        exact = reference(**inputs(cfg))
        quantised = fp8_model(**inputs(cfg))
        bf16 = load_dit(tmp_path, cfg, dtype=torch.bfloat16, device="cpu", fp8=True)(**inputs(cfg))
    rel = ((quantised - exact).norm() / exact.norm()).item()
    rel_bf16 = ((bf16.float() - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.02, rel  # measured 0.34 %
    assert rel_bf16 < 0.03, rel_bf16  # measured 0.69 % (bf16 alone: 0.57 %)


def test_fp8_map_must_match(tmp_path):
    cfg = tiny_config()
    path, map_path = save_fp8_checkpoint(random_state(cfg, 4), tmp_path / OFFICIAL_DIT_FP8_FILE)
    scales = torch.load(map_path, weights_only=True)
    del scales["module"]["single_blocks.0.linear1"]
    torch.save(scales, map_path)
    with pytest.raises(CheckpointMismatch, match="missing fp8 scale single_blocks.0.linear1"):
        load_dit(tmp_path, cfg, dtype=torch.float32, device="cpu", fp8=True)
    # A bf16 checkpoint given as fp8: every block Linear weight has the wrong dtype.
    save_official_checkpoint(random_state(cfg, 4), path)
    assert any(
        p.startswith("wrong dtype double_blocks.0.img_mod.linear.weight")
        for p in verify_dit_checkpoint(path, cfg, fp8=True)
    )


class _Payload:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_refuses_pickled_objects(tmp_path):
    cfg = tiny_config()
    marker = tmp_path / "executed"
    path = tmp_path / OFFICIAL_DIT_FILE
    path.parent.mkdir(parents=True)
    torch.save({"module": random_state(cfg, 0), "extra": _Payload(marker)}, path)
    with pytest.raises(BadCheckpoint, match="is not a safe checkpoint.*re-download it$") as err:
        load_dit(tmp_path, cfg, dtype=torch.float32, device="cpu")
    assert not marker.exists() and "weights_only" not in str(err.value)
