"""Text conditioning on tiny real LLaVA/CLIP folders: shapes, the official quirky mask, the crop, the image merge."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from avatar.config import OFFICIAL_CLIP_DIR, OFFICIAL_LLAVA_DIR, ModelConfig
from avatar.io.errors import InputError
from avatar.models.text import (
    PROMPT_TEMPLATE_VIDEO,
    TextEmbedding,
    TextEncoder,
    template_crop_start,
    template_prefix,
    text_seq_len,
)
from avatar.weights.tiny_text import make_tiny_clip, make_tiny_llava

ROOT = Path(__file__).resolve().parents[2]


def tiny_config() -> ModelConfig:
    return OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / "configs/model/tiny.yaml"))
    )


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text-weights")
    cfg = tiny_config()
    make_tiny_llava(root, cfg, seed=5)
    make_tiny_clip(root, cfg, seed=5)
    return root


@pytest.fixture(scope="module")
def encoder(weights) -> TextEncoder:
    return TextEncoder(weights / OFFICIAL_LLAVA_DIR, weights / OFFICIAL_CLIP_DIR, tiny_config())


def portrait(color=(200, 120, 90), size=(48, 64)) -> Image.Image:
    img = Image.new("RGB", size, color)
    img.paste((30, 40, 50), (10, 10, 30, 40))
    return img


def test_template_is_the_official_one():
    assert PROMPT_TEMPLATE_VIDEO.count("{}") == 1
    assert template_prefix().endswith("<|start_header_id|>user<|end_header_id|>\n\n")
    assert PROMPT_TEMPLATE_VIDEO.endswith("{}<|eot_id|>")
    assert text_seq_len(ModelConfig(name="x")) == 831  # official 256 + 576 - 1


def test_tiny_config_crop_matches_the_tiny_tokenizer(encoder):
    crop = template_crop_start(encoder.tokenizer)
    assert crop == tiny_config().text_crop_start
    assert crop > 50  # the whole system prompt, not a token or two
    ids, _ = encoder.tokenize("alpha beta")
    tokens = encoder.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert tokens[0] == "<|begin_of_text|>"
    assert tokens[crop - 3 : crop] == ["<|start_header_id|>", "user", "<|end_header_id|>"]
    assert tokens[crop : crop + 2] == ["alpha", "beta"]


def test_shapes_dtypes_and_quirky_mask(encoder):
    cfg = encoder.cfg
    emb = encoder.encode("A person is speaking to the camera.", portrait())
    assert isinstance(emb, TextEmbedding)
    length = cfg.text_len + cfg.text_image_tokens - 1
    assert emb.states.shape == (1, length, cfg.text_states_dim) and emb.states.dtype == torch.float32
    assert emb.mask.shape == (1, length) and emb.mask.dtype == torch.long
    assert emb.pooled.shape == (1, cfg.text_states_dim_2) and emb.pooled.dtype == torch.float32
    assert torch.isfinite(emb.states).all() and torch.isfinite(emb.pooled).all()

    _, token_mask = encoder.tokenize("A person is speaking to the camera.")
    valid = int(token_mask.sum())  # BOS + template + prompt + suffix incl. the one <image> token
    prompt_part = valid - cfg.text_crop_start
    # official: cat(token mask, ones(N - 1))[crop:] = [1 x prompt part, 0 x pads, 1 x (N - 1)]
    expected = [1] * prompt_part + [0] * (cfg.text_len - prompt_part) + [1] * (cfg.text_image_tokens - 1)
    assert emb.mask[0].tolist() == expected
    # the count equals the real number of attended positions after the crop (text + N image features)
    assert int(emb.mask.sum()) == (valid - 1) + cfg.text_image_tokens - cfg.text_crop_start


def test_prompts_change_states_from_the_first_differing_token_only(encoder):
    img = portrait()
    a = encoder.encode("alpha beta gamma", img)
    b = encoder.encode("alpha beta delta", img)
    c = encoder.encode("delta beta gamma", img)
    # The crop starts exactly at the prompt: position 0 is the first prompt word (causal LM, so positions before the
    # first differing word are identical and the differing one is not).
    assert torch.equal(a.states[:, :2], b.states[:, :2])
    assert not torch.allclose(a.states[:, 2], b.states[:, 2])
    assert not torch.allclose(a.states[:, 0], c.states[:, 0])
    assert not torch.allclose(a.pooled, b.pooled)


def test_image_is_merged_at_the_image_token(encoder):
    cfg = encoder.cfg
    prompt = "A man talks in a studio."
    a = encoder.encode(prompt, portrait((200, 120, 90)))
    b = encoder.encode(prompt, portrait((20, 180, 240)))
    ids, _ = encoder.tokenize(prompt)
    pos = int((ids[0] == encoder.image_token_id).nonzero()[0, 0]) - cfg.text_crop_start
    # text before the image is untouched; the image features and everything after them change
    assert torch.equal(a.states[:, :pos], b.states[:, :pos])
    for i in range(pos, pos + cfg.text_image_tokens):
        assert not torch.allclose(a.states[:, i], b.states[:, i])
    assert torch.equal(a.pooled, b.pooled)  # CLIP never sees the image
    assert torch.equal(a.mask, b.mask)


def test_merge_matches_transformers_expanded_image_tokens(encoder):
    """Our legacy merge equals the current transformers LLaVA forward on a prompt whose <image> token is expanded to
    N tokens, at every non-pad position (pads differ only by the legacy zero-embedding/position quirks)."""
    cfg = encoder.cfg
    prompt = "A woman smiles at the camera."
    img = portrait()
    ids, token_mask = encoder.tokenize(prompt)
    pos = int((ids[0] == encoder.image_token_id).nonzero()[0, 0])
    n = cfg.text_image_tokens
    expanded = torch.cat([ids[:, :pos], ids[:, pos : pos + 1].repeat(1, n), ids[:, pos + 1 :]], dim=1)
    mask = torch.cat([token_mask[:, :pos], torch.ones(1, n, dtype=torch.long), token_mask[:, pos + 1 :]], dim=1)
    from avatar.models.text import llava_pixels

    with torch.no_grad():
        out = encoder.llava(
            input_ids=expanded,
            attention_mask=mask,
            pixel_values=llava_pixels(img, cfg.llava_image_size),
            output_hidden_states=True,
        )
    ref = out.hidden_states[cfg.text_hidden_layer][:, cfg.text_crop_start :]
    ours = encoder.encode(prompt, img).states
    real = int(mask.sum()) - cfg.text_crop_start
    torch.testing.assert_close(ours[:, :real], ref[:, :real], rtol=1e-5, atol=1e-6)


def test_deterministic_across_loads_and_seeds(weights, encoder, tmp_path):
    img = portrait()
    first = encoder.encode("alpha beta", img)
    again = TextEncoder(weights / OFFICIAL_LLAVA_DIR, weights / OFFICIAL_CLIP_DIR, tiny_config()).encode(
        "alpha beta", img
    )
    assert torch.equal(first.states, again.states) and torch.equal(first.pooled, again.pooled)
    cfg = tiny_config()
    make_tiny_llava(tmp_path, cfg, seed=5)
    make_tiny_clip(tmp_path, cfg, seed=5)
    for sub in (OFFICIAL_LLAVA_DIR, OFFICIAL_CLIP_DIR):
        assert (tmp_path / sub / "model.safetensors").read_bytes() == (
            weights / sub / "model.safetensors"
        ).read_bytes()
    make_tiny_llava(tmp_path / "other", cfg, seed=6)
    other = (tmp_path / "other" / OFFICIAL_LLAVA_DIR / "model.safetensors").read_bytes()
    assert other != (weights / OFFICIAL_LLAVA_DIR / "model.safetensors").read_bytes()


def test_long_prompt_keeps_the_image_token(encoder):
    cfg = encoder.cfg
    long_prompt = " ".join(["person"] * (cfg.text_len + 10))
    ids, mask = encoder.tokenize(long_prompt)
    assert ids.shape == (1, cfg.text_len + cfg.text_crop_start) and int(mask.sum()) == ids.shape[1]
    assert int((ids == encoder.image_token_id).sum()) == 1
    emb = encoder.encode(long_prompt, portrait())
    assert emb.states.shape[1] == cfg.text_len + cfg.text_image_tokens - 1
    assert int(emb.mask.sum()) == emb.mask.shape[1]


def test_prompt_with_image_token_is_rejected(encoder):
    with pytest.raises(InputError, match="<image>"):
        encoder.encode("look <image> here", portrait())


def test_missing_or_broken_folder_names_it(weights, tmp_path):
    cfg = tiny_config()
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match="nope") as err:
        TextEncoder(missing, weights / OFFICIAL_CLIP_DIR, cfg)
    assert "LLaVA" in str(err.value)
    with pytest.raises(InputError, match="CLIP") as err:
        TextEncoder(weights / OFFICIAL_LLAVA_DIR, missing, cfg)
    assert str(missing) in str(err.value)
    broken = tmp_path / "broken"
    shutil.copytree(weights / OFFICIAL_LLAVA_DIR, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="broken"):
        TextEncoder(broken, weights / OFFICIAL_CLIP_DIR, cfg)
