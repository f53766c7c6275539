"""Publishing a job's files, on the group's rank 0: the video writer (stale temporaries of a killed run removed
first), the order of the done mark, the mp4 and its report, the conflict sibling when the output appeared meanwhile,
and the intermediates file. Nothing here decides what is rendered."""

from __future__ import annotations

import logging
import os

from avatar.config import FPS, RunConfig
from avatar.io.atomic import atomic_torch_save, atomic_write_json, remove_stale_temps
from avatar.io.errors import OutputConflict

log = logging.getLogger("avatar.pipeline.run")


def open_writer(
    cfg: RunConfig, job, inputs, frames: list | None = None, audio_path: str | None = None, mixed: bool = False
):
    """The ``VideoWriter`` of ``job.output`` (temporary until ``publish``) muxing ``audio_path`` (default
    ``job.audio``; several speakers: their one file, or with ``mixed`` their mix, already at its final level); with
    ``frames`` it also keeps every chunk written (the Python API's result)."""
    from avatar.io.video import VideoWriter

    for path in (job.output, job.output + ".json"):
        for stale in remove_stale_temps(path):
            log.info("removed %s (left by a killed run)", stale)
    writer = VideoWriter(
        job.output,
        FPS,
        inputs.width,
        inputs.height,
        audio_path=job.audio if audio_path is None else audio_path,
        crf=cfg.output.crf,
        preset=cfg.output.preset,
        replace=cfg.overwrite,
        audio_gain=1.0 if mixed else inputs.audio_check.get("gain", 1.0),  # the rescale of an out-of-range input
    )
    return writer if frames is None else _KeepFrames(writer, frames)


def publish(cfg: RunConfig, job, writer, report: dict, state=None, key: str | None = None) -> OutputConflict | None:
    """Done mark first, then the mp4, then its report: a kill before the mp4 leaves a done mark without its output,
    which a rerun renders again (done means done *and* the output exists); never an unrecognised mp4. The mp4 never
    replaces a file that appeared meanwhile (unless overwrite=true): ours then goes to the conflict sibling, with its
    report beside it, and the conflict is returned."""
    conflict = None
    if state is not None:
        state.mark_done(  # the report too: a kill before its file is written loses nothing (state.restore_report)
            key, {"output": os.path.abspath(job.output), "seconds": report["seconds_total"], "report": report}
        )
    published = writer.commit()
    if published != writer.path:
        conflict = OutputConflict(job.output, published)
        if state is not None:
            state.clear(key)
    report_path = atomic_write_json(published + ".json", report, replace=cfg.overwrite)
    if report_path != published + ".json":
        log.warning("%s.json appeared meanwhile and was kept; the report is at %s", published, report_path)
    return conflict


def speaker_soundtrack(job, inputs) -> tuple[str, list[float], bool]:
    """Several speakers: the file muxed into the video, every track's gain, and whether that file is a temporary.
    One file (one track, or the shared recording of turns) is muxed as it is; several tracks are mixed at their
    native rate without clipping (``avatar/pipeline/speakers.py``) into a temporary beside the output, removed after
    the mux (:func:`remove_soundtrack`; a killed run's is removed by the next run's ``open_writer``)."""
    from avatar.io.atomic import temp_name
    from avatar.pipeline.speakers import soundtrack

    mix, gains = soundtrack(job.speakers, inputs.speaker_audio)
    if mix is None:
        return next(iter(job.audio_files().values())), gains, False
    import soundfile as sf

    path = temp_name(job.output, "mix.wav")
    sf.write(path, mix, inputs.speaker_audio.sample_rate, subtype="FLOAT")
    log.info("soundtrack: %d tracks mixed, gain %s", len(gains), ", ".join(f"{g:.3f}" for g in gains))
    return path, gains, True


def remove_soundtrack(path: str) -> None:
    """Delete the temporary mix of :func:`speaker_soundtrack`."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def save_intermediates(job, tensors: dict) -> None:
    """``<output>.intermediates.pt``: the noise and conditioning (before denoising), then also the final latents
    (``shift``/``blend``); ``denoise.load_intermediates`` + ``denoise.denoise_window_strategy`` reproduce the run."""
    atomic_torch_save(tensors, job.output + ".intermediates.pt")


class _KeepFrames:
    """A ``VideoWriter`` that also keeps every chunk written (``Renderer.render(frames=...)``)."""

    def __init__(self, writer, frames: list) -> None:
        self.writer, self.frames = writer, frames

    def write(self, chunk) -> None:
        self.writer.write(chunk)
        self.frames.append(chunk if chunk.ndim == 4 else chunk[None])

    def __getattr__(self, name):
        return getattr(self.writer, name)
