"""The full-size DiT (ModelConfig defaults) on the meta device against the dossier's §3.1/§3.2 facts."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from avatar.config import ModelConfig
from avatar.models.transformer import AvatarDiT

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = AvatarDiT(ModelConfig(name="hunyuan_avatar"), dtype=BF16)
    return model.state_dict()


def test_key_and_parameter_counts(state):
    assert len(state) == 946
    assert sum(t.numel() for t in state.values()) == 12_991_493_184


def test_per_module_breakdown(state):
    millions = defaultdict(int)
    for key, tensor in state.items():
        millions[key.split(".")[0]] += tensor.numel()
    expected = {
        "double_blocks": 6796.6, "single_blocks": 5663.7, "txt_in": 309.2, "final_layer": 19.1, "vector_in": 11.8,
        "time_in": 10.2, "fps_proj": 10.2, "audio_adapter_blocks": 126.0, "audio_proj": 33.3, "before_proj": 9.4,
        "motion_exp": 0.8, "motion_pose": 0.8, "img_in": 0.2, "ref_in": 0.2,
    }  # fmt: skip
    assert {name: round(count / 1e6, 1) for name, count in millions.items()} == expected


SPOT_CHECKS = {
    "img_in.proj.weight": ((3072, 16, 1, 2, 2), BF16),
    "img_in.proj.bias": ((3072,), BF16),
    "ref_in.proj.weight": ((3072, 16, 1, 2, 2), BF16),
    "before_proj.weight": ((3072, 3072), FP32),
    "before_proj.bias": ((3072,), FP32),
    "txt_in.input_embedder.weight": ((3072, 4096), BF16),
    "txt_in.t_embedder.mlp.0.weight": ((3072, 256), BF16),
    "txt_in.t_embedder.mlp.2.weight": ((3072, 3072), BF16),
    "txt_in.c_embedder.linear_1.weight": ((3072, 4096), BF16),
    "txt_in.c_embedder.linear_2.weight": ((3072, 3072), BF16),
    "txt_in.individual_token_refiner.blocks.1.norm1.weight": ((3072,), BF16),
    "txt_in.individual_token_refiner.blocks.1.norm2.bias": ((3072,), BF16),
    "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight": ((9216, 3072), BF16),
    "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.bias": ((9216,), BF16),
    "txt_in.individual_token_refiner.blocks.0.self_attn_proj.weight": ((3072, 3072), BF16),
    "txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight": ((12288, 3072), BF16),
    "txt_in.individual_token_refiner.blocks.0.mlp.fc2.weight": ((3072, 12288), BF16),
    "txt_in.individual_token_refiner.blocks.1.adaLN_modulation.1.weight": ((6144, 3072), BF16),
    "time_in.mlp.0.weight": ((3072, 256), BF16),
    "time_in.mlp.2.weight": ((3072, 3072), BF16),
    "vector_in.in_layer.weight": ((3072, 768), BF16),
    "vector_in.out_layer.weight": ((3072, 3072), BF16),
    "double_blocks.19.img_mod.linear.weight": ((18432, 3072), BF16),
    "double_blocks.0.txt_mod.linear.bias": ((18432,), BF16),
    "double_blocks.0.img_attn_qkv.weight": ((9216, 3072), BF16),
    "double_blocks.0.txt_attn_qkv.bias": ((9216,), BF16),
    "double_blocks.0.img_attn_q_norm.weight": ((128,), BF16),
    "double_blocks.0.img_attn_k_norm.weight": ((128,), BF16),
    "double_blocks.0.txt_attn_q_norm.weight": ((128,), BF16),
    "double_blocks.0.txt_attn_k_norm.weight": ((128,), BF16),
    "double_blocks.0.img_attn_proj.weight": ((3072, 3072), BF16),
    "double_blocks.0.txt_attn_proj.weight": ((3072, 3072), BF16),
    "double_blocks.0.img_mlp.fc1.weight": ((12288, 3072), BF16),
    "double_blocks.0.txt_mlp.fc2.weight": ((3072, 12288), BF16),
    "single_blocks.39.linear1.weight": ((21504, 3072), BF16),
    "single_blocks.39.linear1.bias": ((21504,), BF16),
    "single_blocks.0.linear2.weight": ((3072, 15360), BF16),
    "single_blocks.0.q_norm.weight": ((128,), BF16),
    "single_blocks.0.k_norm.weight": ((128,), BF16),
    "single_blocks.0.modulation.linear.weight": ((9216, 3072), BF16),
    "final_layer.adaLN_modulation.1.weight": ((6144, 3072), BF16),
    "final_layer.linear.weight": ((64, 3072), FP32),
    "final_layer.linear.bias": ((64,), FP32),
    "audio_proj.proj1.weight": ((1024, 19200), FP32),
    "audio_proj.proj2.weight": ((1024, 1024), FP32),
    "audio_proj.proj3.weight": ((12288, 1024), FP32),
    "audio_proj.proj3.bias": ((12288,), FP32),
    "audio_proj.norm.weight": ((3072,), FP32),
    "motion_exp.mlp.0.weight": ((768, 256), BF16),
    "motion_exp.mlp.2.weight": ((768, 768), BF16),
    "motion_pose.mlp.2.bias": ((768,), BF16),
    "fps_proj.mlp.0.weight": ((3072, 256), BF16),
    "fps_proj.mlp.2.weight": ((3072, 3072), BF16),
    "audio_adapter_blocks.9.norm1.weight": ((3072,), FP32),
    "audio_adapter_blocks.9.norm2.bias": ((3072,), FP32),
    "audio_adapter_blocks.0.to_q.weight": ((1024, 3072), FP32),
    "audio_adapter_blocks.0.to_kv.weight": ((2048, 3072), FP32),
    "audio_adapter_blocks.0.to_out.weight": ((3072, 1024), FP32),
}


def test_official_names_shapes_dtypes(state):
    for key, (shape, dtype) in SPOT_CHECKS.items():
        assert key in state, key
        assert (tuple(state[key].shape), state[key].dtype) == (shape, dtype), key


def test_key_families_and_absent_keys(state):
    assert sum(k.startswith("double_blocks.") and k.endswith(".img_mod.linear.weight") for k in state) == 20
    assert sum(k.startswith("single_blocks.") and k.endswith(".linear1.weight") for k in state) == 40
    assert sum(k.endswith(".to_q.weight") for k in state) == 10
    assert (
        sum(k.startswith("txt_in.individual_token_refiner.blocks.") and k.endswith("norm1.weight") for k in state) == 2
    )
    # Bias-free adapters, affine-free LayerNorms, no guidance embedding.
    assert not any(
        k.startswith("audio_adapter_blocks.") and k.endswith(("to_q.bias", "to_kv.bias", "to_out.bias")) for k in state
    )
    assert not any(
        ".img_norm1." in k or ".pre_norm." in k or "norm_final" in k or k.startswith("guidance_in") for k in state
    )
    fp32 = {k for k, t in state.items() if t.dtype == FP32}
    assert fp32 == {
        k
        for k in state
        if k.startswith(("before_proj.", "audio_proj.", "audio_adapter_blocks.", "final_layer.linear."))
    }
