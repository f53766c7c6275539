"""Several speakers in one video: the face assignment, the disjoint masks, the per-latent-frame (time-switched)
masks and the soundtrack mix. Pure functions and frozen dataclasses except :func:`load_speaker_audio` and
:func:`soundtrack` (which read files); no model is built here, so every bad input stops before any model.

**Contract** (``avatar/io/speakers.py``, re-exported here): one track per speaker, or one shared recording with
per-speaker turns; a face is ``"auto"`` (the detector's faces left to right; a lone ``"auto"`` speaker takes the
largest face, as the official pipeline does) or a box in pixels of the input image. ``docs/speakers.md``.

**Masks.** Each face box is expanded like the official mask box (×3 around its centre, clipped to the image) and
bilinear-resized to the latent grid; where boxes overlap, each latent pixel goes to the speaker whose face centre is
nearest, so every token belongs to at most one speaker. One speaker gets exactly the official single-face mask.

**Turns.** Latent frame ``j`` covers video frames ``4j−3..4j`` (frame 0 alone for ``j = 0``); a speaker's mask is on
in latent frame ``j`` when one of those frames (``[f/25, (f+1)/25)`` s) overlaps one of its turns, off otherwise. The
masks are ``[1, S, T, h, w]`` over the whole video and sliced per window like the audio (:func:`window_masks`).

**Soundtrack.** The muxed audio is the sum of the padded tracks, scaled by one common gain when the sum would pass
``MIX_PEAK`` (never clipped); every track's gain is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from avatar.io.errors import InputError
from avatar.io.speakers import Box, Speaker, SpeakerSpec, parse_speakers, read_speakers  # noqa: F401 - the contract

#: Peak of the mixed soundtrack (full scale is 1.0): a 0.18 dB margin so that the AAC encode does not clip either.
MIX_PEAK = 0.98
#: The official mask box: the face box scaled this many times in width and height around its centre.
MASK_AREA = 3.0
VIDEO_FRAMES_PER_LATENT = 4


# --- faces --------------------------------------------------------------------------------------------------------


def _fmt_box(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _inside(point: tuple[float, float], box: Box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def _area(box: Box) -> float:
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


@dataclass(frozen=True)
class FaceLayout:
    """Every speaker's face box in rendered pixels (``boxes``) and in input-image pixels (``input_boxes``);
    ``faces`` the detector's boxes (rendered pixels, best first); ``found`` False when a lone ``"auto"`` speaker
    found no face (then the mask is the whole image, as the single-speaker path does)."""

    boxes: tuple[Box | None, ...]
    input_boxes: tuple[Box | None, ...]
    faces: tuple[Box, ...]
    found: bool = True


def resolve_faces(
    spec: SpeakerSpec,
    input_size: tuple[int, int],
    rendered_size: tuple[int, int],
    detected: list[Box],
    image: str = "the image",
) -> FaceLayout:
    """Assign a face box to every speaker. ``detected``: the detector's faces on the rendered image (best first).
    Given boxes must lie inside the input image; ``"auto"`` speakers take the detected faces that no given box is on,
    left to right in list order; two speakers on one face (a box's centre inside another's box) is an error."""
    where = f"speakers={spec.source}"
    in_w, in_h = input_size
    out_w, out_h = rendered_size
    sx, sy = out_w / in_w, out_h / in_h
    boxes: list[Box | None] = [None] * len(spec)
    for s in spec.speakers:
        if isinstance(s.face, str):
            continue
        x0, y0, x1, y1 = s.face
        if x0 < 0 or y0 < 0 or x1 > in_w or y1 > in_h:
            raise InputError(
                f"{where}: {s.label} face: {_fmt_box(s.face)} is outside {image} ({in_w}x{in_h} px); a box must lie "
                f"within [0, 0, {in_w}, {in_h}]"
            )
        boxes[s.index] = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    auto = [s for s in spec.speakers if s.face == "auto"]
    found = True
    if auto:
        given = [b for b in boxes if b is not None]
        free = [f for f in detected if not any(_inside(_centre(f), b) or _inside(_centre(b), f) for b in given)]
        if len(spec) == 1:
            # The official single-face pick: the largest face (none: the whole image).
            if free:
                boxes[0] = max(free, key=_area)
            else:
                found = False
        else:
            if len(auto) > len(free):
                taken = len(detected) - len(free)
                extra = f", {taken} of them under given boxes" if taken else ""
                raise InputError(
                    f'{where}: {auto[len(free)].label} face: "auto" but {image} has {len(detected)} detected '
                    f'face(s){extra} for {len(auto)} "auto" speaker(s); give this speaker\'s face as [x0, y0, x1, y1]'
                )
            for s, face in zip(auto, sorted(free, key=lambda f: _centre(f)[0])):
                boxes[s.index] = face
    placed = [(s, boxes[s.index]) for s in spec.speakers if boxes[s.index] is not None]
    for i, (a, box_a) in enumerate(placed):
        for b, box_b in placed[i + 1 :]:
            if _inside(_centre(box_b), box_a) or _inside(_centre(box_a), box_b):
                raise InputError(
                    f"{where}: {b.label} face: on the same face as {a.label} (one box's centre lies inside the "
                    "other); give every speaker their own face"
                )
    input_boxes = tuple(None if b is None else (b[0] / sx, b[1] / sy, b[2] / sx, b[3] / sy) for b in boxes)
    return FaceLayout(boxes=tuple(boxes), input_boxes=input_boxes, faces=tuple(detected), found=found)


# --- masks --------------------------------------------------------------------------------------------------------


def expand_box(box: Box | None, image_size: tuple[int, int], area: float = MASK_AREA) -> tuple[int, int, int, int]:
    """The official mask box of a face: ``area`` times its width and height around its centre, clipped to the
    image, truncated to whole pixels (None: the whole image)."""
    width, height = image_size
    if box is None:
        return 0, 0, width, height
    cx, cy = _centre(box)
    half_w, half_h = (box[2] - box[0]) * area / 2, (box[3] - box[1]) * area / 2
    return (
        int(max(cx - half_w, 0)),
        int(max(cy - half_h, 0)),
        int(min(cx + half_w, width)),
        int(min(cy + half_h, height)),
    )


@dataclass(frozen=True)
class MaskInfo:
    """What the report gives per speaker: ``mask_box`` (the expanded box, rendered pixels), ``mask_area`` (the
    mask's share of the frame), ``overlap_resolved`` (share of the frame this speaker's expanded box covered but a
    nearer face took)."""

    mask_box: tuple[int, int, int, int]
    mask_area: float
    overlap_resolved: float


def speaker_masks(
    boxes: list[Box | None], image_size: tuple[int, int], latent_hw: tuple[int, int], area: float = MASK_AREA
) -> tuple[torch.Tensor, list[MaskInfo]]:
    """Disjoint masks ``[S, h, w]`` (fp32, latent resolution) of the speakers' face ``boxes`` (rendered pixels):
    each the official one (1 inside the expanded box at pixel resolution, bilinear-resized), and where several are
    non-zero, the latent pixel goes to the speaker whose face centre is nearest (ties: the earlier speaker)."""
    width, height = image_size
    h_lat, w_lat = latent_hw
    expanded = [expand_box(b, image_size, area) for b in boxes]
    soft = []
    for x0, y0, x1, y1 in expanded:
        pixels = torch.zeros(1, 1, height, width)
        pixels[:, :, y0:y1, x0:x1] = 1.0
        soft.append(F.interpolate(pixels, size=(h_lat, w_lat), mode="bilinear", align_corners=False)[0, 0])
    masks = torch.stack(soft)
    resolved = torch.zeros(len(boxes))
    if len(boxes) > 1:
        ys = (torch.arange(h_lat, dtype=torch.float64) + 0.5) * (height / h_lat)
        xs = (torch.arange(w_lat, dtype=torch.float64) + 0.5) * (width / w_lat)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres = [_centre(b) if b is not None else (width / 2, height / 2) for b in boxes]
        distance = torch.stack([(grid_x - cx) ** 2 + (grid_y - cy) ** 2 for cx, cy in centres])
        distance = torch.where(masks > 0, distance, torch.full_like(distance, math.inf))
        owner = distance.argmin(dim=0)  # first minimum: ties go to the earlier speaker
        keep = torch.arange(len(boxes))[:, None, None] == owner[None]
        lost = (masks > 0) & ~keep
        resolved = lost.flatten(1).float().mean(dim=1)
        masks = torch.where(keep, masks, torch.zeros_like(masks))
    infos = [
        MaskInfo(mask_box=e, mask_area=float(m.mean()), overlap_resolved=float(r))
        for e, m, r in zip(expanded, masks, resolved)
    ]
    return masks, infos


def latent_activity(
    turns: tuple[tuple[float, float], ...], num_frames: int, fps: float, ratio: int = VIDEO_FRAMES_PER_LATENT
) -> torch.Tensor:
    """Bool ``[T]`` over the ``T = ceil((num_frames − 1)/ratio) + 1`` latent frames of a video of ``num_frames``:
    latent ``j`` is on when one of its video frames (``0`` for ``j = 0``, else ``ratio·j − ratio + 1 .. ratio·j``),
    spanning ``[f/fps, (f+1)/fps)``, overlaps a turn ``[start, end)``."""
    num_latents = (num_frames - 1 + ratio - 1) // ratio + 1
    frame = torch.arange(num_frames, dtype=torch.float64)
    start, stop = frame / fps, (frame + 1) / fps
    on = torch.zeros(num_frames, dtype=torch.bool)
    for t0, t1 in turns:
        on |= (start < t1) & (stop > t0)
    active = torch.zeros(num_latents, dtype=torch.bool)
    active[0] = on[0]
    for j in range(1, num_latents):
        active[j] = on[ratio * j - ratio + 1 : min(ratio * j + 1, num_frames)].any()
    return active


def frame_masks(masks: torch.Tensor, spec: SpeakerSpec, num_frames: int, fps: float) -> torch.Tensor:
    """The conditioning's face mask ``[1, S, T, h, w]``: ``T = 1`` (static) for tracks; with turns one mask per
    latent frame of the video, each speaker's on only where it talks."""
    if not spec.turns:
        return masks[None, :, None]
    active = torch.stack([latent_activity(s.turns, num_frames, fps) for s in spec.speakers])  # [S, T]
    return (masks[:, None] * active[:, :, None, None].to(masks.dtype))[None]


def window_masks(face_mask: torch.Tensor, frames: list[int]) -> torch.Tensor:
    """The window's part of a per-latent-frame mask ``[1, S, T, h, w]`` for absolute latent ``frames`` (like the
    audio rows: frames past the end of the video, the bridge frames of ``shift``, are zero: nobody talks there). A
    static mask (``T = 1``) is returned as is."""
    if face_mask.shape[2] == 1:
        return face_mask
    index = torch.as_tensor(frames, dtype=torch.long)
    inside = index < face_mask.shape[2]
    rows = face_mask[:, :, index.clamp(max=face_mask.shape[2] - 1).to(face_mask.device)]
    return rows * inside.to(rows.device, rows.dtype)[None, None, :, None, None]


# --- audio --------------------------------------------------------------------------------------------------------


def pad_tracks(wavs: list[np.ndarray]) -> list[np.ndarray]:
    """Every track zero-padded (silence) at its end to the longest one's length."""
    longest = max(len(w) for w in wavs)
    return [np.pad(np.asarray(w, dtype=np.float32), (0, longest - len(w))) for w in wavs]


def mix_tracks(wavs: list[np.ndarray], peak: float = MIX_PEAK) -> tuple[np.ndarray, list[float]]:
    """``(mix, gains)``: the sum of the padded tracks, every track scaled by one common gain (≤ 1) so that the mix
    peaks at ``peak`` at most (never clipped); one gain per track."""
    padded = pad_tracks(wavs)
    total = np.sum(np.stack(padded).astype(np.float64), axis=0)
    top = float(np.max(np.abs(total))) if total.size else 0.0
    gain = 1.0 if top <= peak else peak / top
    return (total * gain).astype(np.float32), [gain] * len(wavs)


@dataclass
class SpeakerAudio:
    """The decoded audio of a ``SpeakerSpec`` at the model's rate: ``tracks`` (one per speaker, padded to the longest;
    with turns one, the shared recording), every decoded file's ``seconds``, its native ``sample_rate`` (the same for
    all) and ``load_audio``'s ``checks``."""

    tracks: list[np.ndarray]
    seconds: list[float]
    sample_rate: int
    checks: list[dict] = field(default_factory=list)


def load_speaker_audio(
    spec: SpeakerSpec, sample_rate: int, max_seconds: float | None = None, allow_damaged: bool = False
) -> SpeakerAudio:
    """Decode every track (``avatar.io.audio.load_audio``) at ``sample_rate``; an unreadable, empty or all-silent
    track, tracks of different native sample rates, or a turn that starts after the shared recording ends is one
    line naming the speaker and the field."""
    from avatar.io.audio import load_audio

    where = f"speakers={spec.source}"
    owners = [None] if spec.turns else list(spec.speakers)
    wavs, checks = [], []
    for owner, path in zip(owners, spec.tracks):
        field_name = f"{owner.label} audio" if owner is not None else "audio (the shared recording)"
        info: dict = {}
        try:
            wav = load_audio(path, sample_rate, max_seconds=max_seconds, allow_damaged=allow_damaged, info=info)
        except InputError as err:
            raise InputError(f"{where}: {field_name}: {err}") from None
        if not np.any(wav):
            raise InputError(
                f"{where}: {field_name}: {path} is empty (every sample is silent); give a track with speech"
            )
        wavs.append(wav)
        checks.append(info)
    rates = [info.get("sample_rate") for info in checks]
    if len({r for r in rates if r is not None}) > 1:
        first = rates[0]
        odd = next(i for i, r in enumerate(rates) if r != first)
        raise InputError(
            f"{where}: {spec.speakers[odd].label} audio: {spec.tracks[odd]} is at {rates[odd]} Hz but "
            f"{spec.speakers[0].label}'s track is at {first} Hz; give every track at the same sample rate"
        )
    seconds = [info.get("decoded_seconds", len(w) / sample_rate) for info, w in zip(checks, wavs)]
    if spec.turns:
        for s in spec.speakers:
            for start, end in s.turns:
                if start >= seconds[0]:
                    raise InputError(
                        f"{where}: {s.label} turns: [{start:g}, {end:g}] starts after the shared recording ends "
                        f"({seconds[0]:.2f} s)"
                    )
    return SpeakerAudio(
        tracks=pad_tracks(wavs), seconds=seconds, sample_rate=int(rates[0] or sample_rate), checks=checks
    )


def soundtrack(spec: SpeakerSpec, audio: SpeakerAudio) -> tuple[np.ndarray | None, list[float]]:
    """``(mix, gains)`` of the muxed sound: the tracks decoded again at their native rate (``audio.sample_rate``;
    an out-of-range float track rescaled as ``load_audio`` does), padded and mixed without clipping
    (:func:`mix_tracks`). One file (a single track, or the shared recording of turns) is muxed as it is: ``(None,
    gains)``. ``gains``: every speaker's track as heard in the video relative to its file (the mix gain times the
    track's own rescale)."""
    rescale = [float(c.get("gain", 1.0)) for c in audio.checks]
    if spec.turns or len(spec) == 1:
        return None, [rescale[0]] * len(spec)
    from avatar.io.audio import load_audio

    native = [load_audio(path, audio.sample_rate, allow_damaged=True) for path in spec.tracks]
    mix, gains = mix_tracks(native)
    return mix, [g * r for g, r in zip(gains, rescale)]


def report_section(
    spec: SpeakerSpec, layout: FaceLayout, infos: list[MaskInfo], gains: list[float], seconds: list[float]
) -> list[dict]:
    """The report's ``speakers`` section: per speaker its name, face (given or auto), box (input-image pixels),
    mask box (rendered pixels), mask area and overlap resolved (shares of the frame), gain, track or turns."""
    out = []
    for s, box, info, gain in zip(spec.speakers, layout.input_boxes, infos, gains):
        entry = {
            "name": s.name,
            "face": "auto" if s.face == "auto" else "given",
            "box": None if box is None else [round(v, 1) for v in box],
            "mask_box": list(info.mask_box),
            "mask_area": round(info.mask_area, 6),
            "overlap_resolved": round(info.overlap_resolved, 6),
            "gain": round(gain, 6),
        }
        if spec.turns:
            entry["turns"] = [list(t) for t in s.turns]
            entry["audio"] = spec.shared_audio
        else:
            entry["audio"] = s.audio
            entry["seconds"] = round(seconds[s.index], 3)
        out.append(entry)
    return out
