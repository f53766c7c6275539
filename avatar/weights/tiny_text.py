"""Tiny LLaVA-Llama and CLIP text encoders in the official on-disk layout (``ckpts/llava_llama_image/``,
``ckpts/text_encoder_2/``).

Both are the real transformers classes (``LlavaForConditionalGeneration`` with a CLIP vision tower and a Llama
language model, ``CLIPTextModel``) at CPU size with deterministic random weights, saved with ``save_pretrained``
together with offline tokenizers built with the ``tokenizers`` library: WordPiece over a small English vocabulary
(every word of the official template, prompt prefix and negative prompt, plus common words) with single-character
pieces as fallback, so any printable ASCII text tokenizes without unknown tokens. The LLaVA tokenizer knows the
Llama-3 special tokens the template uses, so the template crop is a real crop of the system prompt.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from avatar.config import OFFICIAL_CLIP_DIR, OFFICIAL_LLAVA_DIR, ModelConfig
from avatar.weights.tiny_cond import save_seeded_pretrained

#: Llama-3 special tokens of the LLaVA tokenizer (BOS, template markers, image placeholder, pad).
LLAVA_BOS = "<|begin_of_text|>"
LLAVA_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>")
LLAVA_PAD = "<pad>"
UNK = "<unk>"
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

#: Common words besides those of the template, prefix and negative prompt (order fixes the token ids).
COMMON_WORDS = (
    "a an the and or of to in on at by for with from as is are was be it this that he she they his her their "
    "person man woman boy girl child people face head hair eyes mouth hand hands smile smiles smiling talking "
    "speaking speaks talks sings singing says looks like camera front room office studio street park beach forest "
    "campfire fire sits sitting stands standing walks wearing shirt dress jacket suit glasses hat red blue green "
    "black white yellow brown dark bright warm soft natural indoor outdoor day night sunlight background table "
    "chair window wall sky tree trees water happy sad calm angry young old close up view video scene portrait "
    "cross legged area forested alpha beta gamma delta one two three four five"
).split()


def _words(*texts: str) -> list[str]:
    out: list[str] = []
    for text in texts:
        out.extend(re.findall(r"[A-Za-z0-9]+", text))
    return out


def tiny_vocab(specials: list[str]) -> dict[str, int]:
    """WordPiece vocabulary: specials, every printable ASCII character (word-start and ``##`` continuation), then
    whole words. Deterministic (no dict/set ordering involved beyond insertion order)."""
    from avatar.config import SamplingConfig
    from avatar.models.text import PROMPT_TEMPLATE_VIDEO

    vocab: dict[str, int] = {}
    for token in specials:
        vocab.setdefault(token, len(vocab))
    chars = [chr(i) for i in range(33, 127)]
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault("##" + c, len(vocab))
    sampling = SamplingConfig()
    for word in _words(PROMPT_TEMPLATE_VIDEO, sampling.prompt_prefix, sampling.negative_prompt) + COMMON_WORDS:
        vocab.setdefault(word, len(vocab))
    return vocab


def _wordpiece(vocab: dict[str, int], added: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on whitespace and punctuation
    tok.decoder = decoders.WordPiece()
    if added:
        tok.add_special_tokens(added)
    return tok


def tiny_llava_tokenizer():
    """Fast tokenizer for the tiny LLaVA: BOS prepended, right padding with ``<pad>``, Llama-3 specials, ``<image>``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_vocab([UNK, LLAVA_BOS, LLAVA_PAD, *LLAVA_SPECIALS])
    tok = _wordpiece(vocab, list(LLAVA_SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{LLAVA_BOS} $A", pair=f"{LLAVA_BOS} $A $B", special_tokens=[(LLAVA_BOS, vocab[LLAVA_BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=LLAVA_BOS,
        eos_token="<|eot_id|>",
        pad_token=LLAVA_PAD,
        unk_token=UNK,
        padding_side="right",
    )


def tiny_clip_tokenizer(max_length: int):
    """Fast tokenizer for the tiny CLIP: ``<|startoftext|> … <|endoftext|>``, padded with ``<|endoftext|>``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_vocab([CLIP_BOS, CLIP_EOS, UNK])  # eos id 1: not 2, which CLIP treats as legacy argmax pooling
    tok = _wordpiece(vocab, [])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}",
        pair=f"{CLIP_BOS} $A $B {CLIP_EOS}",
        special_tokens=[(CLIP_BOS, vocab[CLIP_BOS]), (CLIP_EOS, vocab[CLIP_EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=UNK,
        model_max_length=max_length,
    )


def _patch_size(cfg: ModelConfig) -> int:
    side = math.isqrt(cfg.text_image_tokens)
    if side * side != cfg.text_image_tokens or cfg.llava_image_size % side:
        raise ValueError(
            f"text_image_tokens={cfg.text_image_tokens} must be a square k² with k dividing "
            f"llava_image_size={cfg.llava_image_size}"
        )
    return cfg.llava_image_size // side


def _image_processor_config(size: int) -> dict:
    from avatar.models.text import CLIP_MEAN, CLIP_STD

    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": 2,  # bilinear, as the official transform
        "do_center_crop": False,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }


def _heads(width: int) -> int:
    """Attention heads for a tiny width: 4, 2 or 1, whichever divides it first."""
    return next(h for h in (4, 2, 1) if width % h == 0)


def make_tiny_llava(root: str | Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """Write a tiny ``LlavaForConditionalGeneration`` (Llama width ``text_states_dim``, 4 layers; CLIP vision tower
    at ``llava_image_size`` giving ``text_image_tokens`` patches) with its tokenizer and image processor config."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    out = Path(root) / OFFICIAL_LLAVA_DIR
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_llava_tokenizer()
    width = cfg.text_states_dim
    heads = _heads(width)
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=4,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=cfg.llava_image_size,
        patch_size=_patch_size(cfg),
        projection_dim=16,
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=cfg.text_image_tokens,
    )
    config.pad_token_id = tokenizer.pad_token_id
    save_seeded_pretrained(LlavaForConditionalGeneration, config, tokenizer, out, seed + 21)
    (out / "preprocessor_config.json").write_text(json.dumps(_image_processor_config(cfg.llava_image_size), indent=2))
    return out


def make_tiny_clip(root: str | Path, cfg: ModelConfig, seed: int = 0) -> Path:
    """Write a tiny ``CLIPTextModel`` (width ``text_states_dim_2``, so ``pooler_output`` has that width; positions
    ``clip_max_length``) with its tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(root) / OFFICIAL_CLIP_DIR
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer(cfg.clip_max_length)
    width = cfg.text_states_dim_2
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=_heads(width),
        max_position_embeddings=cfg.clip_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    save_seeded_pretrained(CLIPTextModel, config, tokenizer, out, seed + 22)
    return out
