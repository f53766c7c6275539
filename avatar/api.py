"""The Python API: models loaded once, videos rendered from paths or from arrays in memory.

    from avatar import AvatarPipeline

    pipe = AvatarPipeline.from_pretrained("weights", model="hunyuan_avatar")
    result = pipe(image="portrait.jpg", audio="speech.wav", prompt="A woman speaks.", seed=0)
    result.save("out.mp4")          # the same mp4 and report the command line writes
    result.frames                   # uint8 [frames, H, W, 3]
    result.audio, result.sample_rate

``from_pretrained`` takes any field of the typed config as a keyword (``sampling={"steps": 20}``, ``device="cpu"``,
``parallel={"ulysses": 4}``) or as command-line overrides (``overrides=["sampling.steps=20"]``); it composes and
checks the config, the plan and the weights exactly as ``launch.generate`` does, then loads the models. Each call is
checked with the command line's validation before anything renders (``InputError`` with the same one-line message)
and rendered by the same ``Renderer``. Under torchrun every rank creates the default process group itself
(``torch.distributed.init_process_group()``), then calls ``from_pretrained`` and every call with the same arguments;
the pipeline renders on that group (rank 0 gets the result, the other ranks None) and leaves it to the caller to
destroy. Without a group it is a world of one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avatar.io.errors import InputError


def _quote(value: str) -> str:
    """A string as a Hydra override value that reads back unchanged (quotes, backslashes, ``${``)."""
    body = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    return "'" + body.replace("${", "\\${") + "'"


def _overrides(options: dict, prefix: str = "") -> list[str]:
    """Keyword options (nested dicts for config sections) as command-line overrides."""
    out = []
    for key, value in options.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _overrides(value, dotted + ".")
        elif value is None:
            out.append(f"{dotted}=null")
        elif isinstance(value, bool):
            out.append(f"{dotted}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            out.append(f"{dotted}={value!r}")
        elif isinstance(value, (list, tuple)):
            out.append(f"{dotted}=[{','.join(_quote(v) if isinstance(v, str) else repr(v) for v in value)}]")
        else:
            from avatar.compose import LITERAL_KEYS

            text = os.fspath(value) if isinstance(value, Path) else str(value)
            out.append(f"{dotted}={text if dotted in LITERAL_KEYS else _quote(text)}")
    return out


@dataclass
class AvatarResult:
    """One rendered video: its frames, its sound track (the input speech, mono float32) and its run report."""

    frames: np.ndarray
    """uint8 ``[frames, height, width, 3]`` RGB, exactly what was encoded into the mp4."""
    audio: np.ndarray
    """The speech as float32 mono samples at ``sample_rate`` (what the audio features were computed from)."""
    sample_rate: int
    fps: int
    report: dict
    """The run report (``<output>.json`` of the command line)."""
    _video: Path = field(repr=False, default=None)
    _folder: tempfile.TemporaryDirectory = field(repr=False, default=None)

    def save(self, path, overwrite: bool = False) -> str:
        """Write the mp4 (H.264 + the speech as AAC) and its report to ``path`` and ``path + ".json"`` atomically.
        Returns the absolute path."""
        from avatar.io.atomic import atomic_path, atomic_write_json
        from avatar.validate import check_output_path

        target = check_output_path(path, overwrite)
        report = dict(self.report, output=target)
        with atomic_path(target) as tmp:
            shutil.copyfile(self._video, tmp)
        atomic_write_json(target + ".json", report)
        return target


class AvatarPipeline:
    """Loaded models plus the config they were loaded with; call it to render a video."""

    def __init__(self, cfg, renderer, topo) -> None:
        self.cfg = cfg
        self.renderer = renderer
        self.topo = topo

    @classmethod
    def from_pretrained(
        cls,
        weights="weights/hunyuan_avatar",
        model: str = "hunyuan_avatar",
        overrides: list[str] | tuple = (),
        **options,
    ) -> AvatarPipeline:
        """Compose the config (``model``, ``weights``, then ``overrides``, then the keyword ``options``), check it,
        and load the models (once). Raises InputError for a bad config, plan or weights folder."""
        from avatar.compose import compose
        from avatar.parallel.group import joined_env
        from avatar.plan import resolve_plan
        from avatar.validate import check_config, check_weights

        argv = [f"model={model}", f"weights={os.fspath(weights)}", *overrides, *_overrides(options)]
        cfg = compose(argv)
        check_config(cfg)
        env = joined_env(cfg.device)
        plan = resolve_plan(cfg, env.world_size, env.local_world_size if env.distributed else None)
        check_weights(cfg)
        job_topo, _ = plan.build_mesh(env.device.type).topologies(env.rank, env.device, cfg.attention)
        from avatar.pipeline.run import Renderer

        renderer = Renderer(cfg, job_topo)
        return cls(cfg, renderer, job_topo)

    def __call__(
        self,
        image,
        audio=None,
        prompt: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        strategy: str | None = None,
        speakers=None,
    ) -> AvatarResult | None:
        """Render one video. ``image``: a path, a ``PIL.Image`` or a uint8 array (``[H, W]``, ``[H, W, 3]`` or
        ``[H, W, 4]``); ``audio``: a path or ``(samples, sample_rate)`` (float or int16, mono ``[n]`` or
        ``[n, channels]``). ``None`` takes the config's prompt, seed, steps and long-audio strategy. ``speakers``
        (several people talking, README "Several speakers"): the path of a speakers JSON, or its contents as a list
        of ``{"audio": path or (samples, sample_rate), "face": "auto" or [x0, y0, x1, y1], "name": ...}`` (or the
        object form with turns; ``audio`` may then be the shared recording). Raises InputError (the command line's
        message) before anything renders. Rank 0 gets the result, other ranks None."""
        from avatar.config import FPS, Strategy
        from avatar.validate import check_job as validate_job

        cfg = self.cfg
        strategy = cfg.long.strategy if strategy is None else strategy
        choices = [s.value for s in Strategy]
        if str(strategy) not in choices:
            raise InputError(f"strategy={strategy!r} is not valid; choose one of: {', '.join(choices)}")
        strategy = Strategy(str(strategy))
        folder = tempfile.TemporaryDirectory(prefix="avatar-api-")
        try:
            from avatar.pipeline.job import Job

            spec = None
            if speakers is not None:
                spec = _speakers(speakers, audio, Path(folder.name))
            elif audio is None:
                raise InputError("audio: give the speech (a path or (samples, sample_rate)), or speakers=[...]")
            job = Job(
                image=_image_file(image, Path(folder.name)),
                audio=(spec.shared_audio or "") if spec is not None else _audio_file(audio, Path(folder.name)),
                speakers=spec,
                prompt=cfg.prompt if prompt is None else str(prompt),
                output=str(Path(folder.name) / "video.mp4"),
                seed=cfg.seed if seed is None else int(seed),
                steps=cfg.sampling.steps if steps is None else steps,
                strategy=strategy,
                videoid="api",
            )
            validate_job(
                cfg,
                job,
                {"image": job.image, **job.audio_files()},
                overwrite=False,
                sequence_degree=getattr(self.topo.seq, "world", 1),
            )
            frames: list = []
            report = self.renderer.render(job, frames=frames if self.topo.is_main else None)
            if not self.topo.is_main:
                folder.cleanup()
                return None
            from avatar.io.audio import load_audio

            if spec is None:
                wav = load_audio(job.audio, cfg.audio.sample_rate, max_seconds=cfg.audio.max_seconds)
            else:  # the soundtrack at the model's rate: the shared recording, or the tracks mixed
                from avatar.pipeline.speakers import load_speaker_audio, mix_tracks

                tracks = load_speaker_audio(spec, cfg.audio.sample_rate, allow_damaged=True).tracks
                wav = tracks[0] if len(tracks) == 1 else mix_tracks(tracks)[0]
            return AvatarResult(
                frames=np.concatenate(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8),
                audio=wav,
                sample_rate=cfg.audio.sample_rate,
                fps=FPS,
                report=report,
                _video=Path(job.output),
                _folder=folder,
            )
        except BaseException:
            folder.cleanup()
            raise

    def close(self) -> None:
        """Drop the loaded models (the process group, if any, is the caller's)."""
        self.renderer = None

    def __enter__(self) -> AvatarPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _image_file(image, folder: Path) -> str:
    """A path as given; a PIL image or an array saved losslessly as PNG."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InputError(
                f"image: an array must be uint8 [H, W], [H, W, 3] or [H, W, 4]; got {image.dtype} {list(image.shape)}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise InputError(f"image: give a path, a PIL.Image or a uint8 array, not {type(image).__name__}")
    path = folder / "image.png"
    image.save(path, format="PNG")
    return str(path)


def _speakers(speakers, audio, folder: Path):
    """``speakers=`` of a call as a ``SpeakerSpec``: a JSON path, or its contents (tracks given as arrays are saved
    beside the call's other temporaries); ``audio`` is the shared recording of turns, if given."""
    from avatar.io.speakers import parse_speakers, read_speakers

    shared = None if audio is None else _audio_file(audio, folder, "shared.wav")
    if isinstance(speakers, (str, os.PathLike)):
        return read_speakers(speakers, shared_audio=shared)
    data = speakers
    entries = data.get("speakers") if isinstance(data, dict) else data
    if isinstance(entries, (list, tuple)):
        entries = [
            {**e, "audio": _audio_file(e["audio"], folder, f"speaker{i + 1}.wav")}
            if isinstance(e, dict) and e.get("audio") is not None
            else e
            for i, e in enumerate(entries)
        ]
        data = {**data, "speakers": entries} if isinstance(data, dict) else entries
    if isinstance(data, dict) and data.get("audio") is not None:
        data = {**data, "audio": _audio_file(data["audio"], folder, "shared.wav")}
    return parse_speakers(data, "(the speakers argument)", os.getcwd(), shared_audio=shared)


def _audio_file(audio, folder: Path, name: str = "audio.wav") -> str:
    """A path as given; ``(samples, sample_rate)`` saved losslessly as a float WAV."""
    if isinstance(audio, (str, os.PathLike)):
        return os.fspath(audio)
    import soundfile as sf

    if not (isinstance(audio, tuple) and len(audio) == 2):
        raise InputError(f"audio: give a path or (samples, sample_rate), not {type(audio).__name__}")
    samples, rate = audio
    samples = np.asarray(samples)
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise InputError(f"audio: sample_rate={rate!r} is invalid; give a positive integer (Hz)")
    if samples.ndim not in (1, 2) or not (np.issubdtype(samples.dtype, np.floating) or samples.dtype == np.int16):
        raise InputError(
            f"audio: samples must be float or int16, [n] or [n, channels]; got {samples.dtype} {list(samples.shape)}"
        )
    path = folder / name
    subtype = "PCM_16" if samples.dtype == np.int16 else "FLOAT"
    sf.write(
        str(path), samples if samples.dtype == np.int16 else samples.astype(np.float32), int(rate), subtype=subtype
    )
    return str(path)
