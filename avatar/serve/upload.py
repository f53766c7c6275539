"""What a job's upload folder holds, as the API stores it and every worker reads it: ``image``, ``audio`` and, for
several speakers, ``speakers.json`` (the contract's object form, ``avatar/io/speakers.py``) with the further tracks
``audio_2``, ``audio_3``, ... beside it. Client file names never appear here: only these fixed names."""

from __future__ import annotations

from pathlib import Path

from avatar.config import RunConfig

SPEAKERS_FILE = "speakers.json"


def track_file(index: int) -> str:
    """The stored name of the request's ``index``-th audio file: ``audio``, then ``audio_2``, ``audio_3``, ..."""
    return "audio" if index == 0 else f"audio_{index + 1}"


def stored_job(
    cfg: RunConfig, folder: Path, output: str, job_id: str, *, prompt=None, seed=None, steps=None, strategy=None
):
    """The ``Job`` of an upload folder: ``image``, ``audio`` and, for several speakers, ``speakers.json`` (its
    tracks ``audio``, ``audio_2``, ... beside it). The request's prompt, seed and steps default to ``cfg``'s."""
    from avatar.io.speakers import read_speakers
    from avatar.pipeline.job import Job

    speakers = read_speakers(folder / SPEAKERS_FILE) if (folder / SPEAKERS_FILE).is_file() else None
    return Job(
        image=str(folder / "image"),
        audio=str(folder / "audio") if speakers is None else (speakers.shared_audio or ""),
        prompt=cfg.prompt if prompt is None else prompt,
        output=output,
        seed=cfg.seed if seed is None else seed,
        steps=cfg.sampling.steps if steps is None else steps,
        strategy=cfg.long.strategy if strategy is None else strategy,
        videoid=job_id,
        speakers=speakers,
    )
