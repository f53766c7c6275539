"""Typed configuration schemas.

Every field has a docstring-style comment. ``avatar/compose.py`` registers these dataclasses in Hydra's ConfigStore;
the YAML files under ``configs/`` fill them. Every numeric field declares its valid values next to its type
(``num(default, ge=..., gt=..., le=..., multiple_of=...)``: a ``Range`` in the field's metadata) and every path field
its kind (``pathfield("file" | "folder" | "output")``); ``avatar.validate.check_domains`` applies them (with the rules
between fields, ``avatar.validate.RULES``) and ``python -m avatar.config_doc`` prints them as docs/config.md. Nothing in ``avatar/`` reads argv or the environment: the resolved
``RunConfig`` is passed in.

Three kinds of settings live in separate dataclasses: what the network *is* (``ModelConfig``), how a video is
*sampled* (``SamplingConfig``, ``AudioConfig``, ``LongConfig``), and how the process *runs* (``ParallelConfig``,
``AttentionConfig``, ``OutputConfig``, ``BatchConfig`` and the top-level ``RunConfig``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from omegaconf import MISSING

#: The one frame rate: the official model is trained and conditioned at 25 fps (fps_proj input), the audio features
#: are cut into 25 windows per second and the mp4 plays at 25 fps. Not a setting: another rate would play the frames
#: too fast or too slow against the sound.
FPS = 25

#: Official constant motion buckets fed to the DiT's ``motion_exp`` / ``motion_pose`` embedders.
OFFICIAL_MOTION_EXP = 30.0
OFFICIAL_MOTION_POSE = 25.0

#: Seeds are 0 .. SEED_MAX (the reference-latent draw uses seed + 1, which must fit torch's 64-bit generator).
SEED_MAX = 2**63 - 2


# --- domains: what each field accepts, declared next to its type ---------------------------------------------------


class PathKind(StrEnum):
    """What a path field names (``pathfield(kind)``)."""

    file = "file"
    """An existing regular file the run reads."""
    folder = "folder"
    """An existing folder the run reads."""
    output = "output"
    """A path the run writes (a file, or a folder it creates)."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric field (``num(default, ge=..., ...)``); for a list field, of each item.

    ``ge``/``gt`` and ``le`` bound the value (None: unbounded), ``multiple_of`` asks for multiples, ``note`` is
    appended in parentheses, ``text`` replaces the generated wording. Floats must be finite; an int field takes an
    integer (never a bool). ``avatar.validate.check_domains`` applies every declaration; ``avatar.config_doc`` prints
    them in docs/config.md."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    multiple_of: int | None = None
    note: str = ""
    text: str = ""
    auto: bool = False
    """The text field also takes ``auto`` (the parallel degrees: ``auto`` or an integer as text)."""

    def holds(self, value, integer: bool) -> bool:
        """``value`` is of the field's kind (an integer for an int field, a finite number otherwise) and in range."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if integer and not isinstance(value, numbers.Integral):
            return False
        if not integer and not math.isfinite(value):
            return False
        if self.ge is not None and value < self.ge:
            return False
        if self.gt is not None and value <= self.gt:
            return False
        if self.le is not None and value > self.le:
            return False
        return self.multiple_of is None or value % self.multiple_of == 0

    def describe(self, integer: bool) -> str:
        """The range in words: ``an integer ≥ 1 (the official value is 50)``, ``a number > 0``."""
        if self.text:
            return self.text
        noun = "an integer" if integer or self.auto else "a number"
        if self.multiple_of is not None:
            noun = f"a multiple of {self.multiple_of}"
        if self.multiple_of is not None and self.ge == self.multiple_of and self.le is None:
            words = f"a positive multiple of {self.multiple_of}"
        elif self.ge is not None and self.le is not None:
            words = f"{_num(self.ge)}" if self.ge == self.le else f"{noun} from {_num(self.ge)} to {_num(self.le)}"
        elif self.gt is not None and self.le is not None:
            words = f"{noun} > {_num(self.gt)} and ≤ {_num(self.le)}"
        elif self.ge is not None:
            words = f"{noun} ≥ {_num(self.ge)}"
        elif self.gt is not None:
            words = f"{noun} > {_num(self.gt)}"
        elif self.le is not None:
            words = f"{noun} ≤ {_num(self.le)}"
        else:
            words = noun
        if self.auto:
            words = f"auto or {words}"
        return f"{words} ({self.note})" if self.note else words


def _num(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def num(default=MISSING, *, factory=None, **bounds):
    """A numeric field with its ``Range`` (``ge``, ``gt``, ``le``, ``multiple_of``, ``note``, ``text``)."""
    meta = {"range": Range(**bounds)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def pathfield(kind: str, default=None):
    """A path field of ``kind`` (``file``, ``folder`` or ``output``; see ``PathKind``)."""
    return field(default=default, metadata={"path": PathKind(kind)})


def domain_of(cls, name: str) -> Range | PathKind | None:
    """The declared ``Range`` or ``PathKind`` of field ``name`` of dataclass ``cls`` (None: an enum, bool or text)."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("range") or f.metadata.get("path")
    raise KeyError(name)


class Strategy(StrEnum):
    """Long-audio strategy (``long.strategy``, per-row ``strategy``)."""

    auto = "auto"
    shift = "shift"
    blend = "blend"
    segments = "segments"


class Fidelity(StrEnum):
    official = "official"
    fp32 = "fp32"


class CacheMode(StrEnum):
    """``sampling.cache``: ``official`` (the official deep cache on its fixed steps), ``adaptive`` (the runtime-adaptive
    step cache of ``avatar/pipeline/adaptive.py``, instead of the deep cache) or ``off`` (every step a full forward)."""

    official = "official"
    adaptive = "adaptive"
    off = "off"


class Backend(StrEnum):
    native = "native"
    xfuser = "xfuser"


class Kernel(StrEnum):
    sdpa = "sdpa"
    flash = "flash"
    sage = "sage"


class MemoryMode(StrEnum):
    """``memory.mode``: how the DiT and the encoders are placed on the GPUs (``auto``: the cheapest that fits, in
    this order)."""

    auto = "auto"
    none = "none"
    fsdp = "fsdp"
    fp8 = "fp8"
    fsdp_fp8 = "fsdp_fp8"
    offload = "offload"
    low = "low"


class Shard(StrEnum):
    """``memory.shard``: ``fsdp`` shards the DiT blocks (FSDP2) over the ranks of one video."""

    none = "none"
    fsdp = "fsdp"


class Offload(StrEnum):
    """``memory.offload``: ``blocks`` streams DiT blocks from host memory; ``model`` moves whole modules in and out."""

    none = "none"
    blocks = "blocks"
    model = "model"


class OnError(StrEnum):
    stop = "stop"
    skip = "skip"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ServeRole(StrEnum):
    both = "both"
    api = "api"
    worker = "worker"


class DType(StrEnum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class LoadKey(StrEnum):
    module = "module"
    ema = "ema"


class FaceDetectorKind(StrEnum):
    official = "official"
    opencv = "opencv"


class X264Preset(StrEnum):
    ultrafast = "ultrafast"
    superfast = "superfast"
    veryfast = "veryfast"
    faster = "faster"
    fast = "fast"
    medium = "medium"
    slow = "slow"
    slower = "slower"
    veryslow = "veryslow"
    placebo = "placebo"


#: Output-folder names of the official release, relative to the weights folder (``weights/ckpts/...``).
OFFICIAL_DIT_FILE = "ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt"
OFFICIAL_DIT_FP8_FILE = "ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states_fp8.pt"
OFFICIAL_DIT_FP8_MAP_FILE = "ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states_fp8_map.pt"
OFFICIAL_VAE_DIR = "ckpts/hunyuan-video-t2v-720p/vae"
OFFICIAL_WHISPER_DIR = "ckpts/whisper-tiny"
OFFICIAL_LLAVA_DIR = "ckpts/llava_llama_image"
OFFICIAL_CLIP_DIR = "ckpts/text_encoder_2"
OFFICIAL_FACE_DETECTOR = "ckpts/det_align/detface.pt"


@dataclass
class ModelConfig:
    """What the network is. Every width and depth of the DiT and its conditioning lives here (§3 of the dossier)."""

    name: str = MISSING
    """Model name: ``hunyuan_avatar`` (the official 13B checkpoint) or ``tiny`` (same classes, CPU-sized)."""

    # --- DiT widths and depths ---
    hidden_size: int = num(
        3072, ge=4, multiple_of=4, note="model.hidden_size / model.num_heads = sum(model.rope_axes)"
    )
    """Token width of the DiT."""
    num_heads: int = num(24, ge=1)
    """Attention heads; head_dim = hidden_size // num_heads."""
    depth_double: int = num(20, ge=0)
    """Number of double-stream (MM-DiT) blocks."""
    depth_single: int = num(40, ge=1)
    """Number of single-stream blocks."""
    mlp_ratio: float = num(4.0, gt=0)
    """MLP hidden width = hidden_size * mlp_ratio."""
    refiner_depth: int = num(2, ge=1)
    """Blocks of the text token refiner (txt_in)."""
    latent_channels: int = num(16, ge=1)
    """VAE latent channels (DiT in/out channels)."""
    patch_size: list[int] = num(factory=lambda: [1, 2, 2], ge=1, text="[1, p, p] with p ≥ 1")
    """(t, h, w) patch of img_in / ref_in."""
    rope_axes: list[int] = num(
        factory=lambda: [16, 56, 56], ge=2, multiple_of=2, text="three even integers ≥ 2 summing to the head width"
    )
    """RoPE dims per (t, h, w) axis; they sum to head_dim."""
    rope_theta: float = num(256.0, gt=0)
    """RoPE base."""
    time_embed_dim: int = num(256, ge=2, multiple_of=2)
    """Sinusoidal timestep embedding size fed to the TimestepEmbedders."""

    # --- text conditioning ---
    text_states_dim: int = num(4096, ge=1)
    """Width of the LLaVA-Llama hidden states (txt_in input)."""
    text_states_dim_2: int = num(768, ge=1)
    """Width of the CLIP pooled output (vector_in input)."""
    text_len: int = num(256, ge=1)
    """Prompt tokens kept after the template crop."""
    text_crop_start: int = num(95, ge=0)
    """Template tokens cropped from the front of the LLaVA hidden states."""
    text_image_tokens: int = num(576, ge=1)
    """Image features the LLaVA vision tower gives per image (replace the single <image> token)."""
    text_hidden_layer: int = num(
        -3, text="an integer among the LLaVA model's hidden states in the weights (negative: from the last)"
    )
    """Which LLaVA hidden state is used (−3: skip the last two layers)."""
    clip_max_length: int = num(77, ge=1, note="at most the positions of the CLIP text encoder in the weights")
    """CLIP tokenizer max length."""

    # --- audio conditioning ---
    audio_window: int = num(10, ge=1)
    """Whisper frames per video frame fed to audio_proj (a 200 ms window at 25 fps)."""
    audio_layers: int = num(5, ge=1)
    """Whisper hidden states stacked per frame (embedding output + encoder layers)."""
    audio_channels: int = num(384, ge=1)
    """Whisper hidden width (whisper-tiny: 384)."""
    audio_proj_dim: int = num(1024, ge=1)
    """Intermediate width of audio_proj (AudioProjNet2)."""
    audio_tokens: int = num(4, ge=1)
    """Audio tokens produced per video frame by audio_proj."""
    adapter_dim: int = num(1024, ge=1)
    """Inner width of the single-head audio adapters (PerceiverAttentionCA dim_head)."""
    adapter_after_double: list[int] = num(
        factory=lambda: [1, 3, 5, 7, 9, 11, 13, 15, 17, 19], ge=0, text="indices from 0 to model.depth_double - 1"
    )
    """0-based double-block indices after which an audio adapter runs."""
    # --- VAE and geometry ---
    vae_temporal_ratio: int = num(4, ge=1)
    """Video frames per latent frame (after the first)."""
    vae_spatial_ratio: int = num(8, ge=1)
    """Pixels per latent pixel per side."""
    vae_scaling_factor: float = num(0.476986, gt=0)
    """Latent scaling factor."""
    image_size: int = num(704, ge=1, note="a multiple of model.bucket_multiple")
    """Short side of the rendered video before bucketing (multiples of 64)."""
    bucket_multiple: int = num(64, ge=1, note="a multiple of model.vae_spatial_ratio × the patch side")
    """Rendered sides are rounded to multiples of this."""
    llava_image_size: int = num(336, ge=1, note="the side the LLaVA vision tower in the weights takes")
    """Side of the square image fed to the LLaVA vision tower."""
    window_frames: int = num(129, ge=1, note="model.vae_temporal_ratio·k + 1 with k ≥ 1")
    """Video frames per denoising window (129 = 33 latent frames)."""
    shift_offset: int = num(10, ge=0)
    """Latent frames the `shift` strategy moves its window grid by per step."""
    vae_tile_frames: int = num(64, ge=1, note="a multiple of model.vae_temporal_ratio")
    """VAE decode temporal tile, in video frames (official 64)."""
    vae_tile_stride_frames: int = num(
        48, ge=1, note="a multiple of model.vae_temporal_ratio, at most model.vae_tile_frames"
    )
    """VAE decode temporal tile stride, in video frames (official 48)."""
    vae_tile_size: int = num(256, ge=1, note="a multiple of model.vae_spatial_ratio")
    """VAE spatial tile, in pixels (official 256)."""
    vae_tile_stride: int = num(192, ge=1, note="a multiple of model.vae_spatial_ratio, at most model.vae_tile_size")
    """VAE spatial tile stride, in pixels (official 192)."""
    face_detector: FaceDetectorKind = FaceDetectorKind.official
    """Face detector: ``official`` (TorchScript det_align/detface.pt) or ``opencv`` (OpenCV's bundled Haar cascade)."""


@dataclass
class SamplingConfig:
    """How a window is denoised (§4 of the dossier)."""

    steps: int = num(50, ge=1, note="the official value is 50")
    """Denoising steps."""
    shift: float = num(5.0, gt=0)
    """Flow-matching timestep shift."""
    cfg_scale: float = num(7.5, ge=0)
    """Joint text+audio guidance at step 0 of the first phase."""
    joint_cfg_steps: int = num(10, ge=0)
    """Steps of the first (text+audio) guidance phase."""
    joint_cfg_floor: float = num(2.0, ge=0)
    """Guidance the first-phase linear ramp heads to."""
    audio_cfg_max: float = num(6.5, ge=0)
    """Second-phase (audio-only) guidance ramp top."""
    audio_cfg_min: float = num(3.5, ge=0)
    """Second-phase (audio-only) guidance ramp floor."""
    joint_face_mask_scale: float = num(0.6, ge=0)
    """Face-mask multiplier during the first phase (both branches)."""
    negative_prompt: str = (
        "Aerial view, aerial view, overexposed, low quality, deformation, a poor composition, bad hands, bad teeth, "
        "bad eyes, bad limbs, distortion, blurring, Lens changes"
    )
    """Negative prompt of the first phase."""
    prompt_prefix: str = "Authentic, Realistic, Natural, High-quality, Lens-Fixed, "
    """Prefix added to every prompt."""
    cache: CacheMode = CacheMode.official
    """``official``: reuse the input of the last single block on the official cached steps (20 of 50, the official
    default); ``adaptive``: instead of that, skip a step's forward where the input changed little since the last full
    step and reuse that step's output − input (EasyCache style, ``cache_threshold``/``cache_max_skip``); ``off``:
    every step a full forward."""
    cache_threshold: float = num(0.1, ge=0, note="0: never reuse")
    """``cache=adaptive``: reuse while the estimated relative change of the output since the last full step (its
    transformation rate × the relative change of the input) stays below this; 0: never reuse (equals ``off``)."""
    cache_max_skip: int = num(3, ge=1)
    """``cache=adaptive``: at most this many reused steps in a row before a forced full step (≥ 1)."""
    fidelity: Fidelity = Fidelity.official
    """``official``: the official dtype roundings between steps; ``fp32``: exact float32 throughout."""
    reference_sample: bool = False
    """Draw the reference latent from the VAE posterior (official) instead of using its mean."""
    motion_exp: float = num(OFFICIAL_MOTION_EXP, ge=0)
    """Expression-motion bucket fed to the DiT's ``motion_exp`` embedder on every step (official constant: 30).
    Lower values tone facial motion down, higher values exaggerate it."""
    motion_pose: float = num(OFFICIAL_MOTION_POSE, ge=0)
    """Head-pose-motion bucket fed to the DiT's ``motion_pose`` embedder on every step (official constant: 25).
    Lower values keep the head stiller."""


@dataclass
class AudioConfig:
    """Audio input, decoding and features (``audio=PATH`` on the command line sets ``audio.path``)."""

    path: Optional[str] = pathfield("file", None)
    """Speech audio path (wav, flac, mp3, m4a; any rate, mono or stereo)."""
    sample_rate: int = num(
        16000, ge=16000, le=16000, note="Whisper's input rate; audio of any rate is resampled to it"
    )
    """Rate audio is resampled to for Whisper."""
    max_seconds: Optional[float] = num(None, gt=0)
    """Reject audio longer than this (None: no maximum)."""
    allow_damaged: bool = False
    """Render audio whose decoded length disagrees with its container's by more than one video frame (a corrupt
    stretch), with a warning in the log and ``audio_damaged`` in the report, instead of refusing it."""
    chunk_seconds: float = num(30.0, ge=30, le=30, note="Whisper's window")
    """Whisper encoder input length per piece."""
    context_seconds: float = num(2.0, ge=0, note="less than half of audio.chunk_seconds")
    """Overlapping context on each side of a Whisper piece, so features are continuous across pieces."""


@dataclass
class LongConfig:
    """Long-audio windowing and stitching."""

    strategy: Strategy = Strategy.auto
    """``shift`` (official circular shifted windows), ``blend`` (lockstep overlapping windows averaged each step),
    ``segments`` (independent overlapping segments cross-faded, streamed to disk) or ``auto``."""
    overlap_frames: int = num(0, ge=0, note="0: a quarter window; less than the window's latent frames")
    """Overlap between neighbouring windows in latent frames for blend/segments (0: a model default of a quarter
    window)."""
    auto_segments_seconds: float = num(20.0, gt=0)
    """With ``auto``: audio longer than this uses ``segments``, shorter uses ``shift``."""


@dataclass
class ParallelConfig:
    """Degrees of the parallel plan. Each is an integer or ``auto`` (see avatar/plan.py for the rule)."""

    data: str = num("auto", ge=1, auto=True)
    """Data-parallel groups (windows, segments or batch rows)."""
    cfg: str = num("auto", ge=1, le=2, auto=True)
    """CFG-parallel degree (1 or 2)."""
    ulysses: str = num("auto", ge=1, auto=True)
    """Ulysses (all-to-all over heads) sequence-parallel degree."""
    ring: str = num("auto", ge=1, auto=True)
    """Ring-attention sequence-parallel degree."""


@dataclass
class AttentionConfig:
    """Attention facade settings."""

    backend: Backend = Backend.native
    """``native`` (our Ulysses/Ring on torch.distributed) or ``xfuser`` (optional, GPU, extra [xdit])."""
    kernel: Kernel = Kernel.sdpa
    """Local kernel: ``sdpa`` (torch), ``flash`` (flash-attn, when installed) or ``sage`` (8-bit SageAttention for
    the mask-free calls, CUDA and ``pip install avatar-launcher[sage]``; everything else stays on SDPA)."""


@dataclass
class MemoryConfig:
    """Memory placement (``memory=auto|none|fsdp|fp8|fsdp_fp8|offload|low`` picks a preset of ``configs/memory``)."""

    mode: MemoryMode = MemoryMode.auto
    """What ``auto`` resolves to, or the mode asked for; ``shard``/``offload`` below override its parts."""
    shard: Optional[Shard] = None
    """``fsdp`` or ``none``; unset: from ``mode``."""
    offload: Optional[Offload] = None
    """``blocks``, ``model`` or ``none``; unset: from ``mode``."""
    gpu_memory_gb: Optional[float] = num(None, gt=0)
    """Plan for this much free memory per GPU (GB, 10^9 bytes) instead of asking the device."""
    token_chunk: int = num(8192, ge=0, note="0: no chunking")
    """Tokens per chunk of the single blocks' linear1/MLP/linear2 (exact; 0: no chunking)."""


@dataclass
class OutputConfig:
    """Where and how the video is written."""

    path: str = pathfield("output", "outputs/out.mp4")
    """Output mp4 path (``output=PATH.mp4`` on the command line sets this)."""
    crf: int = num(18, ge=0, le=51, text="an integer from 0 (lossless) to 51")
    """libx264 constant rate factor (0 lossless .. 51)."""
    preset: X264Preset = X264Preset.medium
    """libx264 preset."""


@dataclass
class BatchConfig:
    """Batch manifests (``batch=PATH`` sets ``batch.manifest``)."""

    manifest: Optional[str] = pathfield("file", None)
    """CSV (official columns videoid,image,audio,prompt,fps) or JSON Lines manifest."""
    on_error: OnError = OnError.stop
    """``stop`` at the first bad row, or ``skip`` it and list it in the summary."""
    shard_index: Optional[int] = num(None, ge=0, note="less than batch.shard_count")
    """This job's shard of the manifest, 0-based (``launch/slurm/array.sbatch`` sets it from SLURM_ARRAY_TASK_ID)."""
    shard_count: Optional[int] = num(None, ge=1)
    """Number of shards (``array.sbatch``: SLURM_ARRAY_TASK_COUNT)."""
    wait_for_lock: bool = False
    """Another run holds this output's lock (``output_dir/.state/lock``, or ``<output>.state/lock`` for one video):
    ``false`` refuses in one line naming its pid and host (exit 3); ``true`` waits until it ends, then skips what
    it finished."""


@dataclass
class ServeConfig:
    """The server (``python -m launch.serve``): where it listens, who may call it, what it accepts, where jobs live."""

    host: str = "127.0.0.1"
    """Address to bind. Loopback by default; any other address needs ``serve.api_key``."""
    port: int = num(8000, ge=0, le=65535, note="0: any free port")
    """TCP port (0: any free port; the one chosen is written to ``<data_dir>/server.json``)."""
    api_key: Optional[str] = None
    """When set, every ``/v1`` request needs ``Authorization: Bearer <api_key>`` (else 401). Any UTF-8 text without
    control characters or surrounding spaces; to keep it out of ``ps`` (and past the command-line grammar's ``=``,
    ``,``, ``#``) use ``api_key_file`` or the environment variable ``AVATAR_API_KEY`` instead."""
    api_key_file: Optional[str] = None
    """Read ``api_key`` from this UTF-8 file (one trailing newline dropped). ``AVATAR_API_KEY`` is read when neither
    ``api_key`` nor ``api_key_file`` is given."""
    role: ServeRole = ServeRole.both
    """``both``: the HTTP API and a worker group in one launch; ``api``: the HTTP API only (one process, no model);
    ``worker``: a worker group only (``python -m launch.worker``). Any number of each can share one ``store``."""
    store: Optional[str] = None
    """The job database: ``sqlite:///PATH`` (one machine) or ``postgresql://USER@HOST:PORT/DB`` (shared by API
    front ends and workers on many machines). Default: ``sqlite:///<data_dir>/jobs.sqlite3``."""
    data_dir: str = pathfield("output", "outputs/serve")
    """Uploads, finished videos and the resume state of unfinished jobs; storage every API front end and worker of
    one store sees (a shared file system across machines)."""
    lease_seconds: float = num(60.0, gt=0)
    """How long a worker's claim on a job lasts without a heartbeat (it heartbeats every quarter of it while it
    renders); a job whose worker died is taken over by another worker this long after the last heartbeat, and
    resumes from its last checkpoint."""
    max_queue: int = num(16, ge=1)
    """Jobs queued or running at most; a new job beyond it gets 429."""
    max_image_mb: float = num(20.0, gt=0)
    """Largest accepted image upload, in MiB (413 beyond)."""
    max_audio_mb: float = num(50.0, gt=0)
    """Largest accepted audio upload, in MiB (413 beyond)."""
    max_audio_seconds: float = num(300.0, gt=0)
    """Longest accepted audio, in seconds (also bounded by ``audio.max_seconds`` when that is set)."""
    max_image_side: int = num(4096, ge=64, note="the smallest accepted image side")
    """Largest accepted image width or height, in pixels."""
    max_steps: int = num(100, ge=1)
    """Most denoising steps one request may ask for (400 beyond); the official value is 50."""


@dataclass
class RunConfig:
    """The whole run. Top-level fields are the command-line contract."""

    model: ModelConfig = MISSING
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    long: LongConfig = field(default_factory=LongConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    image: Optional[str] = pathfield("file", None)
    """Portrait image path."""
    speakers: Optional[str] = pathfield("file", None)
    """Several people talking: a JSON file listing the speakers, each with its own track and face
    (``[{"audio": PATH, "face": "auto" | [x0, y0, x1, y1], "name": ...}, ...]``), or one shared recording with
    per-speaker turns (``{"audio": PATH, "speakers": [{"face": ..., "turns": [[start_s, end_s], ...]}]}``); see
    ``avatar/pipeline/speakers.py``. Without it ``audio=`` drives the one face of the portrait."""
    prompt: str = "A person is speaking to the camera."
    """Scene description, taken literally (commas, quotes, ``${...}``, newlines are kept as typed)."""
    prompt_file: Optional[str] = pathfield("file", None)
    """Read the prompt from this UTF-8 text file instead (trailing newlines dropped)."""
    weights: str = pathfield("folder", "weights/hunyuan_avatar")
    """Weights folder in the official layout (holds ckpts/...; ``avatar-weights download DIR`` fills one)."""
    seed: int = num(128, ge=0, le=SEED_MAX, note="2**63 - 2")
    """Seed of every random draw (noise, reference-latent sample): an integer from 0 to 2**63 - 2."""
    overwrite: bool = False
    """Replace an existing output (atomically; never a file that is one of this run's inputs). Without it an output
    that exists, or appears while rendering, is kept and this run's video goes to ``<output>.conflict-<id>.mp4``."""
    save_intermediates: bool = False
    """Save the denoise inputs (noise, text states, audio features, reference latents, face mask) beside the
    output."""
    output_dir: Optional[str] = pathfield("output", None)
    """Batch mode: folder of <videoid>.mp4 outputs and the resume state."""
    device: Device = Device.auto
    """``auto`` (cuda when available), ``cpu`` or ``cuda``."""
    dtype: DType = DType.auto
    """DiT weight dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16``, ``fp16``, ``fp32``."""
    fp8: bool = False
    """Load the fp8 checkpoint (mp_rank_00_model_states_fp8.pt + _map.pt); weights stay fp8 in memory."""
    fp8_compute: bool = False
    """With ``fp8``: run the fp8 linears as scaled fp8 matmuls on GPUs with fp8 tensor cores (default: dequantise
    each weight to the compute dtype per call, as the official code does)."""
    compile: bool = False
    """Regional ``torch.compile`` of the transformer blocks (one compiled block reused by all)."""
    load_key: LoadKey = LoadKey.module
    """State-dict key inside the official .pt (``module`` or ``ema``)."""
    checkpoint_every: int = num(5, ge=0, note="0: never")
    """Save the latents of the job in progress every N steps (0: never)."""


def plain(cfg) -> dict:
    """A config dataclass as plain JSON-able data: enums as their strings, nothing interpolated."""
    import dataclasses
    from enum import Enum

    def convert(value):
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(dataclasses.asdict(cfg))
