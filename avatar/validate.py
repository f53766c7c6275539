"""The one validation: ``validate(cfg, inputs)`` holds every cross-field rule and every check of the inputs that
needs no model, and runs before anything is built or created, on every rank, for the CLI, batches, ``launch.submit``
and any Python caller (a server would call it per request).

Order: the config's own rules (seed, steps, encoder settings, model geometry, devices and optional packages, batch
sharding), the parallel plan for the world size and GPUs per node (``ParallelPlan.resolve`` names degrees, world and
heads; the one plan the run then builds its mesh from), the jobs' files (image and audio decoded, several speakers'
tracks and faces, output paths:
folder, name length, never one of the run's inputs, existing files; with ``attention.backend=xfuser`` the bucketed
image's tokens per frame against ring·ulysses), then the weights (``avatar.weights.verify``). Every failure is one
``InputError`` line; nothing is written.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from avatar.config import PathKind, Range, RunConfig, domain_of
from avatar.io.errors import InputError
from avatar.io.manifest import Manifest, Row
from avatar.plan import ParallelPlan, resolve_plan

log = logging.getLogger("launch.validate")


@dataclass
class Validated:
    """What a validated launch renders: its plan, its jobs and (batches) the rows refused with ``on_error=skip``,
    the manifest and this shard's rows (every one ends in the summary)."""

    cfg: RunConfig
    plan: ParallelPlan
    jobs: list = field(default_factory=list)
    bad: list[tuple[Row, str]] = field(default_factory=list)
    manifest: Manifest | None = None
    shard_rows: list[Row] = field(default_factory=list)


def validate(
    cfg: RunConfig, inputs: list | None = None, world_size: int = 1, gpus_per_node: int | None = None
) -> Validated:
    """Check ``cfg`` and its jobs for a launch of ``world_size`` ranks, ``gpus_per_node`` per node (torchrun's
    ``LOCAL_WORLD_SIZE``; None = one node); raises ``InputError`` (exit 2) naming the field, file or value and what
    would be valid. ``inputs``: the ``Job`` list to render (None: the job of ``image=``/``audio=`` or the rows of
    ``batch=``). The returned ``plan`` is the run's one plan."""
    check_config(cfg)
    from avatar.io.ffmpeg import probe_ffmpeg

    probe_ffmpeg()  # the encoder of every output, before any model (cached per binary)
    plan = resolve_plan(cfg, world_size, gpus_per_node)
    if inputs is not None:
        jobs = list(inputs)
        check_jobs(cfg, jobs, plan.sequence_size)
        result = Validated(cfg, plan, jobs)
    elif cfg.batch.manifest:
        result = _validate_batch(cfg, plan)
    else:
        from avatar.pipeline.state import StateStore, check_state_folder, single_state_dir

        job = single_job(cfg)
        check_state_folder(single_state_dir(job.output), f"output={job.output}")
        # finished before (a kill took only its report or the state's removal): the run completes what is left
        done = batch_row_done(StateStore(single_state_dir(job.output)), cfg, job)
        check_jobs(cfg, [job], plan.sequence_size, overwrite=True if done else None)
        result = Validated(cfg, plan, [job])
    check_weights(cfg)
    return result


# --- the config on its own ----------------------------------------------------------------------------------------


def _check_fp8_compute(cfg: RunConfig) -> None:
    """``fp8_compute=true`` is refused (not silently dropped) where it cannot run as asked: without the fp8
    checkpoint, off a GPU with fp8 tensor cores, or with a compute dtype other than bf16."""
    if not cfg.fp8_compute:
        return
    if not cfg.fp8:
        raise InputError("fp8_compute=true needs fp8=true (the fp8 checkpoint); add fp8=true or drop fp8_compute")
    import torch

    from avatar.weights.fp8 import fp8_compute_supported

    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else str(cfg.device)
    why = fp8_compute_supported("cpu" if device == "auto" else device)
    if why is not None:
        raise InputError(
            f"fp8_compute=true needs a GPU with fp8 tensor cores (compute capability ≥ 8.9), but {why}; "
            "use fp8_compute=false (fp8 weights dequantised per call)"
        )
    if cfg.dtype not in ("auto", "bf16"):
        raise InputError(f"fp8_compute=true computes in bf16, not dtype={cfg.dtype}; use dtype=auto or dtype=bf16")


# --- every field against its declared domain -----------------------------------------------------------------


_PATH_WORDS = {
    PathKind.file: "the path of an existing file",
    PathKind.folder: "the path of an existing folder",
    PathKind.output: "a path to write",
}


def check_host(cfg: RunConfig) -> None:
    """What the config needs of this machine: a visible CUDA device for ``device=cuda``, fp8 tensor cores for
    ``fp8_compute``, and the optional packages of ``attention.kernel`` and ``attention.backend``."""
    from avatar.attention.sage import check_kernel

    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InputError("device=cuda but no CUDA device is visible here; use device=auto or device=cpu")
    _check_fp8_compute(cfg)
    check_kernel(cfg.attention.kernel, str(cfg.device))
    if cfg.attention.kernel == "flash" and importlib.util.find_spec("flash_attn") is None:
        raise InputError(
            "attention.kernel=flash needs the flash-attn package; install it or use attention.kernel=sdpa"
        )
    if cfg.attention.backend == "xfuser" and importlib.util.find_spec("xfuser") is None:
        raise InputError(
            "attention.backend=xfuser needs the xfuser package (pip install .[xdit]); or use attention.backend=native"
        )


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _field_type(hint) -> tuple[type, bool, bool]:
    """``(base, optional, is_list)`` of a field's type hint (``Optional[int]`` → ``(int, True, False)``)."""
    optional = False
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        optional = True
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def declared_fields(cls=RunConfig, prefix: str = ""):
    """``(dotted key, dataclass field, type hint)`` of every leaf field of ``cls``, in declaration order (sections
    of ``RunConfig`` in the order they are declared, top-level fields last)."""
    sections, leaves = [], []
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            sections.append(declared_fields(hint, f"{prefix}{f.name}."))
        else:
            leaves.append((f"{prefix}{f.name}", f, hint))
    for section in sections:
        yield from section
    yield from leaves


def value_problem(key: str, value, declared: Range | PathKind, hint) -> str | None:
    """What is wrong with ``value`` for the field ``key`` of type ``hint`` declared ``declared`` (one line naming the
    key, the value and the valid range), or None."""
    base, optional, is_list = _field_type(hint)
    if isinstance(declared, PathKind):
        if value is None or value == "":
            return None  # unset: the rules that need it ("missing image", ...) say so
        if not isinstance(value, str) or "\x00" in value:
            return f"{key}={value!r} is invalid; give {_PATH_WORDS[declared]} (text without NUL bytes)"
        return None
    if value is None:
        return None if optional else f"{key}=None is invalid; give {declared.describe(base is int)}"
    if declared.auto:
        text = str(value).strip().lower() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
        if text == "auto":
            return None
        number = int(text) if text is not None and text.lstrip("-").isdigit() else None
        if number is not None and declared.holds(number, integer=True):
            return None
        return f"{key}={value!r} is invalid; give {declared.describe(True)}"
    if is_list:
        items = list(value) if isinstance(value, (list, tuple)) else None
        if items is None or not all(declared.holds(item, base is int) for item in items):
            return f"{key}={value!r} is invalid; give {declared.describe(base is int)}"
        return None
    if not declared.holds(value, base is int):
        return f"{key}={value!r} is invalid; give {declared.describe(base is int)}"
    return None


def check_domains(cfg: RunConfig) -> None:
    """Every numeric field within the ``Range`` and every path field of the ``PathKind`` declared next to its type
    in ``avatar/config.py``, then every cross-field ``RULES`` entry; the first problem is one ``InputError`` line
    naming the key, the value and what is valid. Opens no file."""
    for key, f, hint in declared_fields():
        declared = f.metadata.get("range") or f.metadata.get("path")
        if declared is None:
            continue
        problem = value_problem(key, _get(cfg, key), declared, hint)
        if problem:
            raise InputError(problem)
    for rule in RULES:
        problem = rule.check(cfg)
        if problem:
            raise InputError(problem)


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@dataclass(frozen=True)
class Rule:
    """A rule between fields: the ``keys`` it relates, the rule in words (``docs/config.md``) and its check (the
    problem in one line, or None). The fields' own ranges hold when it runs."""

    keys: tuple[str, ...]
    text: str
    check: typing.Callable[[RunConfig], str | None]


def _context_rule(cfg: RunConfig) -> str | None:
    a = cfg.audio
    if a.context_seconds * 2 >= a.chunk_seconds:
        return (
            f"audio.context_seconds={a.context_seconds} must be less than half of audio.chunk_seconds="
            f"{a.chunk_seconds} (each Whisper piece keeps its middle)"
        )
    return None


def _head_rule(cfg: RunConfig) -> str | None:
    m = cfg.model
    if len(m.rope_axes) != 3:
        return f"model.rope_axes={m.rope_axes} is invalid; give three even integers ≥ 2 (the t, h and w axes)"
    if m.hidden_size % m.num_heads or sum(m.rope_axes) != m.hidden_size // m.num_heads:
        return (
            f"model.hidden_size={m.hidden_size} / model.num_heads={m.num_heads} must give a head width equal to "
            f"sum(model.rope_axes)={sum(m.rope_axes)} ({m.rope_axes})"
        )
    return None


def _adapter_rule(cfg: RunConfig) -> str | None:
    m = cfg.model
    bad = [i for i in m.adapter_after_double if not 0 <= i < m.depth_double]
    if bad:
        return (
            f"model.adapter_after_double={m.adapter_after_double}: {bad} are not double-block indices "
            f"0..{m.depth_double - 1}"
        )
    return None


def _patch_rule(cfg: RunConfig) -> str | None:
    p = cfg.model.patch_size
    if len(p) != 3 or p[0] != 1:
        return f"model.patch_size={p} must be [1, p, p] (one token frame per latent frame)"
    return None


def _bucket_rule(cfg: RunConfig) -> str | None:
    m = cfg.model
    unit = m.vae_spatial_ratio * math.lcm(m.patch_size[1], m.patch_size[2])
    if m.bucket_multiple % unit:
        return (
            f"model.bucket_multiple={m.bucket_multiple} is invalid with model.vae_spatial_ratio={m.vae_spatial_ratio} "
            f"and model.patch_size={m.patch_size}; give a multiple of {unit} (every rendered side must split into "
            "whole patches of latent pixels)"
        )
    if m.image_size % m.bucket_multiple:
        return (
            f"model.image_size={m.image_size} must be a positive multiple of model.bucket_multiple={m.bucket_multiple}"
        )
    return None


def _window_rule(cfg: RunConfig) -> str | None:
    m = cfg.model
    r = m.vae_temporal_ratio
    if m.window_frames < r + 1 or (m.window_frames - 1) % r:
        return (
            f"model.window_frames={m.window_frames} is invalid with model.vae_temporal_ratio={r}; give {r}·k + 1 "
            f"video frames with k ≥ 1 ({r + 1}, {2 * r + 1}, {3 * r + 1}, …; official 129)"
        )
    return None


def _overlap_rule(cfg: RunConfig) -> str | None:
    m = cfg.model
    window = (m.window_frames - 1) // m.vae_temporal_ratio + 1
    if cfg.long.overlap_frames >= window:
        return (
            f"long.overlap_frames={cfg.long.overlap_frames} with model.window_frames={m.window_frames} (a window of "
            f"{window} latent frames): overlap must be in 0..{window - 1} (0: a quarter window)"
        )
    return None


def _tile_rule(key: str, tile: str, stride: str, ratio: str, unit: str):
    def check(cfg: RunConfig) -> str | None:
        m = cfg.model
        t, s, r = getattr(m, tile), getattr(m, stride), getattr(m, ratio)
        if t % r:
            return f"model.{tile}={t} is invalid with model.{ratio}={r}; give a multiple of {r} ({unit})"
        if s % r or s > t:
            return (
                f"model.{stride}={s} is invalid with model.{tile}={t} and model.{ratio}={r}; give a multiple of {r} "
                f"from {r} to {t} ({unit})"
            )
        return None

    return Rule(
        (f"model.{tile}", f"model.{stride}", f"model.{ratio}"),
        f"the {key} tile and its stride are multiples of model.{ratio} ({unit}), the stride at most the tile",
        check,
    )


def _shard_rule(cfg: RunConfig) -> str | None:
    index, count = cfg.batch.shard_index, cfg.batch.shard_count
    if (index is None) != (count is None):
        return "give both batch.shard_index and batch.shard_count, or neither"
    if count is not None and not index < count:
        return f"batch.shard_index={index} must be in 0..{count - 1} (batch.shard_count={count})"
    return None


#: The rules between fields, in the order they are checked (after every field's own range).
RULES: tuple[Rule, ...] = (
    Rule(
        ("audio.context_seconds", "audio.chunk_seconds"),
        "the two contexts of a Whisper piece leave room for its middle: 2 · context < chunk",
        _context_rule,
    ),
    Rule(
        ("model.hidden_size", "model.num_heads", "model.rope_axes"),
        "the head width hidden_size / num_heads is a whole number equal to sum(rope_axes) (three even axes t, h, w)",
        _head_rule,
    ),
    Rule(
        ("model.adapter_after_double", "model.depth_double"),
        "every audio-adapter index is a double block: 0 ≤ i < depth_double",
        _adapter_rule,
    ),
    Rule(("model.patch_size",), "the patch is [1, p, p]: one token frame per latent frame", _patch_rule),
    Rule(
        ("model.image_size", "model.bucket_multiple", "model.vae_spatial_ratio", "model.patch_size"),
        "bucket_multiple is a multiple of vae_spatial_ratio · p (whole latent patches on every rendered side, 16 "
        "for the official model); image_size is a multiple of bucket_multiple",
        _bucket_rule,
    ),
    Rule(
        ("model.window_frames", "model.vae_temporal_ratio"),
        "a window is vae_temporal_ratio · k + 1 video frames with k ≥ 1 (129 = 4 · 32 + 1: 33 latent frames)",
        _window_rule,
    ),
    Rule(
        ("long.overlap_frames", "model.window_frames"),
        "the overlap of blend/segments windows is less than a window's latent frames, (window_frames - 1) / "
        "vae_temporal_ratio + 1 (checked for every strategy: a manifest row may choose blend or segments)",
        _overlap_rule,
    ),
    _tile_rule("VAE temporal", "vae_tile_frames", "vae_tile_stride_frames", "vae_temporal_ratio", "video frames"),
    _tile_rule("VAE spatial", "vae_tile_size", "vae_tile_stride", "vae_spatial_ratio", "pixels"),
    Rule(
        ("batch.shard_index", "batch.shard_count"),
        "both or neither; 0 ≤ shard_index < shard_count",
        _shard_rule,
    ),
)


def check_config(cfg: RunConfig, host: bool = True) -> None:
    """The config on its own (no files opened): every field's declared domain and the rules between fields
    (``check_domains``), then the placement, the cache settings, with ``host`` what this machine must have for them
    (``check_host``), and batch mode. The server checks its host once at start-up and each request's fields with
    ``host=False``."""
    from avatar.memory.apply import check_placement
    from avatar.pipeline.adaptive import check_cache_settings

    check_domains(cfg)
    check_placement(cfg)
    check_cache_settings(cfg.sampling)
    if host:
        check_host(cfg)
    if cfg.batch.manifest:
        if cfg.speakers:
            raise InputError(
                f'speakers={cfg.speakers} is for one video; in a batch give each row its own "speakers" (JSON Lines)'
            )
        if cfg.image or cfg.audio.path:
            raise InputError(
                "batch= takes the image and audio of each row from the manifest; drop image=/audio= from the command"
            )
        if not cfg.output_dir:
            raise InputError(f"batch={cfg.batch.manifest} needs output_dir=DIR (the folder of <videoid>.mp4 outputs)")
    elif cfg.output_dir:
        raise InputError("output_dir= is for batches (batch=MANIFEST); for one video give output=PATH.mp4")


# --- jobs ---------------------------------------------------------------------------------------------------------


def single_job(cfg: RunConfig):
    from avatar.pipeline.job import Job

    speakers = None
    if cfg.speakers:
        from avatar.io.speakers import read_speakers

        if not cfg.image:
            raise InputError(f"speakers={cfg.speakers} needs image=PATH: the portrait with every speaker's face")
        speakers = read_speakers(cfg.speakers, shared_audio=cfg.audio.path)
    missing = [name for name, value in (("image", cfg.image), ("audio", cfg.audio.path)) if not value]
    if missing and speakers is None:
        raise InputError(
            f"missing {' and '.join(missing)}: give image=PATH audio=PATH (or batch=MANIFEST output_dir=DIR, or "
            "image=PATH speakers=PATH.json for several speakers)"
        )
    return Job(
        image=cfg.image,
        audio=(speakers.shared_audio or "") if speakers is not None else cfg.audio.path,
        speakers=speakers,
        prompt=cfg.prompt,
        output=cfg.output.path,
        seed=cfg.seed,
        steps=cfg.sampling.steps,
        strategy=cfg.long.strategy,
        videoid=Path(cfg.output.path).stem,
    )


def row_job(cfg: RunConfig, row: Row):
    from avatar.pipeline.job import Job

    return Job(
        image=row.image,
        audio=row.audio,
        speakers=row.speakers,
        prompt=row.prompt or cfg.prompt,
        output=str(Path(cfg.output_dir) / f"{row.videoid}.mp4"),
        seed=int(row.overrides.get("seed", cfg.seed)),
        steps=int(row.overrides.get("steps", cfg.sampling.steps)),
        strategy=row.overrides.get("strategy", cfg.long.strategy),
        videoid=row.videoid,
    )


def run_inputs(cfg: RunConfig, jobs: list) -> dict[str, str]:
    """``field=path`` label → path of every file this run reads (outputs may never be one of them)."""
    inputs = {}
    for job in jobs:
        inputs[f"image ({job.videoid})" if cfg.batch.manifest else "image"] = job.image
        for label, path in job.audio_files().items():
            inputs[f"{label} ({job.videoid})" if cfg.batch.manifest else label] = path
    if cfg.speakers:
        inputs["speakers"] = cfg.speakers
    if cfg.batch.manifest:
        inputs["batch"] = cfg.batch.manifest
    if cfg.prompt_file:
        inputs["prompt_file"] = cfg.prompt_file
    return inputs


def check_job(cfg: RunConfig, job, inputs: dict, overwrite: bool | None = None, sequence_degree: int = 1) -> None:
    """Everything about one job that can be checked without a model. ``sequence_degree``: the plan's ring·ulysses
    (the xfuser backend's token rule depends on it)."""
    from avatar.io.audio import load_audio
    from avatar.io.image import check_geometry, load_image

    check_steps(job.steps)
    check_seed(job.seed)
    image = load_image(job.image)
    check_geometry(job.image, image.width, image.height, cfg.model.image_size, cfg.model.bucket_multiple)
    if cfg.attention.backend == "xfuser":
        check_xfuser_image(cfg, image.width, image.height, sequence_degree)
    if getattr(job, "speakers", None) is not None:
        check_speakers(cfg, job, image)
    else:
        load_audio(
            job.audio, cfg.audio.sample_rate, max_seconds=cfg.audio.max_seconds, allow_damaged=cfg.audio.allow_damaged
        )
    check_output_path(
        job.output,
        cfg.overwrite if overwrite is None else overwrite,
        inputs=inputs,
        folder_may_be_missing=bool(cfg.output_dir),
    )


def check_speakers(cfg: RunConfig, job, image) -> None:
    """Several speakers: every track decodes, is not empty and has the first one's sample rate (turns: start inside
    the shared recording); every given face box lies inside the image; no two speakers share a face; there are as
    many detected faces as ``"auto"`` speakers (the face detector runs here, on the bucketed image, as the render
    will). One line naming the speaker and the field (``avatar/pipeline/speakers.py``)."""
    from avatar.io.image import bucket_size, resize_to_bucket
    from avatar.pipeline.speakers import load_speaker_audio, resolve_faces

    spec, m = job.speakers, cfg.model
    load_speaker_audio(
        spec, cfg.audio.sample_rate, max_seconds=cfg.audio.max_seconds, allow_damaged=cfg.audio.allow_damaged
    )
    bucket = bucket_size(image.width, image.height, m.image_size, m.bucket_multiple)
    detected: list = []
    if len(spec) > 1 and any(s.face == "auto" for s in spec.speakers):
        detector = _face_detector(cfg)
        if detector is None:
            return  # the official detector file is missing: check_weights names it
        detected = detector.detect(resize_to_bucket(image, bucket))
    resolve_faces(spec, image.size, bucket, detected, image=f"image={job.image}")


def _face_detector(cfg: RunConfig):
    """The render's face detector (None when its file is missing)."""
    from avatar.config import OFFICIAL_FACE_DETECTOR
    from avatar.models.face import FaceDetector

    path = Path(cfg.weights) / OFFICIAL_FACE_DETECTOR
    if cfg.model.face_detector == "official" and not path.is_file():
        return None
    return FaceDetector(cfg.model.face_detector, path)


def check_jobs(cfg: RunConfig, jobs: list, sequence_degree: int = 1, overwrite: bool | None = None) -> None:
    inputs = run_inputs(cfg, jobs)
    for job in jobs:
        check_job(cfg, job, inputs, overwrite=overwrite, sequence_degree=sequence_degree)


def check_xfuser_image(cfg: RunConfig, width: int, height: int, sequence_degree: int) -> None:
    """``attention.backend=xfuser``: the tokens the sequence-parallel ranks shard (the image tokens of one window's
    sequence, reference frame included, for this image's bucket) must divide over ring·ulysses
    (``avatar.parallel.xfuser.xfuser_token_problem``); InputError otherwise."""
    from avatar.io.image import bucket_size
    from avatar.parallel.xfuser import xfuser_token_problem

    m = cfg.model
    bucket_w, bucket_h = bucket_size(width, height, m.image_size, m.bucket_multiple)
    _, ph, pw = m.patch_size
    per_frame = (bucket_h // m.vae_spatial_ratio // ph) * (bucket_w // m.vae_spatial_ratio // pw)
    tokens = ((m.window_frames - 1) // m.vae_temporal_ratio + 2) * per_frame  # window latents + the reference frame
    problem = xfuser_token_problem(tokens, sequence_degree, "image tokens")
    if problem is not None:
        raise InputError(f"{problem} (a {width}×{height} image → the {bucket_w}×{bucket_h} bucket)")


def _validate_batch(cfg: RunConfig, plan: ParallelPlan) -> Validated:
    from avatar.io.manifest import read_manifest
    from avatar.pipeline.batch import shard_rows, validate_rows
    from avatar.pipeline.state import StateStore, batch_state_dir, check_state_folder

    out_dir = Path(cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output_dir={out_dir} exists and is not a folder; choose another output_dir")
    check_state_folder(batch_state_dir(out_dir), f"output_dir={out_dir}")
    manifest = read_manifest(cfg.batch.manifest)
    rows = list(manifest)
    if cfg.batch.shard_count is not None:
        rows = shard_rows(rows, cfg.batch.shard_index, cfg.batch.shard_count)
        log.info("shard %d of %d: %d row(s)", cfg.batch.shard_index, cfg.batch.shard_count, len(rows))
    state = StateStore(batch_state_dir(out_dir))  # read only here: nothing is created before validation passes
    inputs = run_inputs(cfg, [row_job(cfg, row) for row in manifest if row.image and (row.audio or row.speakers)])

    def check_row(row: Row) -> None:
        job = row_job(cfg, row)
        overwrite = cfg.overwrite or batch_row_done(state, cfg, job)
        check_job(cfg, job, inputs, overwrite=overwrite, sequence_degree=plan.sequence_size)

    good, bad = validate_rows(rows, cfg.batch.on_error, check_row)
    return Validated(cfg, plan, [row_job(cfg, row) for row in good], bad, manifest, rows)


def batch_row_done(state, cfg: RunConfig, job) -> bool:
    """The row (or single job) finished in an earlier run (its done mark and its output exist)."""
    from avatar.pipeline.job import config_dict
    from avatar.pipeline.resume import job_state

    if not (state.folder.is_dir() and Path(job.output).is_file()):
        return False
    if not all(os.path.isfile(path) for path in (job.image, job.audio)):
        return False  # a FIFO or device is never hashed (it would block); check_job refuses it
    try:
        key, _ = job_state(config_dict(cfg), job)
    except OSError:
        return False
    return state.is_done(key)


# --- weights ------------------------------------------------------------------------------------------------------


def check_weights(cfg: RunConfig) -> None:
    """Every weights component complete and readable (``avatar.weights.verify``), before any model is built."""
    from avatar.memory.apply import run_placement
    from avatar.weights.verify import verify_weights

    try:
        problems = verify_weights(cfg.weights, cfg.model, fp8=run_placement(cfg).fp8, load_key=cfg.load_key)
    except Exception as err:  # noqa: BLE001 - an unreadable file is a bad input, in one line
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        raise InputError(
            f"weights={cfg.weights}: a weights file cannot be read ({detail}); it is truncated or corrupt, "
            f"re-download it (`python -m launch.weights verify {cfg.weights} model={cfg.model.name}` names it)"
        ) from None
    if len(problems) == 1 and problems[0].startswith(f"weights={cfg.weights} "):
        raise InputError(problems[0])  # the folder itself (missing, empty): that line already says what to do
    if problems:
        shown = "; ".join(problems[:3]) + (f"; … {len(problems) - 3} more" if len(problems) > 3 else "")
        raise InputError(
            f"weights={cfg.weights} does not match model={cfg.model.name} ({len(problems)} problem(s): {shown}); "
            f"run `python -m launch.weights verify {cfg.weights} model={cfg.model.name}` for the full report"
        )
    check_encoder_settings(cfg)


def check_encoder_settings(cfg: RunConfig) -> None:
    """The model fields the encoders' own configs bound (read from their config.json, no model built): the CLIP
    prompt length within its position table, the LLaVA hidden state among its layers, the LLaVA image side the one
    its vision tower was trained at."""
    import json

    from avatar.config import OFFICIAL_CLIP_DIR, OFFICIAL_LLAVA_DIR

    def read(folder: str) -> dict:
        try:
            return json.loads((Path(cfg.weights) / folder / "config.json").read_text())
        except (OSError, ValueError):
            return {}  # verify_weights has named a missing or unreadable file already

    m, where = cfg.model, f"the weights in {cfg.weights}"
    clip = read(OFFICIAL_CLIP_DIR)
    positions = clip.get("max_position_embeddings")
    if isinstance(positions, int) and m.clip_max_length > positions:
        raise InputError(
            f"model.clip_max_length={m.clip_max_length} is invalid with {where}: their CLIP text encoder has "
            f"{positions} positions; give an integer from 1 to {positions}"
        )
    llava = read(OFFICIAL_LLAVA_DIR)
    layers = llava.get("text_config", {}).get("num_hidden_layers")
    if isinstance(layers, int) and not -(layers + 1) <= m.text_hidden_layer <= layers:
        raise InputError(
            f"model.text_hidden_layer={m.text_hidden_layer} is invalid with {where}: their LLaVA model gives "
            f"{layers + 1} hidden states; give an integer from {-(layers + 1)} to {layers}"
        )
    side = llava.get("vision_config", {}).get("image_size")
    if isinstance(side, int) and m.llava_image_size != side:
        raise InputError(
            f"model.llava_image_size={m.llava_image_size} is invalid with {where}: their LLaVA vision tower takes "
            f"{side}×{side} images; give {side}"
        )


# --- single values and the output path ------------------------------------------------------------------------


def check_steps(steps) -> int:
    """``sampling.steps`` in its declared range (an integer ≥ 1; a whole float such as a manifest's ``20.0`` is
    taken as that integer). Returns it as an int."""
    from avatar.config import SamplingConfig

    if isinstance(steps, float) and steps.is_integer():
        steps = int(steps)
    problem = value_problem("sampling.steps", steps, domain_of(SamplingConfig, "steps"), int)
    if problem:
        raise InputError(problem)
    return int(steps)


def check_seed(seed, field: str = "seed") -> int:
    """A seed in the declared range of ``RunConfig.seed``: an integer from 0 to ``SEED_MAX`` (2**63 - 2)."""
    problem = value_problem(field, seed, domain_of(RunConfig, "seed"), int)
    if problem:
        raise InputError(problem)
    return int(seed)


def _existing_ancestor(folder: str) -> str:
    while folder and not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def name_max(folder: str) -> int:
    """Longest file name (bytes) the file system of ``folder`` allows."""
    try:
        return int(os.pathconf(_existing_ancestor(folder), "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def file_identity(path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file ``path`` resolves to (symlinks followed; hard links share it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def check_not_an_input(path, inputs: dict) -> None:
    """Refuse an output path that is one of this run's inputs: ``inputs`` maps ``field=path`` labels to paths; the
    same file by inode (symlinks and hard links included) is refused whatever ``overwrite`` says."""
    target = file_identity(path)
    if target is None:
        return
    for label, input_path in inputs.items():
        if input_path and file_identity(input_path) == target:
            raise InputError(
                f"output={path} is the same file as {label}={input_path} (an input of this run); writing it would "
                "destroy the input, so choose another output path"
            )


def check_output_path(path, overwrite: bool, inputs: dict | None = None, folder_may_be_missing: bool = False) -> str:
    """The output must be a ``.mp4`` file path in an existing, writable folder (``folder_may_be_missing``: a folder
    that this run will create under a writable one); an existing file needs ``overwrite=true``; none of the files
    the run writes beside it may be one of its ``inputs``; the longest temporary name must fit the file system.
    Returns the absolute path. Creates nothing."""
    from avatar.io.atomic import longest_derived_name

    if path is None or os.fspath(path) == "":
        raise InputError("output is empty; give output=PATH.mp4")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise InputError(f"output={path} is a directory; give a file path ending in .mp4")
    if not path.lower().endswith(".mp4"):
        raise InputError(f"output={path} must end in .mp4 (the writer produces H.264/AAC mp4)")
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    longest = longest_derived_name(name)
    limit = name_max(folder)
    if len(os.fsencode(longest)) > limit:
        raise InputError(
            f"output={path}: the name is too long ({len(os.fsencode(name))} bytes); this run also writes "
            f"temporaries and siblings up to {len(os.fsencode(longest)) - len(os.fsencode(name))} bytes longer and "
            f"the file system allows {limit}-byte names; choose a name of at most "
            f"{limit - (len(os.fsencode(longest)) - len(os.fsencode(name)))} bytes"
        )
    probe_folder = folder
    if not os.path.exists(folder):
        if not folder_may_be_missing:
            raise InputError(
                f"output={path}: the folder {folder} does not exist; create it first or choose another path"
            )
        probe_folder = _existing_ancestor(folder)
    if not os.path.isdir(probe_folder):
        raise InputError(f"output={path}: {probe_folder} is not a folder; choose another output path")
    if not os.access(probe_folder, os.W_OK | os.X_OK):
        raise InputError(f"output={path}: the folder {probe_folder} is not writable; choose a writable output folder")
    try:
        # a real probe (ACLs, read-only mounts); O_TMPFILE where available, so nothing ever appears in the folder
        with tempfile.TemporaryFile(dir=probe_folder):
            pass
    except OSError as err:
        raise InputError(
            f"output={path}: cannot write in {probe_folder} ({err.strerror or err}); choose another folder"
        ) from err
    for derived in (path, path + ".json", path + ".intermediates.pt"):
        check_not_an_input(derived, inputs or {})
    if os.path.lexists(path):
        if not os.path.isfile(path):
            raise InputError(f"output={path} exists and is not a regular file; choose another output path")
        if not overwrite:
            raise InputError(f"output={path} already exists; pass overwrite=true to replace it or choose another path")
    return os.path.abspath(path)
