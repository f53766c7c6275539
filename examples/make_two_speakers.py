"""Remake the two-speaker example from the project's own samples (no downloads):

- ``two_faces.jpg``: the face of ``portrait.jpg`` (public domain, see /work/shared/assets/README.md), cropped to
  320×320, beside its mirror image: 640×320, two faces (both found by the tiny model's detector);
- ``speaker_left.wav`` / ``speaker_right.wav``: two cuts of ``speech_16s.wav`` (espeak-ng speech), 3.0 s and 2.4 s
  (the shorter one is padded with silence in the video);
- ``two_speakers.json`` (one track each, faces found left to right) and ``two_speakers_turns.json`` (one shared
  recording, ``speech_5s.wav``, with per-speaker turns).

Run from the repository root: ``python examples/make_two_speakers.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent


def main() -> None:
    portrait = Image.open(HERE / "portrait.jpg").convert("RGB").crop((64, 0, 384, 320))
    pair = Image.new("RGB", (portrait.width * 2, portrait.height))
    pair.paste(portrait, (0, 0))
    pair.paste(ImageOps.mirror(portrait), (portrait.width, 0))
    pair.save(HERE / "two_faces.jpg", quality=90)

    speech, rate = sf.read(HERE / "speech_16s.wav", dtype="int16")
    for name, start, seconds in (("speaker_left", 0.0, 3.0), ("speaker_right", 5.0, 2.4)):
        cut = speech[int(start * rate) : int((start + seconds) * rate)]
        sf.write(HERE / f"{name}.wav", np.ascontiguousarray(cut), rate, subtype="PCM_16")

    tracks = [
        {"name": "left", "audio": "speaker_left.wav", "face": "auto"},
        {"name": "right", "audio": "speaker_right.wav", "face": "auto"},
    ]
    (HERE / "two_speakers.json").write_text(json.dumps(tracks, indent=2) + "\n")
    turns = {
        "audio": "speech_5s.wav",
        "speakers": [
            {"name": "left", "face": "auto", "turns": [[0.0, 2.5]]},
            {"name": "right", "face": "auto", "turns": [[2.5, 5.0]]},
        ],
    }
    (HERE / "two_speakers_turns.json").write_text(json.dumps(turns, indent=2) + "\n")


if __name__ == "__main__":
    main()
