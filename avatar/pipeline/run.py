"""The pipeline as named stages: load and validate inputs → audio features → face mask → text conditioning →
reference latents → denoise → decode → write video and mux audio.

``Renderer`` holds the models (loaded once per launch) and renders jobs (one video each). Encoders run on rank 0
only and their outputs are broadcast; the DiT runs on every rank under the plan; the VAE decode is split over all
ranks by temporal tiles and rank 0 assembles and streams the frames into ffmpeg.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from avatar.config import RunConfig
from avatar.io.errors import InputError
from avatar.pipeline import denoise as dn
from avatar.pipeline import windows as win
from avatar.pipeline.topology import Topology

log = logging.getLogger(__name__)


# --- stage contracts ----------------------------------------------------------------------------------------------


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


@dataclass
class Inputs:
    """Stage 1: the validated, decoded inputs."""

    image: object  # PIL.Image RGB, resized to the bucket
    width: int
    height: int
    wav: np.ndarray  # float32 mono at audio.sample_rate
    num_frames: int  # video frames = audio length at fps (rounded to the nearest frame)
    hashes: dict[str, str]


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start

        return _Ctx()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def peak_host_memory_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- stage 1: inputs ----------------------------------------------------------------------------------------------


def load_inputs(cfg: RunConfig, image_path: str, audio_path: str) -> Inputs:
    from avatar.io.audio import load_audio
    from avatar.io.image import bucket_size, load_image, resize_to_bucket

    image = load_image(image_path)
    width, height = bucket_size(image.width, image.height, cfg.model.image_size, cfg.model.bucket_multiple)
    image = resize_to_bucket(image, (width, height))
    wav = load_audio(audio_path, cfg.audio.sample_rate, max_seconds=cfg.audio.max_seconds)
    num_frames = max(1, round(len(wav) * cfg.audio.fps / cfg.audio.sample_rate))
    hashes = {"image": file_sha256(image_path), "audio": file_sha256(audio_path)}
    return Inputs(image=image, width=width, height=height, wav=wav, num_frames=num_frames, hashes=hashes)


# --- strategies ---------------------------------------------------------------------------------------------------


def choose_strategy(requested: str, num_frames: int, cfg: RunConfig) -> str:
    """``auto``: the official ``shift`` scheme for short audio, ``segments`` (bounded memory, partial output) for
    audio longer than ``long.auto_segments_seconds``."""
    if requested != "auto":
        return requested
    seconds = num_frames / cfg.audio.fps
    return "segments" if seconds > cfg.long.auto_segments_seconds else "shift"


def window_latents(cfg: RunConfig) -> int:
    return win.latents_for_frames(cfg.model.window_frames, cfg.model.vae_temporal_ratio)


def default_overlap(cfg: RunConfig) -> int:
    if cfg.long.overlap_frames > 0:
        return cfg.long.overlap_frames
    return max(1, window_latents(cfg) // 4)


def shift_geometry(num_frames: int, cfg: RunConfig) -> tuple[int, int]:
    """(infer_length, latents kept) of the official scheme, generalised to any window length and uncapped."""
    plan = win.official_shift_plan(num_frames, cfg.model.window_frames, cfg.model.vae_temporal_ratio)
    return plan.infer_length, plan.video_length


# --- the renderer -------------------------------------------------------------------------------------------------


class Renderer:
    """Models loaded once; ``render(job)`` makes one video."""

    def __init__(self, cfg: RunConfig, topo: Topology) -> None:
        self.cfg = cfg
        self.topo = topo
        self.device = topo.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.timer = StageTimer()
        weights = Path(cfg.weights)
        with self.timer("load_dit"):
            from avatar.weights.load import load_dit

            self.model = load_dit(weights, cfg.model, dtype=self.dtype, device=self.device, fp8=cfg.fp8, load_key=cfg.load_key)
            self.model.set_sequence_parallel(topo.seq)
            self.model.eval()
        with self.timer("load_vae"):
            from avatar.config import OFFICIAL_VAE_DIR
            from avatar.models.vae import load_vae

            vae_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            self.vae = load_vae(weights / OFFICIAL_VAE_DIR, dtype=vae_dtype, device=self.device)
        self._encoders = None
        self.host_peak_after_load_mb = peak_host_memory_mb()

    # --- stages 2-5 on rank 0 -------------------------------------------------------------------------------------

    def encoders(self):
        if self._encoders is None:
            from avatar.config import OFFICIAL_CLIP_DIR, OFFICIAL_FACE_DETECTOR, OFFICIAL_LLAVA_DIR, OFFICIAL_WHISPER_DIR
            from avatar.models.audio import AudioFeatureEncoder
            from avatar.models.face import FaceDetector
            from avatar.models.text import TextEncoder

            weights = Path(self.cfg.weights)
            text_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            with self.timer("load_encoders"):
                self._encoders = dict(
                    audio=AudioFeatureEncoder(weights / OFFICIAL_WHISPER_DIR, device=self.device),
                    face=FaceDetector(self.cfg.model.face_detector, weights / OFFICIAL_FACE_DETECTOR, device=self.device),
                    text=TextEncoder(weights / OFFICIAL_LLAVA_DIR, weights / OFFICIAL_CLIP_DIR, self.cfg.model, dtype=text_dtype, device=self.device),
                )
        return self._encoders

    def conditioning(self, job: Job, inputs: Inputs) -> dn.Conditioning:
        """Stages 2-5 run on rank 0; the result is broadcast to every rank."""
        cond = None
        if self.topo.is_main:
            cond = self._encode(job, inputs)
        with self.timer("broadcast_conditioning"):
            cond = self.topo.broadcast_object(cond, src=0)
        return cond

    def _encode(self, job: Job, inputs: Inputs) -> dn.Conditioning:
        from avatar.models.face import face_mask
        from avatar.models.vae import encode_reference

        cfg, enc = self.cfg, self.encoders()
        h_lat = inputs.height // cfg.model.vae_spatial_ratio
        w_lat = inputs.width // cfg.model.vae_spatial_ratio
        with self.timer("audio_features"):
            audio_feats = enc["audio"].features(inputs.wav, inputs.num_frames, cfg.model, cfg.audio)
        with self.timer("face_mask"):
            boxes = enc["face"].detect(inputs.image)
            mask = face_mask((inputs.width, inputs.height), boxes, (h_lat, w_lat))
        with self.timer("text_conditioning"):
            prompt = cfg.sampling.prompt_prefix + job.prompt
            pos = enc["text"].encode(prompt, inputs.image)
            neg = enc["text"].encode(cfg.sampling.negative_prompt, inputs.image)
        with self.timer("reference_latents"):
            pixels = torch.from_numpy(np.asarray(inputs.image, dtype=np.float32)).permute(2, 0, 1)
            pixels = (pixels / 127.5 - 1.0)[None, :, None].repeat(1, 1, cfg.model.window_frames, 1, 1)
            generator = torch.Generator(device="cpu").manual_seed(job.seed + 1) if cfg.sampling.reference_sample else None
            ref = encode_reference(self.vae, pixels.to(self.device), cfg.model.vae_scaling_factor, generator)
        return dn.Conditioning(
            audio_feats=audio_feats.float().cpu(),
            face_mask=mask.float().cpu(),
            text_states=pos.states.float().cpu(),
            text_mask=pos.mask.cpu(),
            text_pooled=pos.pooled.float().cpu(),
            neg_text_states=neg.states.float().cpu(),
            neg_text_mask=neg.mask.cpu(),
            neg_text_pooled=neg.pooled.float().cpu(),
            ref_latents=ref.float().cpu(),
            num_frames=inputs.num_frames,
        )

    # --- the whole job -----------------------------------------------------------------------------------------------

    def render(self, job: Job, state=None, stop_requested=None) -> dict:
        """Render one job to ``job.output`` (rank 0 writes). Returns the run report (rank 0) or {}."""
        cfg, topo = self.cfg, self.topo
        start = time.perf_counter()
        self.timer = StageTimer()
        with self.timer("inputs"):
            inputs = load_inputs(cfg, job.image, job.audio)
        cond = self.conditioning(job, inputs)
        strategy = choose_strategy(job.strategy, inputs.num_frames, cfg)
        h_lat = inputs.height // cfg.model.vae_spatial_ratio
        w_lat = inputs.width // cfg.model.vae_spatial_ratio
        stats = dn.DenoiseStats(strategy=strategy)
        sampling = _with_steps(cfg.sampling, job.steps)
        window = window_latents(cfg)
        num_latents = win.latents_for_frames(inputs.num_frames, cfg.model.vae_temporal_ratio)
        if strategy == "shift":
            infer_length, kept = shift_geometry(inputs.num_frames, cfg)
            num_latents_noise = infer_length
        else:
            kept = num_latents
            num_latents_noise = max(num_latents, window) if strategy == "blend" else num_latents
            infer_length = num_latents_noise
        stats.num_latents, stats.infer_length = kept, infer_length
        use_cache = self._cache_allowed(sampling, strategy, infer_length)
        stats.cache = "on" if use_cache else "off"
        velocity = dn.GuidedVelocity(self.model, cond.to(self.device), sampling, cfg.model, topo, self.dtype, use_cache, stats)
        noise = dn.make_noise((1, cfg.model.latent_channels, num_latents_noise, h_lat, w_lat), job.seed).to(self.device)
        if cfg.save_intermediates and topo.is_main:
            self._save_intermediates(job, cond, noise)
        tmp_dir = Path(job.output).parent
        from avatar.io.video import VideoWriter

        writer = None
        if topo.is_main:
            writer = VideoWriter(job.output, cfg.output.fps, inputs.width, inputs.height, audio_path=job.audio, crf=cfg.output.crf, preset=cfg.output.preset)
        seams = None
        try:
            with torch.inference_mode():
                if strategy == "segments":
                    seams = self._render_segments(job, cond, noise, sampling, velocity, stats, writer, inputs)
                else:
                    with self.timer("denoise"):
                        if strategy == "shift":
                            latents = dn.denoise_shift(velocity, noise, cond.to(self.device), sampling, cfg.model, topo)
                        else:
                            latents = dn.denoise_blend(velocity, noise, cond.to(self.device), sampling, cfg.model, default_overlap(cfg), topo)
                    latents = latents[:, :, :kept]
                    with self.timer("decode_write"):
                        seams = self._decode_to_writer(latents, inputs.num_frames, writer, boundaries=self._boundaries(strategy, kept, cfg))
            if writer is not None:
                with self.timer("mux"):
                    writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        stats.windows = self._window_details(strategy, kept, infer_length, cfg)
        report = {}
        if topo.is_main:
            report = self._report(job, inputs, strategy, stats, seams, time.perf_counter() - start)
            from avatar.io.atomic import atomic_write_json

            atomic_write_json(job.output + ".json", report)
            log.info("wrote %s (%d frames, %.1f s) in %.1f s", job.output, inputs.num_frames, inputs.num_frames / cfg.audio.fps, report["seconds_total"])
        topo.barrier()
        return report

    def _cache_allowed(self, sampling, strategy: str, infer_length: int) -> bool:
        if not sampling.cache:
            return False
        if strategy == "shift" and self.topo.data_size > 1:
            log.info("sampler cache off: the shift strategy's per-frame cache is shared by all windows of a step, which data-parallel groups do not share")
            return False
        if infer_length > self.cfg.long.max_cache_frames:
            log.info("sampler cache off: %d latent frames exceed long.max_cache_frames=%d", infer_length, self.cfg.long.max_cache_frames)
            return False
        return True

    def _boundaries(self, strategy: str, kept: int, cfg: RunConfig) -> list[int]:
        """Video-frame indices where one window's frames meet the next (for the seam report)."""
        window = window_latents(cfg)
        ratio = cfg.model.vae_temporal_ratio
        if strategy == "shift":
            return [4 * s for s in range(window, kept, window)]
        windows = win.plan_windows(kept, window, default_overlap(cfg))
        return [ratio * w.start for w in windows[1:]]

    def _window_details(self, strategy: str, kept: int, infer_length: int, cfg: RunConfig) -> list[dict]:
        window = window_latents(cfg)
        if strategy == "shift":
            return [{"start_latent": s, "latents": window, "circular": True} for s in range(0, infer_length, window)]
        return [{"start_latent": w.start, "latents": window} for w in win.plan_windows(kept, window, default_overlap(cfg))]

    # --- decode -----------------------------------------------------------------------------------------------------

    def _decode_to_writer(self, latents: torch.Tensor, num_frames: int, writer, boundaries: list[int], first_frame: int = 0):
        """Decode ``latents`` split over all ranks by temporal tiles; rank 0 streams uint8 frames into the writer.
        Returns the seam report (rank 0)."""
        from avatar.pipeline.seams import SeamMeter

        meter = SeamMeter(boundaries) if self.topo.is_main else None
        written = 0
        for uint8 in self._decoded_uint8(latents):
            uint8 = uint8[: max(0, num_frames - written)]
            if uint8.shape[0] == 0:
                continue
            writer.write(uint8)
            meter.add(uint8)
            written += uint8.shape[0]
        return meter.report() if meter is not None else None

    # --- segments -----------------------------------------------------------------------------------------------------

    def _render_segments(self, job, cond, noise, sampling, velocity, stats, writer, inputs, state=None, key=None):
        """Overlapping segments, each denoised to the end on its own (spread over the data groups), decoded as soon as
        its round is done and cross-faded into the stream; every finished stretch is also written as a playable
        mp4 with its audio, listed in ``<output>.segments/manifest.json``."""
        from avatar.pipeline.segments import SegmentStreamer

        cfg, topo = self.cfg, self.topo
        window = window_latents(cfg)
        kept = win.latents_for_frames(inputs.num_frames, cfg.model.vae_temporal_ratio)
        segments = win.plan_windows(kept, window, default_overlap(cfg))
        cond_dev = cond.to(self.device)
        streamer = SegmentStreamer(job.output, inputs, segments, window, cfg, enabled=topo.is_main)
        num_rounds = -(-len(segments) // topo.data_size)
        for r in range(num_rounds):
            mine = {}
            for index in range(r * topo.data_size, min((r + 1) * topo.data_size, len(segments))):
                if not topo.owns(index):
                    continue
                seg = segments[index]
                with self.timer("denoise"):
                    seg_noise = dn._take(noise, seg.start, window)
                    mine[index] = dn.denoise_window_to_end(velocity, seg_noise, cond_dev, sampling, seg.start, key=("seg", index))
            results = topo.all_gather_data(mine)
            for index in sorted(results):
                seg = segments[index]
                latents = results[index][:, :, : min(window, kept - seg.start)]
                with self.timer("decode_write"):
                    for frames in self._decoded_uint8(latents):
                        if topo.is_main:
                            streamer.add(index, frames, writer)
                if topo.is_main:
                    streamer.finish_segment(index, writer)
        return streamer.close()

    def _decoded_uint8(self, latents: torch.Tensor):
        """Decode split over all ranks; yields uint8 ``[n, H, W, 3]`` chunks on rank 0 (empty elsewhere)."""
        from avatar.models.vae import distributed_decode_frames

        for frames in distributed_decode_frames(self.vae, latents / self.cfg.model.vae_scaling_factor, self.cfg.model, self.topo):
            if self.topo.is_main:
                yield to_uint8(frames)

    # --- reports ------------------------------------------------------------------------------------------------------

    def _save_intermediates(self, job: Job, cond: dn.Conditioning, noise: torch.Tensor) -> None:
        from avatar.io.atomic import atomic_torch_save

        atomic_torch_save({"noise": noise.cpu(), "seed": job.seed, **vars(cond)}, job.output + ".intermediates.pt")

    def _report(self, job: Job, inputs: Inputs, strategy: str, stats, seams, seconds: float) -> dict:
        from launch.config import to_dict  # noqa: PLC0415  (the resolved config as plain data)

        import diffusers
        import transformers

        return {
            "output": os.path.abspath(job.output),
            "videoid": job.videoid,
            "seed": job.seed,
            "steps": job.steps,
            "prompt": job.prompt,
            "strategy": strategy,
            "num_frames": inputs.num_frames,
            "fps": self.cfg.audio.fps,
            "duration_seconds": inputs.num_frames / self.cfg.audio.fps,
            "resolution": [inputs.width, inputs.height],
            "inputs": {"image": os.path.abspath(job.image), "audio": os.path.abspath(job.audio), "sha256": inputs.hashes},
            "plan": {"world": self.topo.world, "data": self.topo.data_size, "cfg": self.topo.cfg_size, "sequence": getattr(self.topo.seq, "world", 1)},
            "denoise": asdict(stats),
            "seams": seams,
            "timings_seconds": {k: round(v, 3) for k, v in self.timer.seconds.items()},
            "seconds_total": round(seconds, 3),
            "peak_host_memory_mb": round(peak_host_memory_mb(), 1),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
            "config": to_dict(self.cfg),
        }


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Decoded ``[n, 3, H, W]`` in [-1, 1] -> uint8 ``[n, H, W, 3]`` by truncation, as the official code does."""
    return ((frames.float() / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _with_steps(sampling, steps: int):
    from dataclasses import replace

    return replace(sampling, steps=steps)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    raise TypeError(type(obj).__name__)


__all__ = ["Job", "Inputs", "Renderer", "load_inputs", "choose_strategy", "InputError", "json"]
