"""Text conditioning: LLaVA-Llama-3 hidden states with the reference image, and CLIP-L pooled (§3.5 of the dossier).

The official encoder depends on transformers' *legacy* LLaVA path (≤ 4.46), which expands the single ``<image>``
token of the prompt into the image features in place; current transformers refuse a prompt with one ``<image>`` token
and 576 features. Here our own code does that merge (embed the tokens, splice the projected vision features in at the
``<image>`` position) and runs only the language model, so any current transformers reproduces the official states.

Official quirks reproduced on purpose (each also noted where it happens):

* the prompt goes into ``PROMPT_TEMPLATE_VIDEO`` and gets ``"\\nThe person looks like<image>"`` appended;
* the tokenizer pads on the right to ``text_len + text_crop_start`` tokens (official 256 + 95 = 351);
* legacy merge: pad-token embeddings are zeroed, position ids are ``cumsum(mask) - 1`` with padded positions set to 1;
* hidden state ``hidden_states[text_hidden_layer]`` (−3: skip the last two layers, no final norm);
* the first ``text_crop_start`` positions (BOS + system prompt + user header) are cropped: L = text_len + N − 1 with
  N = ``text_image_tokens`` (official 831);
* the returned mask is the *token* mask concatenated with N − 1 ones and cropped the same way, i.e. positionally
  ``[1 × prompt tokens, 0 × pads, 1 × (N − 1)]`` while the states are laid out ``[prompt, N image features, pads]``:
  the count is right, the positions are not. The DiT's refiner uses it positionally, as the official one does.

CLIP-L gets the raw prompt (no template, no image), padded to ``clip_max_length``; ``pooler_output`` is returned.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from avatar.config import ModelConfig
from avatar.io.errors import InputError

log = logging.getLogger(__name__)

#: The official ``li-dit-encode-video`` template (hymm_sp/constants.py). ``{}`` is replaced by the prompt. The text
#: must match character for character: the crop length (95 for the Llama-3 tokenizer) is counted on it.
PROMPT_TEMPLATE_VIDEO = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
#: Appended after the filled template (official ``text2tokens`` with ``name='person'``).
IMAGE_SUFFIX = "\nThe person looks like<image>"
#: The placeholder token the image features replace.
IMAGE_TOKEN = "<image>"
#: CLIP normalisation of the official LLaVA image transform (used when the folder has no preprocessor config).
CLIP_MEAN = (0.48145466, 0.4578275, 0.4082107)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TextEmbedding:
    """One prompt's conditioning, in float32 on the encoder's device.

    ``states``: [1, L, text_states_dim] LLaVA hidden states, L = text_len + text_image_tokens − 1 (official 831).
    ``mask``: [1, L] long, the official positional mask (see the module docstring).
    ``pooled``: [1, text_states_dim_2] CLIP pooled output.
    """

    states: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def text_seq_len(cfg: ModelConfig) -> int:
    """Length L of the LLaVA states and mask: ``text_len + text_image_tokens - 1`` (official 256 + 575 = 831)."""
    return cfg.text_len + cfg.text_image_tokens - 1


def template_prefix() -> str:
    """The template text before the prompt (system turn + user header)."""
    return PROMPT_TEMPLATE_VIDEO.split("{}")[0]


def template_crop_start(tokenizer) -> int:
    """Tokens before the prompt: BOS plus the tokenized ``template_prefix()`` (the official crop_start, 95 for the
    Llama-3 tokenizer). The prefix ends with a special token + ``\\n\\n``, so its tokens are a prefix of the tokens of
    any filled template."""
    return len(tokenizer(template_prefix(), add_special_tokens=True)["input_ids"])


def llava_pixels(image: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """The official LLaVA image transform: RGB, resize to (size, size) bilinear (no aspect keep, no centre crop),
    /255, normalise. Returns [1, 3, size, size] float32."""
    rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def _check_folder(folder: Path, what: str, expected: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} folder {folder} does not exist; expected {expected}")
    if not (folder / "config.json").is_file():
        raise InputError(f"{what} folder {folder} has no config.json; expected {expected}")
    return folder


class TextEncoder:
    """LLaVA-Llama (with the reference image) + CLIP-L text encoders, from ``save_pretrained`` folders."""

    def __init__(
        self,
        llava_dir: str | Path,
        clip_dir: str | Path,
        model_cfg: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, LlavaForConditionalGeneration

        self.cfg = model_cfg
        self.dtype = dtype
        self.device = torch.device(device)
        llava_dir = _check_folder(
            llava_dir,
            "LLaVA text encoder",
            "a LlavaForConditionalGeneration save_pretrained folder with its tokenizer",
        )
        clip_dir = _check_folder(
            clip_dir, "CLIP text encoder", "a CLIPTextModel save_pretrained folder with its tokenizer"
        )
        self.llava_dir, self.clip_dir = llava_dir, clip_dir

        try:
            config = AutoConfig.from_pretrained(llava_dir, local_files_only=True)
            if getattr(config, "vision_config", None) is None:
                raise ValueError(f"config model_type {config.model_type!r} has no vision tower")
            self.llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=dtype, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(llava_dir, padding_side="right", local_files_only=True)
        except InputError:
            raise
        except Exception as err:  # any loader failure means a broken folder
            raise InputError(
                f"LLaVA text encoder folder {llava_dir} cannot be loaded ({type(err).__name__}: {err}); expected a "
                "LlavaForConditionalGeneration save_pretrained folder with its tokenizer"
            ) from err
        try:
            self.clip = CLIPTextModel.from_pretrained(clip_dir, dtype=dtype, local_files_only=True)
            self.clip_tokenizer = AutoTokenizer.from_pretrained(clip_dir, local_files_only=True)
        except Exception as err:
            raise InputError(
                f"CLIP text encoder folder {clip_dir} cannot be loaded ({type(err).__name__}: {err}); expected a "
                "CLIPTextModel save_pretrained folder with its tokenizer"
            ) from err

        self.llava.requires_grad_(False).eval().to(self.device)
        self.clip.requires_grad_(False).eval().to(self.device)
        lcfg = self.llava.config
        self.image_token_id = self._image_token_id(lcfg)
        # Legacy merge zeroed the embeddings where input_ids == LlavaForConditionalGeneration.pad_token_id, i.e. the
        # model config's pad_token_id (-1, nothing zeroed, when the config has none).
        pad = getattr(lcfg, "pad_token_id", None)
        if pad is None:
            pad = getattr(lcfg.text_config, "pad_token_id", None)
        self.model_pad_id = -1 if pad is None else int(pad)
        if self.tokenizer.pad_token_id is None:
            raise InputError(
                f"LLaVA tokenizer in {llava_dir} has no pad token; expected one (padding is to the right)"
            )
        self.vision_layer = lcfg.vision_feature_layer
        self.vision_strategy = lcfg.vision_feature_select_strategy
        self.pixel_mean, self.pixel_std = self._pixel_norm(llava_dir)
        self.crop_start = model_cfg.text_crop_start
        self.max_tokens = model_cfg.text_len + model_cfg.text_crop_start
        measured = template_crop_start(self.tokenizer)
        if measured != self.crop_start:
            log.warning(
                "text_crop_start=%d but the tokenizer in %s puts %d tokens before the prompt; the states will %s",
                self.crop_start,
                llava_dir,
                measured,
                "keep template tokens" if measured > self.crop_start else "lose prompt tokens",
            )
        self._suffix_ids = self.tokenizer(IMAGE_SUFFIX, add_special_tokens=False)["input_ids"]

    # --- helpers ----------------------------------------------------------------------------------------------------

    def _image_token_id(self, lcfg) -> int:
        for name in ("image_token_id", "image_token_index"):
            value = getattr(lcfg, name, None)
            if value is not None:
                return int(value)
        value = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if value is None or value == self.tokenizer.unk_token_id:
            raise InputError(
                f"LLaVA folder {self.llava_dir}: neither the config nor the tokenizer defines {IMAGE_TOKEN}"
            )
        return int(value)

    def _inner(self):
        """The module holding ``vision_tower``, ``multi_modal_projector`` and ``language_model`` (the base LlavaModel in
        transformers ≥ 4.52, the top model before)."""
        inner = getattr(self.llava, "model", None)
        return inner if hasattr(inner, "vision_tower") else self.llava

    @staticmethod
    def _pixel_norm(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean/std of the folder's image processor (the official transform hard-codes the CLIP values, which the
        official folder's processor also holds); the official resize is applied regardless of its other settings."""
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return CLIP_MEAN, CLIP_STD
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"LLaVA folder {folder}: preprocessor_config.json is not valid JSON ({err})") from err
        return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))

    def tokenize(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask [1, text_len + text_crop_start] of the filled template, right-padded.

        Official: ``truncation=True`` cuts the tail, which removes ``<image>`` for over-long prompts and then crashes;
        here the prompt tokens are cut instead so the ``<image>`` suffix survives (logged)."""
        text = PROMPT_TEMPLATE_VIDEO.format(prompt) + IMAGE_SUFFIX
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if ids.count(self.image_token_id) != 1:
            raise InputError(f"prompt {prompt!r}: must not contain the special token {IMAGE_TOKEN}")
        if len(ids) > self.max_tokens:
            suffix = self._suffix_ids
            if ids[-len(suffix) :] != suffix:
                raise InputError(f"prompt {prompt!r}: cannot be tokenized consistently with the template suffix")
            log.warning(
                "prompt has %d tokens, more than text_len=%d: truncated",
                len(ids) - self.crop_start - len(suffix),
                self.cfg.text_len,
            )
            ids = ids[: self.max_tokens - len(suffix)] + suffix
        num = len(ids)
        ids = ids + [self.tokenizer.pad_token_id] * (self.max_tokens - num)
        mask = [1] * num + [0] * (self.max_tokens - num)
        return torch.tensor([ids], dtype=torch.long), torch.tensor([mask], dtype=torch.long)

    @torch.no_grad()
    def image_features(self, image: Image.Image) -> torch.Tensor:
        """Projected vision features [1, text_image_tokens, text_states_dim] of the official 336² transform."""
        inner = self._inner()
        pixels = llava_pixels(image, self.cfg.llava_image_size, self.pixel_mean, self.pixel_std)
        pixels = pixels.to(self.device, self.dtype)
        out = inner.vision_tower(pixels, output_hidden_states=True)
        layers = self.vision_layer if isinstance(self.vision_layer, (list, tuple)) else [self.vision_layer]
        hidden = [out.hidden_states[i] for i in layers]
        if self.vision_strategy == "default":
            hidden = [h[:, 1:] for h in hidden]  # drop CLS
        feats = inner.multi_modal_projector(torch.cat(hidden, dim=-1))
        if feats.shape[1] != self.cfg.text_image_tokens:
            raise InputError(
                f"LLaVA folder {self.llava_dir}: the vision tower gives {feats.shape[1]} image tokens at "
                f"llava_image_size={self.cfg.llava_image_size}, the model config expects text_image_tokens="
                f"{self.cfg.text_image_tokens}"
            )
        return feats

    # --- encoding ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_llava(self, prompt: str, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [1, L, D] float32, quirky mask [1, L] long) of the official LLaVA path."""
        ids, token_mask = self.tokenize(prompt)
        ids, token_mask = ids.to(self.device), token_mask.to(self.device)
        n = self.cfg.text_image_tokens
        embeds = self.llava.get_input_embeddings()(ids)
        # Legacy quirk: embeddings at pad-token positions are set to zero.
        embeds = embeds.masked_fill((ids == self.model_pad_id)[..., None], 0.0)
        feats = self.image_features(image).to(embeds.dtype)
        pos = int((ids[0] == self.image_token_id).nonzero()[0, 0])
        # Legacy in-place merge: the one <image> token becomes the N features; text after it moves right by N - 1.
        merged = torch.cat([embeds[:, :pos], feats, embeds[:, pos + 1 :]], dim=1)
        ones = torch.ones(1, n, dtype=token_mask.dtype, device=self.device)
        merged_mask = torch.cat([token_mask[:, :pos], ones, token_mask[:, pos + 1 :]], dim=1)
        # Legacy quirk: position ids count attended positions; padded positions get position 1.
        position_ids = (merged_mask.cumsum(-1) - 1).masked_fill(merged_mask == 0, 1)
        out = self._inner().language_model(
            inputs_embeds=merged,
            attention_mask=merged_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
        )
        # hidden_states[-3]: the last two layers are skipped; no final norm (apply_final_norm=False).
        states = out.hidden_states[self.cfg.text_hidden_layer][:, self.crop_start :]
        # Quirky mask: the *token* mask (image token counted once) + N - 1 ones, then the same crop.
        mask = torch.cat([token_mask, torch.ones(1, n - 1, dtype=torch.long, device=self.device)], dim=1)
        mask = mask[:, self.crop_start :]
        expected = text_seq_len(self.cfg)
        if states.shape[1] != expected or mask.shape[1] != expected:
            raise RuntimeError(
                f"LLaVA gave {states.shape[1]} states / {mask.shape[1]} mask entries after the crop, expected "
                f"{expected} (text_len + text_image_tokens - 1): the weights do not match model={self.cfg.name}"
            )
        return states.float(), mask.long()

    @torch.no_grad()
    def encode_clip(self, prompt: str) -> torch.Tensor:
        """CLIP pooled output [1, text_states_dim_2] float32 of the raw prompt (max length ``clip_max_length``)."""
        batch = self.clip_tokenizer(
            prompt,
            max_length=self.cfg.clip_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        out = self.clip(
            input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
        )
        return out.pooler_output.float()

    def encode(self, prompt: str, image: Image.Image) -> TextEmbedding:
        """Official conditioning of one prompt with the reference image (the caller adds any prompt prefix)."""
        states, mask = self.encode_llava(prompt, image)
        return TextEmbedding(states=states, mask=mask, pooled=self.encode_clip(prompt))
