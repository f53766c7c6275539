"""Every config field has a domain (issue 22): each numeric field declares its range next to its type, each path field
its kind; ``check_domains`` (called by ``check_config``) refuses a value outside it, and the rules between fields, in
one line naming the key, the value and what is valid."""

from __future__ import annotations

import dataclasses
import math

import pytest

from avatar.compose import LITERAL_KEYS, compose
from avatar.config import PathKind, Range, RunConfig, SamplingConfig, domain_of
from avatar.io.errors import InputError
from avatar.validate import RULES, _field_type, check_config, check_seed, check_steps, declared_fields

TINY = ["model=tiny", "weights=weights/tiny"]


def _refusal(*overrides: str) -> str:
    with pytest.raises(InputError) as refused:
        check_config(compose([*TINY, *overrides]))
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_every_numeric_field_declares_a_range_and_every_path_field_its_kind():
    paths = {"image", "prompt_file", "weights", "output_dir", "audio.path", "output.path", "batch.manifest"}
    assert paths <= set(LITERAL_KEYS)
    seen_paths = set()
    for key, f, hint in declared_fields():
        base, _, _ = _field_type(hint)
        declared = f.metadata.get("range") or f.metadata.get("path")
        if base in (int, float) or key.startswith("parallel."):
            assert isinstance(declared, Range), f"{key} ({base.__name__}) declares no range"
            assert declared.describe(base is int), key
        if isinstance(declared, PathKind):
            seen_paths.add(key)
    assert seen_paths == paths | {"speakers", "serve.data_dir"}
    # every declared default lies in its own domain (a default the check refused would refuse every run)
    check_config(compose(TINY))
    check_config(compose(["model=hunyuan_avatar"]))


def test_range_holds_and_words():
    steps = domain_of(SamplingConfig, "steps")
    assert steps.holds(1, True) and not steps.holds(0, True) and not steps.holds(True, True)
    assert not steps.holds(2.0, True)  # an int field takes integers
    assert steps.describe(True) == "an integer ≥ 1 (the official value is 50)"
    positive = Range(gt=0)
    assert positive.holds(0.5, False) and not positive.holds(0.0, False)
    assert not positive.holds(math.nan, False) and not positive.holds(math.inf, False)
    assert Range(ge=0, le=51).describe(True) == "an integer from 0 to 51"
    assert Range(ge=4, multiple_of=4).describe(True) == "a positive multiple of 4"
    assert Range(ge=1, auto=True).describe(True) == "auto or an integer ≥ 1"
    assert domain_of(RunConfig, "image") is PathKind.file and domain_of(RunConfig, "weights") is PathKind.folder


#: (overrides, the words the one line must hold): the cases of issue 22 (each was a traceback after the models had
#: loaded, or a late refusal naming an internal variable), then one value per kind of declaration.
CASES = [
    (["model.window_frames=2"], ["model.window_frames=2", "4·k + 1", "5, 9, 13"]),
    (["model.window_frames=0"], ["model.window_frames=0", "≥ 1"]),
    (["model.window_frames=1"], ["model.window_frames=1", "4·k + 1"]),
    (["model.vae_tile_frames=0"], ["model.vae_tile_frames=0", "≥ 1"]),
    (["model.vae_tile_frames=30"], ["model.vae_tile_frames=30", "multiple of 4"]),
    (["model.vae_tile_stride_frames=40"], ["model.vae_tile_stride_frames=40", "model.vae_tile_frames=32", "4 to 32"]),
    (["model.vae_tile_stride=160"], ["model.vae_tile_stride=160", "model.vae_tile_size=128", "8 to 128"]),
    (["model.vae_tile_stride=100"], ["model.vae_tile_stride=100", "multiple of 8"]),
    (["model.image_size=120", "model.bucket_multiple=8"], ["model.bucket_multiple=8", "multiple of 16"]),
    (["model.image_size=96"], ["model.image_size=96", "model.bucket_multiple=64"]),
    (["long.strategy=blend", "long.overlap_frames=33"], ["long.overlap_frames=33", "9 latent frames", "0..8"]),
    (["long.overlap_frames=9"], ["long.overlap_frames=9", "0..8"]),
    (["model.rope_axes=[5,5,6]"], ["model.rope_axes=[5, 5, 6]", "even"]),
    (["model.rope_axes=[8,8]"], ["model.rope_axes=[8, 8]", "three"]),
    (["model.shift_offset=-1"], ["model.shift_offset=-1", "≥ 0"]),
    (["model.text_len=0"], ["model.text_len=0", "≥ 1"]),
    (["sampling.joint_face_mask_scale=nan"], ["sampling.joint_face_mask_scale=nan", "a number ≥ 0"]),
    (["sampling.cfg_scale=inf"], ["sampling.cfg_scale=inf", "a number ≥ 0"]),
    (["sampling.shift=0"], ["sampling.shift=0.0", "> 0"]),
    (["audio.sample_rate=8000"], ["audio.sample_rate=8000", "16000"]),
    (["audio.chunk_seconds=10"], ["audio.chunk_seconds=10.0", "30"]),
    (["memory.gpu_memory_gb=-1"], ["memory.gpu_memory_gb=-1.0", "> 0"]),
    (["parallel.ring=0"], ["parallel.ring='0'", "auto or an integer ≥ 1"]),
    (["parallel.cfg=3"], ["parallel.cfg='3'", "from 1 to 2"]),
    (["batch.shard_index=-1", "batch.shard_count=2"], ["batch.shard_index=-1", "≥ 0"]),
    (["serve.port=70000"], ["serve.port=70000", "0 to 65535"]),
    (["serve.max_image_side=10"], ["serve.max_image_side=10", "≥ 64"]),
    (["checkpoint_every=-2"], ["checkpoint_every=-2", "0: never"]),
]


@pytest.mark.parametrize("overrides,words", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_out_of_domain_values_are_one_line_naming_key_value_and_range(overrides, words):
    message = _refusal(*overrides)
    for word in words:
        assert word in message, message


def test_existing_messages_are_unchanged():
    assert (
        _refusal("sampling.steps=0") == "sampling.steps=0 is invalid; give an integer ≥ 1 (the official value is 50)"
    )
    assert _refusal("seed=-1") == "seed=-1 is invalid; give an integer from 0 to 9223372036854775806 (2**63 - 2)"
    assert _refusal("output.crf=99") == "output.crf=99 is invalid; give an integer from 0 (lossless) to 51"
    assert _refusal("sampling.motion_exp=-1") == "sampling.motion_exp=-1.0 is invalid; give a number ≥ 0"
    assert _refusal("serve.max_queue=0") == "serve.max_queue=0 is invalid; give an integer ≥ 1"
    assert _refusal("model.adapter_after_double=[7]").startswith("model.adapter_after_double=[7]: [7] are not")
    with pytest.raises(InputError, match=r"^sampling.steps='x' is invalid; give an integer ≥ 1"):
        check_steps("x")
    assert check_steps(20.0) == 20 and check_seed(0) == 0
    with pytest.raises(InputError, match=r"^row seed=-5 is invalid"):
        check_seed(-5, "row seed")


def test_python_callers_get_the_same_check():
    """A config built in Python (no Hydra types) is held to the same domains: types included."""
    cfg = compose(TINY)
    for section, name, value in [
        ("sampling", "steps", True),
        ("sampling", "cfg_scale", "7"),
        ("model", "window_frames", 33.0),
        ("memory", "gpu_memory_gb", math.nan),
    ]:
        broken = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
        with pytest.raises(InputError, match=rf"^{section}\.{name}={value!r} is invalid"):
            check_config(broken)
    with pytest.raises(InputError, match=r"^image='a\\x00b' is invalid; give the path of an existing file"):
        check_config(dataclasses.replace(cfg, image="a\x00b"))


def test_every_rule_names_its_keys_and_is_documented():
    for rule in RULES:
        assert rule.keys and rule.text
        known = {key for key, _, _ in declared_fields()}
        assert set(rule.keys) <= known, rule.keys


def test_encoder_settings_are_held_to_the_weights(tiny_weights):
    """Three model fields are bounded by the encoders' own configs in the weights folder (read, not built): each
    was a traceback inside the text encoder once the models had loaded."""
    from avatar.validate import check_encoder_settings

    args = ["model=tiny", f"weights={tiny_weights}"]
    check_encoder_settings(compose(args))
    for override, words in [
        ("model.clip_max_length=1000", ["model.clip_max_length=1000", "77 positions", "1 to 77"]),
        ("model.text_hidden_layer=-100", ["model.text_hidden_layer=-100", "from -5 to 4"]),
        ("model.llava_image_size=1", ["model.llava_image_size=1", "28×28", "give 28"]),
    ]:
        with pytest.raises(InputError) as refused:
            check_encoder_settings(compose([*args, override]))
        for word in words:
            assert word in str(refused.value), str(refused.value)
