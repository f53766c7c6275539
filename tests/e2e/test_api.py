"""``AvatarPipeline`` from a plain Python process (this one, no torchrun): the models load once and serve two calls,
one from paths and one from a PIL image and a sample array; both give the command line's video for the same seed, and
so does one speaker given as ``speakers=[...]``; bad input is refused with the command line's message before anything renders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from tests.e2e.conftest import EXAMPLES, FRONTEND_SETTINGS, REFERENCE_SEED, REFERENCE_STEPS

pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_two_calls_on_models_loaded_once_give_the_cli_video(tiny_weights, one_second_clip, cli_reference, tmp_path):
    from PIL import Image

    from avatar import AvatarPipeline
    from avatar.io.errors import InputError
    from tests.utils.video import read_frames

    overrides = [s for s in FRONTEND_SETTINGS if not s.startswith("model=")]
    pipe = AvatarPipeline.from_pretrained(tiny_weights, model="tiny", overrides=overrides)
    model, vae = pipe.renderer.model, pipe.renderer.vae

    first = pipe(image=EXAMPLES / "portrait.jpg", audio=one_second_clip, seed=REFERENCE_SEED, steps=REFERENCE_STEPS)
    saved = first.save(tmp_path / "api.mp4")
    np.testing.assert_array_equal(read_frames(saved), read_frames(cli_reference))
    assert json.loads((tmp_path / "api.mp4.json").read_text())["output"] == saved
    assert first.frames.dtype == np.uint8 and first.frames.shape == (25, 64, 64, 3)
    assert first.fps == 25 and first.sample_rate == 16000 and abs(len(first.audio) - 16000) <= 1
    assert "load_encoders" in first.report["timings_seconds"]

    wav, rate = sf.read(str(one_second_clip), dtype="float32")
    with Image.open(EXAMPLES / "portrait.jpg") as image:
        second = pipe(image=image.copy(), audio=(wav, rate), seed=REFERENCE_SEED, steps=REFERENCE_STEPS)
    np.testing.assert_array_equal(second.frames, first.frames)
    # the same modules served both calls; the encoders were loaded by the first call only
    assert pipe.renderer.model is model and pipe.renderer.vae is vae
    assert "load_encoders" not in second.report["timings_seconds"]

    # several speakers through the API: one speaker given as an array renders the audio= video bit for bit
    third = pipe(
        image=EXAMPLES / "portrait.jpg",
        speakers=[{"audio": (wav, rate), "face": "auto", "name": "Eileen"}],
        seed=REFERENCE_SEED,
        steps=REFERENCE_STEPS,
    )
    np.testing.assert_array_equal(third.frames, first.frames)
    assert [s["name"] for s in third.report["speakers"]] == ["Eileen"] and len(third.audio) == len(first.audio)
    with pytest.raises(
        InputError, match=r'speaker \d \("speaker \d"\) face: "auto" but image=.*portrait\.jpg has \d detected'
    ):
        pipe(image=EXAMPLES / "portrait.jpg", speakers=[{"audio": one_second_clip, "face": "auto"}] * 2)

    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    with pytest.raises(InputError, match=r"image=.*notes\.txt: not a readable image"):
        pipe(image=text, audio=one_second_clip)
    with pytest.raises(InputError, match=r"audio: samples must be float or int16"):
        pipe(image=EXAMPLES / "portrait.jpg", audio=(np.zeros((2, 2, 2)), 16000))
    pipe.close()


#: Run in a fresh interpreter where ``launch`` cannot be imported at all (as if the package were not installed).
WITHOUT_LAUNCH = """
import importlib.abc, sys

class NoLaunch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "launch" or name.startswith("launch."):
            raise ModuleNotFoundError(f"No module named {name!r} (launch/ is removed in this test)")
        return None

sys.meta_path.insert(0, NoLaunch())
weights, image, audio, out, seed, steps, *overrides = sys.argv[1:]
from avatar import AvatarPipeline

pipe = AvatarPipeline.from_pretrained(weights, model="tiny", overrides=overrides)
pipe(image=image, audio=audio, seed=int(seed), steps=int(steps)).save(out)
assert not any(m == "launch" or m.startswith("launch.") for m in sys.modules), "launch was imported"
"""


@pytest.mark.timeout(300)
def test_the_pipeline_works_with_launch_removed(tiny_weights, one_second_clip, cli_reference, tmp_path):
    import subprocess
    import sys

    from tests.utils.video import read_frames

    out = tmp_path / "no-launch.mp4"
    overrides = [s for s in FRONTEND_SETTINGS if not s.startswith("model=")]
    args = [tiny_weights, EXAMPLES / "portrait.jpg", one_second_clip, out, REFERENCE_SEED, REFERENCE_STEPS]
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_LAUNCH, *map(str, args), *overrides],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    np.testing.assert_array_equal(read_frames(out), read_frames(cli_reference))
