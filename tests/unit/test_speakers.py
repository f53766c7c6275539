"""The several-speakers contract (``avatar/pipeline/speakers.py``): the strict reader, face assignment, disjoint
masks (one speaker: the official mask exactly), time-switched masks per latent frame sliced per window, the
soundtrack mix without clipping, and one line naming speaker and field for every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from avatar.io.errors import InputError
from avatar.models.face import face_mask
from avatar.pipeline import speakers as sp

FACES = [(40.0, 40.0, 80.0, 80.0), (200.0, 50.0, 240.0, 90.0)]  # rendered pixels of a 320×160 image


def write(tmp_path, data, name="speakers.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def tone(path, seconds: float, rate: int = 16000, amplitude: float = 0.5, freq: float = 220.0) -> str:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, subtype="PCM_16")
    return str(path)


# --- the reader -----------------------------------------------------------------------------------------------


def test_reads_tracks_with_paths_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write(
        tmp_path / "sub",
        [{"audio": "a.wav", "face": "auto", "name": "Ann"}, {"audio": "/x/b.wav", "face": [1, 2, 3, 4]}],
    )
    spec = sp.read_speakers(path)
    assert not spec.turns and len(spec) == 2
    assert spec.speakers[0].audio == str(tmp_path / "sub" / "a.wav") and spec.speakers[0].name == "Ann"
    assert spec.speakers[1].audio == "/x/b.wav" and spec.speakers[1].face == (1.0, 2.0, 3.0, 4.0)
    assert spec.speakers[1].name == "speaker 2"
    assert spec.tracks == [str(tmp_path / "sub" / "a.wav"), "/x/b.wav"]


def test_reads_turns_with_a_shared_recording(tmp_path):
    data = {
        "audio": "both.wav",
        "speakers": [{"face": "auto", "turns": [[2, 3], [0, 1]]}, {"face": "auto", "turns": [[1, 2]]}],
    }
    spec = sp.read_speakers(write(tmp_path, data))
    assert spec.turns and spec.shared_audio == str(tmp_path / "both.wav")
    assert spec.speakers[0].turns == ((0.0, 1.0), (2.0, 3.0))
    assert spec.tracks == [str(tmp_path / "both.wav")]
    # the list form with audio= on the command line
    listed = sp.read_speakers(write(tmp_path, data["speakers"], "l.json"), shared_audio="x.wav")
    assert listed.turns and listed.shared_audio.endswith("x.wav")


BAD = [
    ("[1, 2", "not valid JSON"),
    ('[{"audio": "a.wav", "face": NaN}]', "not valid JSON"),
    ("{}", "needs 'speakers'"),
    ('{"speakers": [], "x": 1}', "unknown key 'x'"),
    ("[]", "list of speakers is empty"),
    ('"a.wav"', "expected a list of speakers"),
    ('[{"face": "auto"}]', 'speaker 1 ("speaker 1") audio: missing'),
    ('[{"audio": "a.wav"}]', 'speaker 1 ("speaker 1") face: missing'),
    ('[{"audio": "a.wav", "face": "left"}]', "face: 'left'"),
    ('[{"audio": "a.wav", "face": [1, 2, 3]}]', "four numbers"),
    ('[{"audio": "a.wav", "face": [5, 2, 3, 4]}]', "is empty; a box needs x0 < x1"),
    ('[{"audio": "a.wav", "face": "auto", "mouth": 1}]', "mouth: unknown field"),
    (
        '[{"audio": "a.wav", "face": "auto", "name": "A"}, {"audio": "b.wav", "face": "auto", "name": "A"}]',
        'speaker 2 ("A") name',
    ),
    ('[{"audio": 3, "face": "auto"}]', "audio: 3 must be the path"),
    ('[{"face": "auto", "turns": [[0, 1]]}]', "turns need one shared recording"),
    ('{"audio": "s.wav", "speakers": [{"face": "auto", "turns": [[1, 0]]}]}', "needs 0 <= start < end"),
    (
        '{"audio": "s.wav", "speakers": [{"face": "auto", "turns": [[0, 1]]}, {"face": "auto"}]}',
        'speaker 2 ("speaker 2") turns: missing',
    ),
    (
        '{"audio": "s.wav", "speakers": [{"face": "auto", "audio": "a.wav", "turns": [[0, 1]]}]}',
        "take turns of it, not tracks",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_files_are_one_line_naming_the_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(InputError) as err:
        sp.read_speakers(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"speakers={path}")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        sp.read_speakers(tmp_path / "none.json")


# --- faces ----------------------------------------------------------------------------------------------------


def spec_of(*faces, turns=False) -> sp.SpeakerSpec:
    entries = [
        {"face": list(f) if not isinstance(f, str) else f, **({"turns": [[0, 1]]} if turns else {"audio": f"{i}.wav"})}
        for i, f in enumerate(faces)
    ]
    return sp.parse_speakers({"audio": "s.wav", "speakers": entries} if turns else entries, "test.json")


def test_auto_faces_go_left_to_right_and_boxes_scale_to_the_rendered_image():
    layout = sp.resolve_faces(spec_of("auto", "auto"), (640, 320), (320, 160), list(reversed(FACES)))
    assert layout.boxes == tuple(FACES)
    assert layout.input_boxes[0] == (80.0, 80.0, 160.0, 160.0)
    given = sp.resolve_faces(spec_of([400, 100, 480, 180], "auto"), (640, 320), (320, 160), FACES)
    assert given.boxes == ((200.0, 50.0, 240.0, 90.0), FACES[0])  # the auto speaker skips the face under the box


def test_a_lone_auto_speaker_takes_the_largest_face_or_the_whole_image():
    big = (100.0, 10.0, 180.0, 90.0)
    assert sp.resolve_faces(spec_of("auto"), (320, 160), (320, 160), [FACES[0], big]).boxes == (big,)
    none = sp.resolve_faces(spec_of("auto"), (320, 160), (320, 160), [])
    assert none.boxes == (None,) and not none.found


def test_face_errors_name_speaker_and_field():
    with pytest.raises(InputError, match=r'speaker 2 \("speaker 2"\) face: \[600, 0, 700, 50\] is outside'):
        sp.resolve_faces(spec_of("auto", [600, 0, 700, 50]), (640, 320), (320, 160), FACES)
    with pytest.raises(InputError, match=r'speaker 3 \("speaker 3"\) face: "auto" but the image has 2 detected'):
        sp.resolve_faces(spec_of("auto", "auto", "auto"), (320, 160), (320, 160), FACES)
    with pytest.raises(InputError, match=r'speaker 2 \("speaker 2"\) face: on the same face as speaker 1'):
        sp.resolve_faces(spec_of([40, 40, 80, 80], [45, 45, 85, 85]), (320, 160), (320, 160), FACES)
    with pytest.raises(InputError, match="1 of them under given boxes"):
        sp.resolve_faces(spec_of([40, 40, 80, 80], "auto", "auto"), (320, 160), (320, 160), FACES)


# --- masks ----------------------------------------------------------------------------------------------------


def test_one_speaker_mask_is_the_official_mask_exactly():
    masks, infos = sp.speaker_masks([FACES[0]], (320, 160), (20, 40))
    assert torch.equal(masks[None, :, None], face_mask((320, 160), [FACES[0]], (20, 40)))
    assert infos[0].overlap_resolved == 0 and infos[0].mask_box == (0, 0, 120, 120)
    whole, _ = sp.speaker_masks([None], (320, 160), (20, 40))
    assert torch.equal(whole[None, :, None], face_mask((320, 160), [], (20, 40)))


def test_overlapping_boxes_are_split_by_the_nearest_face_centre():
    boxes = [(60.0, 40.0, 100.0, 80.0), (140.0, 40.0, 180.0, 80.0)]  # ×3 boxes overlap in x 120..160
    masks, infos = sp.speaker_masks(boxes, (320, 160), (20, 40))
    assert ((masks > 0).sum(dim=0) <= 1).all()  # every latent pixel (so every token) has one speaker at most
    alone = [sp.speaker_masks([b], (320, 160), (20, 40))[0][0] for b in boxes]
    both = (alone[0] > 0) & (alone[1] > 0)
    assert both.any() and all(i.overlap_resolved > 0 for i in infos)
    xs = (torch.arange(40) + 0.5) * 8
    left_of_mid = (xs < 120)[None].expand(20, 40)
    assert (masks[0][both & left_of_mid] > 0).all() and (masks[1][both & ~left_of_mid] > 0).all()
    for mask, single in zip(masks, alone):  # outside the contested pixels each mask is its own official mask
        assert torch.equal(mask[~both], single[~both])
    assert abs(infos[0].mask_area - float(masks[0].mean())) < 1e-9


def test_latent_frame_j_covers_video_frames_4j_minus_3_to_4j():
    fps = 25.0
    # a turn exactly over video frame 5 (0.20-0.24 s): latent 2 (frames 5..8) only
    assert sp.latent_activity(((0.2, 0.24),), 13, fps).tolist() == [False, False, True, False]
    # frame 0 alone is latent 0; frame 4 is latent 1
    assert sp.latent_activity(((0.0, 0.04),), 13, fps).tolist() == [True, False, False, False]
    assert sp.latent_activity(((0.16, 0.2),), 13, fps).tolist() == [False, True, False, False]
    assert sp.latent_activity(((0.0, 10.0),), 13, fps).all()


def test_turn_masks_are_per_latent_frame_and_sliced_per_window():
    spec = sp.parse_speakers(
        {
            "audio": "s.wav",
            "speakers": [{"face": "auto", "turns": [[0, 0.1]]}, {"face": "auto", "turns": [[0.1, 0.5]]}],
        },
        "t.json",
    )
    static, _ = sp.speaker_masks(FACES, (320, 160), (20, 40))
    masks = sp.frame_masks(static, spec, 13, 25.0)
    assert masks.shape == (1, 2, 4, 20, 40)
    assert torch.equal(masks[0, 0, 0], static[0]) and not masks[0, 0, 3].any()
    assert not masks[0, 1, 0].any() and torch.equal(masks[0, 1, 3], static[1])
    window = sp.window_masks(masks, [2, 3, 4, 5, 0])  # a circular window running past the end
    assert torch.equal(window[:, :, :2], masks[:, :, 2:4]) and not window[:, :, 2:4].any()
    assert torch.equal(window[:, :, 4], masks[:, :, 0])
    tracks = sp.frame_masks(static, spec_of("auto", "auto"), 13, 25.0)
    assert tracks.shape == (1, 2, 1, 20, 40) and sp.window_masks(tracks, [5, 6]) is tracks


# --- audio ----------------------------------------------------------------------------------------------------


def test_mix_pads_the_shorter_track_and_never_clips():
    a, b = np.full(100, 0.7, np.float32), np.full(60, 0.6, np.float32)
    mix, gains = sp.mix_tracks([a, b])
    assert len(mix) == 100 and np.abs(mix).max() <= sp.MIX_PEAK + 1e-7
    assert gains[0] == gains[1] == pytest.approx(sp.MIX_PEAK / 1.3)
    assert mix[80] == pytest.approx(0.7 * gains[0])  # only A after B ended (padded with silence)
    quiet, unit = sp.mix_tracks([a * 0.1, b * 0.1])
    assert unit == [1.0, 1.0] and np.allclose(quiet[:60], 0.13)


def test_load_speaker_audio_pads_and_the_soundtrack_mixes_at_the_native_rate(tmp_path):
    a = tone(tmp_path / "a.wav", 1.0, rate=22050, amplitude=0.8)
    b = tone(tmp_path / "b.wav", 0.5, rate=22050, amplitude=0.8, freq=300)
    spec = sp.parse_speakers([{"audio": a, "face": "auto"}, {"audio": b, "face": "auto"}], "t.json")
    audio = sp.load_speaker_audio(spec, 16000)
    assert [len(t) for t in audio.tracks] == [16000, 16000] and not audio.tracks[1][8000:].any()
    assert audio.seconds == pytest.approx([1.0, 0.5]) and audio.sample_rate == 22050
    mix, gains = sp.soundtrack(spec, audio)
    assert len(mix) == 22050 and gains[0] == gains[1] < 1 and np.abs(mix).max() <= sp.MIX_PEAK + 1e-6
    one = sp.parse_speakers([{"audio": a, "face": "auto"}], "t.json")
    assert sp.soundtrack(one, sp.load_speaker_audio(one, 16000)) == (None, [1.0])  # the file itself is muxed


def test_audio_errors_name_speaker_and_field(tmp_path):
    def spec(*paths):
        return sp.parse_speakers([{"audio": str(p), "face": "auto", "name": n} for p, n in zip(paths, "AB")], "t.json")

    a = tone(tmp_path / "a.wav", 1.0)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    other_rate = tone(tmp_path / "c.wav", 1.0, rate=22050)
    cases = [
        (spec(a, empty), "contains no audio samples"),
        (spec(a, silent), "is empty (every sample is silent)"),
        (spec(a, other_rate), 'is at 22050 Hz but speaker 1 ("A")'),
        (spec(a, tmp_path / "missing.wav"), "not found"),
    ]
    for bad, detail in cases:
        with pytest.raises(InputError) as err:
            sp.load_speaker_audio(bad, 16000)
        message = str(err.value)
        assert message.startswith('speakers=t.json: speaker 2 ("B") audio: ') and detail in message, message
        assert "\n" not in message
    turns = sp.parse_speakers({"audio": a, "speakers": [{"face": "auto", "turns": [[2, 3]]}]}, "t.json")
    with pytest.raises(InputError, match=r"turns: \[2, 3\] starts after the shared recording ends"):
        sp.load_speaker_audio(turns, 16000)
