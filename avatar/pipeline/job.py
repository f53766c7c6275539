"""Job and input contracts of the renderer: what one video needs (``Job``), the validated decoded inputs
(``Inputs``, stage 1), and the small shared helpers (stage timer, resolved config, dtypes)."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from avatar.config import FPS, RunConfig, SamplingConfig
from avatar.pipeline.speakers import SpeakerAudio, SpeakerSpec
from avatar.pipeline.state import file_sha256


@dataclass
class Job:
    """One video to render."""

    image: str
    audio: str
    prompt: str
    output: str
    seed: int
    steps: int
    strategy: str = "auto"
    videoid: str = ""
    speakers: SpeakerSpec | None = None
    """Several speakers (``avatar/pipeline/speakers.py``); then ``audio`` is the shared recording of turns, or empty
    (one track per speaker)."""

    def audio_files(self) -> dict[str, str]:
        """Label → path of every audio file this job reads (``audio``, or one per speaker track)."""
        return {"audio": self.audio} if self.speakers is None else self.speakers.audio_files()


@dataclass
class Inputs:
    """Stage 1: the validated, decoded inputs."""

    image: object  # PIL.Image RGB, resized to the bucket
    width: int
    height: int
    wav: np.ndarray  # float32 mono at audio.sample_rate
    num_frames: int  # video frames = audio length at fps (rounded to the nearest frame)
    hashes: dict[str, str]
    audio_check: dict = field(default_factory=dict)  # decoded vs declared seconds, damaged (audio.allow_damaged)
    input_size: tuple[int, int] = (0, 0)  # the image as given (width, height), before the bucket resize
    speaker_audio: SpeakerAudio | None = None  # several speakers: every track, padded to the longest


@dataclass
class StageTimer:
    """Seconds per named stage (``with timer("decode"): ...``), summed over repeats. Stages named in
    ``count_flops`` also have their FLOPs counted (``torch.utils.flop_counter``) into ``flops``."""

    seconds: dict[str, float] = field(default_factory=dict)
    count_flops: frozenset[str] = frozenset()
    flops: dict[str, int] = field(default_factory=dict)

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.counter = None
                if name in timer.count_flops:
                    from avatar.memory.flops import counter

                    self.counter = counter().__enter__()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start
                if self.counter is not None:
                    self.counter.__exit__(*exc)
                    timer.flops[name] = timer.flops.get(name, 0) + self.counter.get_total_flops()

        return _Ctx()


def peak_host_memory_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_inputs(cfg: RunConfig, image_path: str, audio_path: str, speakers: SpeakerSpec | None = None) -> Inputs:
    """Stage 1: decode and resize the portrait, decode and resample the audio (with ``speakers``: every track,
    padded to the longest; ``wav`` is then the first track)."""
    from avatar.io.audio import load_audio
    from avatar.io.image import bucket_size, load_image, resize_to_bucket

    image = load_image(image_path)
    input_size = image.size
    width, height = bucket_size(image.width, image.height, cfg.model.image_size, cfg.model.bucket_multiple)
    image = resize_to_bucket(image, (width, height))
    audio_check: dict = {}
    speaker_audio = None
    if speakers is not None:
        from avatar.pipeline.speakers import load_speaker_audio

        speaker_audio = load_speaker_audio(
            speakers, cfg.audio.sample_rate, max_seconds=cfg.audio.max_seconds, allow_damaged=cfg.audio.allow_damaged
        )
        wav = speaker_audio.tracks[0]
        audio_check = dict(speaker_audio.checks[0])
        audio_check["decoded_seconds"] = len(wav) / cfg.audio.sample_rate
        audio_check["damaged"] = any(c.get("damaged", False) for c in speaker_audio.checks)
        files = {"image": image_path, **speakers.audio_files()}
    else:
        wav = load_audio(
            audio_path,
            cfg.audio.sample_rate,
            max_seconds=cfg.audio.max_seconds,
            allow_damaged=cfg.audio.allow_damaged,
            info=audio_check,
        )
        files = {"image": image_path, "audio": audio_path}
    num_frames = max(1, round(len(wav) * FPS / cfg.audio.sample_rate))
    hashes = {label: file_sha256(path) for label, path in files.items()}
    return Inputs(
        image=image,
        width=width,
        height=height,
        wav=wav,
        num_frames=num_frames,
        hashes=hashes,
        audio_check=audio_check,
        input_size=input_size,
        speaker_audio=speaker_audio,
    )


def config_dict(cfg: RunConfig) -> dict:
    """The resolved config as plain data (strings kept literally: a ``${...}`` in a prompt is never resolved)."""
    from avatar.config import plain

    return plain(cfg)


def with_steps(sampling: SamplingConfig, steps: int) -> SamplingConfig:
    return replace(sampling, steps=steps)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Decoded ``[n, 3, H, W]`` in [-1, 1] -> uint8 ``[n, H, W, 3]`` by truncation, as the official code does."""
    return ((frames.float() / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
