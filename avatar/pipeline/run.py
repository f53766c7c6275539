"""The pipeline as named stages: load and validate inputs → audio features → face mask → text conditioning →
reference latents → denoise → decode → write video and mux audio.

``Renderer`` holds the models (loaded once per launch) and the order of the stages; it renders jobs (one video
each). Encoders run on rank 0 only and their outputs are broadcast; the DiT runs on every rank under the plan, with
the long-audio strategy object (``avatar/pipeline/strategies.py``) deciding the windows and the denoise loops of
``avatar/pipeline/denoise.py`` stepping them; the VAE decode is split over all ranks by temporal and spatial tiles and rank 0
assembles and streams the frames into ffmpeg. Job/input contracts live in ``job.py``, the report in ``report.py``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from avatar.config import FPS, RunConfig
from avatar.io.errors import InputError
from avatar.parallel import comm
from avatar.pipeline import denoise as dn
from avatar.pipeline import strategies as strat
from avatar.pipeline.cache import CachePlan, cache_mode, uses_deep_cache
from avatar.pipeline.job import (
    Inputs,
    Job,
    StageTimer,
    config_dict,
    load_inputs,
    peak_host_memory_mb,
    resolve_dtype,
    to_uint8,
    with_steps,
)
from avatar.pipeline.publish import (
    open_writer,
    publish,
    remove_soundtrack,
    save_intermediates,
    speaker_soundtrack,
)
from avatar.pipeline.report import build_report, device_info, run_flops
from avatar.pipeline.resume import Resume, job_state
from avatar.pipeline.topology import Topology
from avatar.pipeline.work import owned, segment_rounds
from avatar.progress import format_seconds, progress

log = logging.getLogger(__name__)

#: The encoder stages (rank 0, once per job) whose FLOPs are counted as they run (the report's ``flops``).
ENCODER_STAGES = frozenset({"audio_features", "face_mask", "text_conditioning", "reference_latents"})


# --- the memory pre-flight ----------------------------------------------------------------------------------------


def preflight(cfg: RunConfig, topo: Topology, geometry=None):
    """Resolve ``memory.mode`` for this group (``avatar/memory/plan.py``) before any weight is moved to a device:
    every rank asks its device's free memory (``avatar/memory/device.py``), the group takes the smallest, and every
    rank checks the group's largest need (its rank 0's, which also encodes) against it, so all ranks stop together
    with the same one-line ``InputError`` (exit 2) when it does not fit. Returns the ``MemoryPlan`` (logged)."""
    from avatar.memory import estimate as memory_plan
    from avatar.memory.device import free_bytes
    from avatar.memory.measure import MeasureCache, default_cache_dir

    free, source = free_bytes(topo.device, cfg.memory)
    # The group's smallest free memory (None on every rank: nothing to check).
    unknown = float(2**62)
    smallest = -topo.all_reduce_max(-(float(free) if free is not None else unknown))
    free = None if smallest >= unknown else int(smallest)
    if geometry is None:
        geometry = memory_plan.planning_geometry(cfg.model, cfg.model.window_frames / FPS)
    ranks = memory_plan.Ranks(
        world=topo.world, data=topo.data_size, cfg=topo.cfg_size, sequence=getattr(topo.seq, "world", 1)
    )
    try:
        chosen = memory_plan.resolve(
            cfg.memory,
            ranks,
            cfg.model,
            geometry,
            free,
            deep_cache=uses_deep_cache(cfg.sampling.cache),
            auto_segments_seconds=cfg.long.auto_segments_seconds,
            overlap=cfg.long.overlap_frames or None,
            weights_dir=cfg.weights,
            fp8=cfg.fp8,
            cache=MeasureCache(default_cache_dir()),
        )
    except InputError as err:
        raise InputError(f"pre-flight (free memory from {source}, the group's smallest): {err}") from None
    for line in chosen.lines():
        log.info("%s", line)
    return chosen


def _move_encoders(encoders: dict, device: torch.device) -> None:
    """Move every module of the encoder objects to ``device`` (and their ``device`` attribute with them)."""
    for encoder in encoders.values():
        for value in vars(encoder).values():
            if isinstance(value, torch.nn.Module):
                value.to(device)
        if hasattr(encoder, "device"):
            encoder.device = device


# --- the renderer -------------------------------------------------------------------------------------------------


class Renderer:
    """Models loaded once; ``render(job)`` makes one video."""

    def __init__(self, cfg: RunConfig, topo: Topology, geometry=None) -> None:
        """``geometry``: the largest video this launch renders (``avatar.memory.estimate.Geometry``; None: one window at
        the model's planning size), which the pre-flight checks against every rank's free memory."""
        self.cfg = cfg
        self.topo = topo
        self.device = topo.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.timer = StageTimer()
        weights = Path(cfg.weights)
        with self.timer("memory_plan"):
            self.memory = preflight(cfg, topo, geometry)
        from avatar.memory import apply as mem

        self.placement = mem.run_placement(cfg, self.memory.mode)
        if topo.is_main:
            log.info("memory: %s", mem.describe(self.placement, cfg.memory.mode))
        with self.timer("load_dit"):
            from avatar.weights.load import load_dit

            model = load_dit(
                weights,
                cfg.model,
                dtype=self.dtype,
                device=mem.dit_load_device(self.placement, self.device),
                fp8=self.placement.fp8,
                load_key=cfg.load_key,
                fp8_compute=cfg.fp8_compute,
            )
            model.set_sequence_parallel(topo.seq)
            model.eval()
            if cfg.compile:
                from avatar.models.compile import compile_blocks

                log.info("compile=true: %d transformer blocks compiled (regional)", len(compile_blocks(model)))
            self.dit = mem.place_dit(model, self.placement, topo, cfg.memory.token_chunk)
            self.model = self.dit.model
        with self.timer("load_vae"):
            from avatar.config import OFFICIAL_VAE_DIR
            from avatar.models.vae import configure_tiling, load_vae

            vae_dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            vae_device = torch.device("cpu") if self.dit.offload.enabled else self.device  # offload=model: parked
            self.vae = load_vae(weights / OFFICIAL_VAE_DIR, dtype=vae_dtype, device=vae_device)
            from avatar.memory.modes import tiled_model

            configure_tiling(self.vae, tiled_model(cfg.model, self.placement))
        self._encoders = None
        self.decode_stats = None
        self.host_peak_after_load_mb = peak_host_memory_mb()

    # --- stages 2-5 on rank 0 -------------------------------------------------------------------------------------

    def encoders(self):
        if self._encoders is None:
            from avatar.config import (
                OFFICIAL_CLIP_DIR,
                OFFICIAL_FACE_DETECTOR,
                OFFICIAL_LLAVA_DIR,
                OFFICIAL_WHISPER_DIR,
            )
            from avatar.models.audio import AudioFeatureEncoder
            from avatar.models.face import FaceDetector
            from avatar.models.text import TextEncoder

            weights = Path(self.cfg.weights)
            device = self.encoder_device
            text_dtype = torch.float16 if device.type == "cuda" else torch.float32
            with self.timer("load_encoders"):
                self._encoders = dict(
                    audio=AudioFeatureEncoder(
                        weights / OFFICIAL_WHISPER_DIR,
                        device=device,
                        context_seconds=self.cfg.audio.context_seconds,
                    ),
                    face=FaceDetector(self.cfg.model.face_detector, weights / OFFICIAL_FACE_DETECTOR, device=device),
                    text=TextEncoder(
                        weights / OFFICIAL_LLAVA_DIR,
                        weights / OFFICIAL_CLIP_DIR,
                        self.cfg.model,
                        dtype=text_dtype,
                        device=device,
                    ),
                )
        else:
            _move_encoders(self._encoders, self.encoder_device)
        return self._encoders

    @property
    def encoder_device(self) -> torch.device:
        """Where the encoders run: the CPU with ``Placement.encoders_on_cpu``, else this rank's device."""
        from avatar.memory.apply import encoder_device

        return encoder_device(self.placement, self.device)

    def release_encoders(self) -> None:
        """Move the encoders off the GPU (to the CPU, kept loaded for the next job), so that they never sit beside
        a VAE tile or the DiT's activations; the next ``encoders()`` moves them back."""
        if self._encoders is None or self.encoder_device.type == "cpu":
            log.info("encoders: on the CPU, nothing to release before the reference latents and the denoise")
            return
        _move_encoders(self._encoders, torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("encoders: moved from %s to the CPU before the reference latents and the denoise", self.device)

    def conditioning(self, job: Job, inputs: Inputs) -> dn.Conditioning:
        """Stages 2-5 run on rank 0; the result is broadcast to every rank (tensors as tensors, see
        ``Topology.broadcast_fields``)."""
        cond = None
        if self.topo.is_main:
            cond = self._encode(job, inputs)
        with self.timer("broadcast_conditioning"):
            cond = self.topo.broadcast_fields(cond, src=0)
        return cond

    def _encode(self, job: Job, inputs: Inputs) -> dn.Conditioning:
        from avatar.models.face import face_mask
        from avatar.models.vae import encode_reference, reference_pixels

        cfg, enc = self.cfg, self.encoders()
        h_lat = inputs.height // cfg.model.vae_spatial_ratio
        w_lat = inputs.width // cfg.model.vae_spatial_ratio
        log.info("audio features: %d frames (%.2f s)", inputs.num_frames, inputs.num_frames / FPS)
        self.speakers_report = None
        with self.timer("audio_features"):
            if inputs.speaker_audio is None or job.speakers.turns:  # one track (turns: one shared recording)
                audio_feats = enc["audio"].features(inputs.wav, inputs.num_frames, window=cfg.model.audio_window)
            else:  # one track per speaker: [N, S, window, layers, channels] (one speaker: [N, ...], as audio=)
                tracks = inputs.speaker_audio.tracks
                per = [enc["audio"].features(w, inputs.num_frames, window=cfg.model.audio_window) for w in tracks]
                audio_feats = per[0] if len(per) == 1 else torch.stack(per, dim=1)
        with self.timer("face_mask"):
            boxes = enc["face"].detect(inputs.image)
            if job.speakers is None:
                mask = face_mask((inputs.width, inputs.height), boxes, (h_lat, w_lat))
                face_found = bool(len(boxes))
            else:
                mask, face_found = self._speaker_masks(job, inputs, boxes, (h_lat, w_lat))
        if len(boxes) or face_found:
            log.info("face detection: %d face(s) in %s", len(boxes), job.image)
        else:
            log.warning(
                "face detection: no face found in %s; the audio drives the whole image (report: face_found=false)",
                job.image,
            )
        log.info("text conditioning: prompt and negative prompt")
        with self.timer("text_conditioning"):
            prompt = cfg.sampling.prompt_prefix + job.prompt
            pos = enc["text"].encode(prompt, inputs.image)
            neg = enc["text"].encode(cfg.sampling.negative_prompt, inputs.image)
        self.release_encoders()
        log.info("reference latents: %dx%d, %d frames", inputs.width, inputs.height, cfg.model.window_frames)
        with self.timer("reference_latents"):
            pixels = reference_pixels(inputs.image, cfg.model.window_frames)
            generator = (
                torch.Generator(device="cpu").manual_seed(job.seed + 1) if cfg.sampling.reference_sample else None
            )
            with self.dit.offload.onload(self.vae):
                ref = encode_reference(self.vae, pixels, generator)
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
            face_found=face_found,
        )

    def _speaker_masks(self, job: Job, inputs: Inputs, boxes, latent_hw) -> tuple[torch.Tensor, bool]:
        """Several speakers (``avatar/pipeline/speakers.py``): every speaker's face, their disjoint masks (``[1, S,
        1, h, w]``; with turns one mask per latent frame, the speakers' summed: ``[1, 1, T, h, w]``, the shared
        recording's features drive whoever talks), and the report's ``speakers`` section (gains filled at the mux)."""
        from avatar.pipeline import speakers as sp

        spec, size = job.speakers, (inputs.width, inputs.height)
        layout = sp.resolve_faces(spec, inputs.input_size, size, boxes, image=f"image={job.image}")
        masks, infos = sp.speaker_masks(list(layout.boxes), size, latent_hw)
        if spec.turns:
            mask = sp.frame_masks(masks, spec, inputs.num_frames, FPS).sum(dim=1, keepdim=True)
        else:
            mask = masks[None, :, None]
        self.speakers_report = (layout, infos)
        for s, info in zip(spec.speakers, infos):
            log.info(
                "%s: mask %s (%.1f %% of the frame, %.1f %% given to a nearer face)",
                s.label,
                info.mask_box,
                100 * info.mask_area,
                100 * info.overlap_resolved,
            )
        return mask, layout.found

    # --- the whole job -----------------------------------------------------------------------------------------------

    def render(self, job: Job, state=None, preemption=None, on_step=None, frames: list | None = None) -> dict:
        """Render one job to ``job.output`` (the group's rank 0 writes). Returns the run report (rank 0) or {}.

        ``state``: a ``StateStore`` for resume (step checkpoints, finished segments, done marks). ``preemption``:
        a ``PreemptionHandler``; once any rank of the group has received its signal, every rank finishes the current
        step, rank 0 saves a checkpoint, and ``Preempted`` is raised on every rank. ``on_step(done, total)``: called
        on the group's rank 0 after every denoising step (the server's progress). ``frames``: a list that rank 0
        fills with the uint8 ``[n, H, W, 3]`` chunks it writes into the video (the Python API's result)."""
        cfg, topo = self.cfg, self.topo
        start = time.perf_counter()
        self.timer = StageTimer(count_flops=ENCODER_STAGES)
        from avatar.pipeline.decode import DecodeStats

        self.decode_stats = DecodeStats(world=topo.world)
        with self.timer("inputs"):
            inputs = load_inputs(cfg, job.image, job.audio, getattr(job, "speakers", None))
        cond = self.conditioning(job, inputs)
        strategy = strat.for_run(cfg, job.strategy, inputs.num_frames)
        h_lat = inputs.height // cfg.model.vae_spatial_ratio
        w_lat = inputs.width // cfg.model.vae_spatial_ratio
        sampling = with_steps(cfg.sampling, job.steps)
        stats = dn.DenoiseStats(
            strategy=strategy.name,
            num_latents=strategy.kept,
            infer_length=strategy.domain,
            windows_per_step=strategy.windows_per_step,
            cache=cache_mode(sampling.cache),
        )
        cond_dev = cond.to(self.device)
        velocity = dn.GuidedVelocity(self.model, cond_dev, sampling, topo, self.dtype, stats)
        noise = dn.make_noise((1, cfg.model.latent_channels, strategy.domain, h_lat, w_lat), job.seed).to(self.device)
        saved = None
        if cfg.save_intermediates and topo.is_main:
            saved = {
                "noise": noise.cpu(),
                "seed": job.seed,
                "strategy": strategy.name,
                "overlap": strategy.overlap,
                "cache": cache_mode(sampling.cache),
                **vars(cond),
            }
            save_intermediates(job, saved)
        key = job_state(config_dict(cfg), job)[0] if state is not None else None
        cached_steps = CachePlan.for_steps(sampling.steps, sampling.cache).reuse_steps
        resume = Resume(
            topo, state, key, strategy.name, preemption, cached_steps, sampling.steps, cfg.checkpoint_every, on_step
        )
        resume.adaptive = cache_mode(sampling.cache) == "adaptive"
        writer = None
        soundtrack, gains, mixed = job.audio, None, False
        if topo.is_main:
            if getattr(job, "speakers", None) is not None:
                soundtrack, gains, mixed = speaker_soundtrack(job, inputs)
            writer = open_writer(cfg, job, inputs, frames, audio_path=soundtrack, mixed=mixed)
        log.info(
            "denoising %d latent frames (%s, %d window(s) per step, %d steps, cache %s) for %s",
            strategy.domain,
            strategy.name,
            strategy.windows_per_step,
            sampling.steps,
            stats.cache,
            job.output,
        )
        seams = None
        conflict = None
        try:
            with comm.counting() as comm_counts, torch.inference_mode():
                seams = self._denoise_and_decode(job, strategy, noise, velocity, writer, inputs, resume, saved)
            if writer is not None:
                log.info("mux: audio of %s into %s", soundtrack, job.output)
                with self.timer("mux"):
                    writer.finish()
            stats.windows = strategy.details()
            stats.resumed_from_step = resume.resumed_from
            ranks = topo.gather_to_main(device_info(self.device))
            report = {}
            if topo.is_main:
                elapsed = time.perf_counter() - start
                report = build_report(
                    cfg,
                    topo,
                    job,
                    inputs,
                    strategy,
                    stats,
                    seams,
                    self.timer,
                    comm_counts,
                    elapsed,
                    cond.face_found,
                    ranks,
                    decode=self.decode_stats.as_dict(),
                    flops=run_flops(cfg, topo, strategy, stats, inputs, self.timer, self.decode_stats, self.vae),
                    memory=self.memory.as_dict(),
                )
                if getattr(job, "speakers", None) is not None:
                    from avatar.pipeline.speakers import report_section

                    layout, infos = self.speakers_report
                    seconds = inputs.speaker_audio.seconds
                    report["speakers"] = report_section(job.speakers, layout, infos, gains, seconds)
                    report["inputs"]["audio"] = list(job.audio_files().values())
                    report["inputs"]["speakers"] = job.speakers.source
                conflict = publish(cfg, job, writer, report, state, key)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            if mixed:
                remove_soundtrack(soundtrack)
        if topo.is_main and conflict is None:
            log.info(
                "wrote %s (%d frames, %.1f s) in %.1f s",
                job.output,
                writer.frames_written,
                writer.frames_written / FPS,
                report["seconds_total"],
            )
        topo.barrier()
        if conflict is not None:
            raise conflict
        return report

    def _denoise_and_decode(self, job, strategy, noise, velocity, writer, inputs, resume, saved):
        """Denoise (resuming from the job's checkpoint), decode and stream into ``writer``; returns the seam report."""
        if strategy.name == "segments":
            return self._render_segments(job, strategy, noise, velocity, writer, inputs, resume)
        start_step, latents = resume.load(noise.shape)
        cache = dn.new_cache(velocity.sampling, strategy.domain, host=self.placement.cache_on_host)
        resume.attach(cache)  # cache=adaptive: its state goes into (and comes back from) the step checkpoints
        with self.timer("denoise"), self.dit.offload.onload(self.model):
            latents = dn.denoise_lockstep(
                strategy, velocity, noise, cache, on_step=resume.on_step, start_step=start_step, latents=latents
            )
        if cache is not None:
            cache.free()
        if saved is not None:
            save_intermediates(job, {**saved, "latents": latents.cpu()})
        log.info(
            "decode: %d latent frames to %d video frames on %d rank(s)",
            strategy.kept,
            inputs.num_frames,
            self.topo.world,
        )
        with self.timer("decode_write"):
            return self._decode_to_writer(
                latents[:, :, : strategy.kept], inputs.num_frames, writer, strategy.boundaries()
            )

    # --- decode -----------------------------------------------------------------------------------------------------

    def _decode_to_writer(self, latents: torch.Tensor, num_frames: int, writer, boundaries: list[int]):
        """Decode ``latents`` split over all ranks by temporal and spatial tiles; rank 0 streams uint8 frames into the writer.
        Returns the seam report (rank 0)."""
        from avatar.pipeline.seams import SeamMeter

        meter = SeamMeter(boundaries) if self.topo.is_main else None
        written = 0
        with progress(total=num_frames, desc="decode", unit="frames", rank=0 if self.topo.is_main else 1) as bar:
            for uint8 in self._decoded_uint8(latents):
                uint8 = uint8[: max(0, num_frames - written)]
                if uint8.shape[0] == 0:
                    continue
                writer.write(uint8)
                meter.add(uint8)
                written += uint8.shape[0]
                bar.update(uint8.shape[0])
        return meter.report() if meter is not None else None

    # --- segments -----------------------------------------------------------------------------------------------------

    def _render_segments(self, job, strategy, noise, velocity, writer, inputs, resume):
        """Overlapping segments, each denoised to the end on its own with its own deep cache (freed when the segment
        ends; one segment per data group in each round), decoded as soon as its round is done and cross-faded into
        the stream; every finished stretch is also written as a playable mp4 with its audio, listed in
        ``<output>.segments/manifest.json``. Finished segments are kept in the resume state; a preempted round is
        checkpointed at its step and continued from there."""
        from avatar.pipeline.segments import SegmentStreamer

        cfg, topo = self.cfg, self.topo
        window, segments = strategy.window, strategy.plan
        sampling = velocity.sampling
        streamer = SegmentStreamer(job.output, inputs, segments, window, cfg, enabled=topo.is_main)
        finished = resume.finished_segments()
        ckpt_step, ckpt = resume.load_round()
        rounds = segment_rounds(len(segments), topo.data_size)
        num_rounds = len(rounds)
        clock, rendered = time.perf_counter(), 0
        for r, indices in enumerate(rounds):
            results = resume.load_segments([i for i in indices if i in finished])
            todo = [i for i in indices if i not in results]
            log.info(
                "segment%s %s/%d (round %d/%d)%s",
                "s" if len(indices) > 1 else "",
                f"{indices[0] + 1}-{indices[-1] + 1}" if len(indices) > 1 else indices[0] + 1,
                len(segments),
                r + 1,
                num_rounds,
                "" if todo else ": finished before, kept",
            )
            if todo:
                starts = {i: ckpt_step if i in ckpt else 0 for i in todo}
                mine = {}
                for i in owned(todo, topo):
                    start = segments[i].start
                    resumed = ckpt.get(i)
                    mine[i] = resumed.to(self.device) if resumed is not None else noise[:, :, start : start + window]
                caches = {i: dn.new_cache(sampling, window, host=self.placement.cache_on_host) for i in mine}
                with self.timer("denoise"), self.dit.offload.onload(self.model):
                    for step in dn.steps_range(min(starts.values()), sampling.steps, topo):
                        for i in mine:
                            if step >= starts[i]:
                                mine[i] = dn.denoise_segment_step(velocity, strategy, i, mine[i], step, caches[i])
                        resume.on_round_step(step, mine)
                for cache in caches.values():
                    velocity.stats.record_cache(cache)
                    if cache is not None:
                        cache.free()
                results.update(topo.all_gather_data(mine))
                resume.save_segments({i: results[i] for i in todo})
            for index in sorted(results):
                latents = results[index][:, :, : strategy.kept_latents(index)].to(self.device)
                with self.timer("decode_write"):
                    for frames in self._decoded_uint8(latents):
                        if topo.is_main:
                            streamer.add(index, frames, writer)
                if topo.is_main:
                    streamer.finish_segment(index, writer)
            if todo:
                rendered += 1
                elapsed = time.perf_counter() - clock
                log.info(
                    "segments: %d/%d done, %s elapsed, ETA %s",
                    indices[-1] + 1,
                    len(segments),
                    format_seconds(elapsed),
                    format_seconds(elapsed / rendered * (num_rounds - r - 1)),
                )
        return streamer.close()

    def _decoded_uint8(self, latents: torch.Tensor):
        """Decode split over all ranks; yields uint8 ``[n, H, W, 3]`` chunks on rank 0 (empty elsewhere)."""
        from avatar.models.vae import to_vae_space
        from avatar.pipeline.decode import distributed_decode_frames

        with self.dit.offload.onload(self.vae):
            stats = self.decode_stats
            for frames in distributed_decode_frames(self.vae, to_vae_space(self.vae, latents), self.topo, stats):
                if self.topo.is_main:
                    yield to_uint8(frames)


__all__ = ["Job", "Inputs", "Renderer", "load_inputs", "config_dict", "InputError", "peak_host_memory_mb"]
