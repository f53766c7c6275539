"""Typed configuration schemas.

Every field has a docstring-style comment. ``launch/config.py`` registers these dataclasses in Hydra's ConfigStore;
the YAML files under ``configs/`` fill them. Nothing in ``avatar/`` reads argv or the environment: the resolved
``RunConfig`` is passed in.

Three kinds of settings live in separate dataclasses: what the network *is* (``ModelConfig``), how a video is
*sampled* (``SamplingConfig``, ``AudioConfig``, ``LongConfig``), and how the process *runs* (``ParallelConfig``,
``AttentionConfig``, ``OutputConfig``, ``BatchConfig`` and the top-level ``RunConfig``).
"""

from __future__ import annotations

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
    hidden_size: int = 3072
    """Token width of the DiT."""
    num_heads: int = 24
    """Attention heads; head_dim = hidden_size // num_heads."""
    depth_double: int = 20
    """Number of double-stream (MM-DiT) blocks."""
    depth_single: int = 40
    """Number of single-stream blocks."""
    mlp_ratio: float = 4.0
    """MLP hidden width = hidden_size * mlp_ratio."""
    refiner_depth: int = 2
    """Blocks of the text token refiner (txt_in)."""
    latent_channels: int = 16
    """VAE latent channels (DiT in/out channels)."""
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    """(t, h, w) patch of img_in / ref_in."""
    rope_axes: list[int] = field(default_factory=lambda: [16, 56, 56])
    """RoPE dims per (t, h, w) axis; they sum to head_dim."""
    rope_theta: float = 256.0
    """RoPE base."""
    time_embed_dim: int = 256
    """Sinusoidal timestep embedding size fed to the TimestepEmbedders."""

    # --- text conditioning ---
    text_states_dim: int = 4096
    """Width of the LLaVA-Llama hidden states (txt_in input)."""
    text_states_dim_2: int = 768
    """Width of the CLIP pooled output (vector_in input)."""
    text_len: int = 256
    """Prompt tokens kept after the template crop."""
    text_crop_start: int = 95
    """Template tokens cropped from the front of the LLaVA hidden states."""
    text_image_tokens: int = 576
    """Image features the LLaVA vision tower gives per image (replace the single <image> token)."""
    text_hidden_layer: int = -3
    """Which LLaVA hidden state is used (−3: skip the last two layers)."""
    clip_max_length: int = 77
    """CLIP tokenizer max length."""

    # --- audio conditioning ---
    audio_window: int = 10
    """Whisper frames per video frame fed to audio_proj (a 200 ms window at 25 fps)."""
    audio_layers: int = 5
    """Whisper hidden states stacked per frame (embedding output + encoder layers)."""
    audio_channels: int = 384
    """Whisper hidden width (whisper-tiny: 384)."""
    audio_proj_dim: int = 1024
    """Intermediate width of audio_proj (AudioProjNet2)."""
    audio_tokens: int = 4
    """Audio tokens produced per video frame by audio_proj."""
    adapter_dim: int = 1024
    """Inner width of the single-head audio adapters (PerceiverAttentionCA dim_head)."""
    adapter_after_double: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 9, 11, 13, 15, 17, 19])
    """0-based double-block indices after which an audio adapter runs."""
    # --- VAE and geometry ---
    vae_temporal_ratio: int = 4
    """Video frames per latent frame (after the first)."""
    vae_spatial_ratio: int = 8
    """Pixels per latent pixel per side."""
    vae_scaling_factor: float = 0.476986
    """Latent scaling factor."""
    image_size: int = 704
    """Short side of the rendered video before bucketing (multiples of 64)."""
    bucket_multiple: int = 64
    """Rendered sides are rounded to multiples of this."""
    llava_image_size: int = 336
    """Side of the square image fed to the LLaVA vision tower."""
    window_frames: int = 129
    """Video frames per denoising window (129 = 33 latent frames)."""
    shift_offset: int = 10
    """Latent frames the `shift` strategy moves its window grid by per step."""
    vae_tile_frames: int = 64
    """VAE decode temporal tile, in video frames (official 64)."""
    vae_tile_stride_frames: int = 48
    """VAE decode temporal tile stride, in video frames (official 48)."""
    vae_tile_size: int = 256
    """VAE spatial tile, in pixels (official 256)."""
    vae_tile_stride: int = 192
    """VAE spatial tile stride, in pixels (official 192)."""
    face_detector: FaceDetectorKind = FaceDetectorKind.official
    """Face detector: ``official`` (TorchScript det_align/detface.pt) or ``opencv`` (OpenCV's bundled Haar cascade)."""


@dataclass
class SamplingConfig:
    """How a window is denoised (§4 of the dossier)."""

    steps: int = 50
    """Denoising steps."""
    shift: float = 5.0
    """Flow-matching timestep shift."""
    cfg_scale: float = 7.5
    """Joint text+audio guidance at step 0 of the first phase."""
    joint_cfg_steps: int = 10
    """Steps of the first (text+audio) guidance phase."""
    joint_cfg_floor: float = 2.0
    """Guidance the first-phase linear ramp heads to."""
    audio_cfg_max: float = 6.5
    """Second-phase (audio-only) guidance ramp top."""
    audio_cfg_min: float = 3.5
    """Second-phase (audio-only) guidance ramp floor."""
    joint_face_mask_scale: float = 0.6
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
    cache_threshold: float = 0.1
    """``cache=adaptive``: reuse while the estimated relative change of the output since the last full step (its
    transformation rate × the relative change of the input) stays below this; 0: never reuse (equals ``off``)."""
    cache_max_skip: int = 3
    """``cache=adaptive``: at most this many reused steps in a row before a forced full step (≥ 1)."""
    fidelity: Fidelity = Fidelity.official
    """``official``: the official dtype roundings between steps; ``fp32``: exact float32 throughout."""
    reference_sample: bool = False
    """Draw the reference latent from the VAE posterior (official) instead of using its mean."""
    motion_exp: float = OFFICIAL_MOTION_EXP
    """Expression-motion bucket fed to the DiT's ``motion_exp`` embedder on every step (official constant: 30).
    Lower values tone facial motion down, higher values exaggerate it."""
    motion_pose: float = OFFICIAL_MOTION_POSE
    """Head-pose-motion bucket fed to the DiT's ``motion_pose`` embedder on every step (official constant: 25).
    Lower values keep the head stiller."""


@dataclass
class AudioConfig:
    """Audio input, decoding and features (``audio=PATH`` on the command line sets ``audio.path``)."""

    path: Optional[str] = None
    """Speech audio path (wav, flac, mp3, m4a; any rate, mono or stereo)."""
    sample_rate: int = 16000
    """Rate audio is resampled to for Whisper."""
    max_seconds: Optional[float] = None
    """Reject audio longer than this (None: no maximum)."""
    allow_damaged: bool = False
    """Render audio whose decoded length disagrees with its container's by more than one video frame (a corrupt
    stretch), with a warning in the log and ``audio_damaged`` in the report, instead of refusing it."""
    chunk_seconds: float = 30.0
    """Whisper encoder input length per piece."""
    context_seconds: float = 2.0
    """Overlapping context on each side of a Whisper piece, so features are continuous across pieces."""


@dataclass
class LongConfig:
    """Long-audio windowing and stitching."""

    strategy: Strategy = Strategy.auto
    """``shift`` (official circular shifted windows), ``blend`` (lockstep overlapping windows averaged each step),
    ``segments`` (independent overlapping segments cross-faded, streamed to disk) or ``auto``."""
    overlap_frames: int = 0
    """Overlap between neighbouring windows in latent frames for blend/segments (0: a model default of a quarter
    window)."""
    auto_segments_seconds: float = 20.0
    """With ``auto``: audio longer than this uses ``segments``, shorter uses ``shift``."""


@dataclass
class ParallelConfig:
    """Degrees of the parallel plan. Each is an integer or ``auto`` (see launch/plan.py for the rule)."""

    data: str = "auto"
    """Data-parallel groups (windows, segments or batch rows)."""
    cfg: str = "auto"
    """CFG-parallel degree (1 or 2)."""
    ulysses: str = "auto"
    """Ulysses (all-to-all over heads) sequence-parallel degree."""
    ring: str = "auto"
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
    gpu_memory_gb: Optional[float] = None
    """Plan for this much free memory per GPU (GB, 10^9 bytes) instead of asking the device."""
    token_chunk: int = 8192
    """Tokens per chunk of the single blocks' linear1/MLP/linear2 (exact; 0: no chunking)."""


@dataclass
class OutputConfig:
    """Where and how the video is written."""

    path: str = "outputs/out.mp4"
    """Output mp4 path (``output=PATH.mp4`` on the command line sets this)."""
    crf: int = 18
    """libx264 constant rate factor (0 lossless .. 51)."""
    preset: X264Preset = X264Preset.medium
    """libx264 preset."""


@dataclass
class BatchConfig:
    """Batch manifests (``batch=PATH`` sets ``batch.manifest``)."""

    manifest: Optional[str] = None
    """CSV (official columns videoid,image,audio,prompt,fps) or JSON Lines manifest."""
    on_error: OnError = OnError.stop
    """``stop`` at the first bad row, or ``skip`` it and list it in the summary."""
    shard_index: Optional[int] = None
    """This job's shard of the manifest, 0-based (``launch/slurm/array.sbatch`` sets it from SLURM_ARRAY_TASK_ID)."""
    shard_count: Optional[int] = None
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
    port: int = 8000
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
    data_dir: str = "outputs/serve"
    """Uploads, finished videos and the resume state of unfinished jobs; storage every API front end and worker of
    one store sees (a shared file system across machines)."""
    lease_seconds: float = 60.0
    """How long a worker's claim on a job lasts without a heartbeat (it heartbeats every quarter of it while it
    renders); a job whose worker died is taken over by another worker this long after the last heartbeat, and
    resumes from its last checkpoint."""
    max_queue: int = 16
    """Jobs queued or running at most; a new job beyond it gets 429."""
    max_image_mb: float = 20.0
    """Largest accepted image upload, in MiB (413 beyond)."""
    max_audio_mb: float = 50.0
    """Largest accepted audio upload, in MiB (413 beyond)."""
    max_audio_seconds: float = 300.0
    """Longest accepted audio, in seconds (also bounded by ``audio.max_seconds`` when that is set)."""
    max_image_side: int = 4096
    """Largest accepted image width or height, in pixels."""
    max_steps: int = 100
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

    image: Optional[str] = None
    """Portrait image path."""
    speakers: Optional[str] = None
    """Several people talking: a JSON file listing the speakers, each with its own track and face
    (``[{"audio": PATH, "face": "auto" | [x0, y0, x1, y1], "name": ...}, ...]``), or one shared recording with
    per-speaker turns (``{"audio": PATH, "speakers": [{"face": ..., "turns": [[start_s, end_s], ...]}]}``); see
    ``avatar/pipeline/speakers.py``. Without it ``audio=`` drives the one face of the portrait."""
    prompt: str = "A person is speaking to the camera."
    """Scene description, taken literally (commas, quotes, ``${...}``, newlines are kept as typed)."""
    prompt_file: Optional[str] = None
    """Read the prompt from this UTF-8 text file instead (trailing newlines dropped)."""
    weights: str = "weights/hunyuan_avatar"
    """Weights folder in the official layout (holds ckpts/...; ``avatar-weights download DIR`` fills one)."""
    seed: int = 128
    """Seed of every random draw (noise, reference-latent sample): an integer from 0 to 2**63 - 2."""
    overwrite: bool = False
    """Replace an existing output (atomically; never a file that is one of this run's inputs). Without it an output
    that exists, or appears while rendering, is kept and this run's video goes to ``<output>.conflict-<id>.mp4``."""
    save_intermediates: bool = False
    """Save the denoise inputs (noise, text states, audio features, reference latents, face mask) beside the
    output."""
    output_dir: Optional[str] = None
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
    checkpoint_every: int = 5
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
