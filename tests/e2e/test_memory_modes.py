"""``memory=low`` renders the same video as a plain render: the tiny model's fp8 checkpoint streamed block by block
(``offload=blocks``), the single blocks' linears in chunks of 64 tokens (``memory.token_chunk``), the deep cache in
host memory, the encoders on the CPU, against ``memory=fp8`` (the same fp8 weights, resident, unchunked). 3 steps
(the deep cache reads nothing below 10 steps; its host storage is checked in tests/unit/test_offload.py). On the
CPU every "device" is the host, so what this shows is that the placement's code paths change no output bit; the
memory it saves needs a GPU to see."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tests.e2e.conftest import EXAMPLES, FRONTEND_SETTINGS, REFERENCE_SEED


def _render(weights, clip, *overrides):
    from avatar import AvatarPipeline

    pipe = AvatarPipeline.from_pretrained(weights, model="tiny", overrides=[*FRONTEND_SETTINGS[1:], *overrides])
    try:
        result = pipe(image=EXAMPLES / "portrait.jpg", audio=clip, seed=REFERENCE_SEED, steps=3)
        return pipe.renderer, result
    finally:
        pipe.close()


@pytest.mark.timeout(120)
def test_memory_low_render_equals_the_plain_render(tiny_weights, one_second_clip, caplog):
    caplog.set_level(logging.INFO, logger="avatar")
    plain_renderer, plain = _render(tiny_weights, one_second_clip, "memory=fp8")
    low_renderer, low = _render(tiny_weights, one_second_clip, "memory=low", "memory.token_chunk=64")

    placement = low_renderer.placement
    assert placement.fp8 and placement.offload == "blocks" and placement.cache_on_host and placement.encoders_on_cpu
    assert plain_renderer.dit.streamer is None and low_renderer.dit.streamer.onloads > 0
    assert low_renderer.model.single_blocks[0].token_chunk == 64
    assert plain_renderer.model.single_blocks[0].token_chunk == 8192  # the default: larger than the 64 px sequence
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory: memory=")]
    assert any("memory=low" in line and "blocks streamed from host" in line for line in lines), lines
    np.testing.assert_array_equal(low.frames, plain.frames)
