"""Resume and preemption inside one render: step checkpoints, finished segments, and the agreed stop.

A job's state lives in a ``StateStore`` under a key hashed from its input files and the settings that change the
video (not the output path, the plan or the attention backend: the same latents come out on any GPU count). The
group's rank 0 reads and writes the store; what it reads is broadcast, so every rank resumes from the same latents.

Checkpoints are taken at step boundaries whose next step does not reuse the official deep cache (that cache lives
only in memory), every ``checkpoint_every`` steps and when a preemption is requested. The adaptive step cache
(``sampling.cache=adaptive``, ``avatar/pipeline/adaptive.py``) is small: its whole state goes into the checkpoint
(``attach``), so any step boundary is exact; a ``segments`` round with it is not checkpointed mid-round (a stop
there resumes the round from its start, finished segments kept), which is exact too. A preemption request is agreed on by all
ranks of the group at each step boundary (one tiny all-reduce), so all of them stop after the same step.
"""

from __future__ import annotations

import logging

import torch

from avatar.pipeline.state import NON_SEMANTIC_KEYS, job_key, semantic_config

log = logging.getLogger(__name__)

#: Settings that do not change the rendered video (on top of the state store's own list).
PLAN_KEYS = ("parallel", "attention", "prompt", "seed", "sampling.steps", "long.strategy")


class Preempted(Exception):
    """Raised on every rank of the group after the checkpoint of a requested stop."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted after step {step}")
        self.step = step


def job_state(cfg_dict: dict, job) -> tuple[str, dict]:
    """``(key, config)`` of a job: the key hashes the image and audio contents (every speaker's track) and
    ``config`` (with the speakers' faces and turns)."""
    config = semantic_config(cfg_dict, NON_SEMANTIC_KEYS + PLAN_KEYS)
    config["job"] = {"prompt": job.prompt, "seed": job.seed, "steps": job.steps, "strategy": job.strategy}
    speakers = getattr(job, "speakers", None)
    if speakers is None:
        return job_key({"image": job.image, "audio": job.audio}, config), config
    # faces, names, turns: a change renders afresh; the tracks by content only (their labels name the speakers), so
    # a rank or a worker that reads its own copy of the uploads computes the same key
    listed = speakers.as_dict()["speakers"]
    config["job"]["speakers"] = {"speakers": [{k: v for k, v in s.items() if k != "audio"} for s in listed]}
    return job_key({"image": job.image, **job.audio_files()}, config), config


class Resume:
    """The resume/preemption side of one render (every rank of the group holds one)."""

    def __init__(
        self, topo, state, key, strategy: str, preemption, cached_steps, total_steps: int, every: int, on_step=None
    ):
        self.topo = topo
        self.state = state
        self.key = key
        self.strategy = strategy
        self.preemption = preemption
        self.cached = frozenset(cached_steps)
        self.total = total_steps
        self.every = every
        self.resumed_from: int | None = None
        self.adaptive = False
        """``sampling.cache=adaptive``: the cache state rides in the checkpoints (``attach``)."""
        self._cache = None
        self._loaded_cache: tuple[dict, dict] | None = None
        self._stop = False
        self.discard = False  # the agreed stop is a cancel: nothing is saved
        self._on_step = on_step if topo.is_main else None

    def _progress(self, done: int) -> None:
        if self._on_step is not None:
            self._on_step(done, self.total)

    # --- the agreed stop --------------------------------------------------------------------------------------------

    def stop_requested(self) -> bool:
        """True on every rank of the group once any of them received a preemption signal (a collective). A
        ``preemption`` object with ``stop_level()`` (the server worker's ``JobStop``) may also answer 2: the job is
        cancelled, so every rank stops after this step with no checkpoint (``discard``), cached step or not."""
        if self.preemption is None or self._stop:
            return self._stop
        level = getattr(self.preemption, "stop_level", None)
        level = level() if level is not None else (1.0 if self.preemption.requested else 0.0)
        agreed = self.topo.all_reduce_max(float(level))
        self._stop, self.discard = agreed > 0, agreed >= 2
        if self.discard:
            log.warning("job cancelled: stopping after this step")
        elif self._stop:
            log.warning("preemption requested: finishing the current step, saving a checkpoint")
        return self._stop

    def _checkpoint_due(self, done: int, stop: bool) -> bool:
        if done in self.cached:  # the next step reuses the in-memory cache: not a resumable boundary
            return False
        periodic = self.every > 0 and done % self.every == 0 and done < self.total
        return stop or periodic

    # --- shift / blend ------------------------------------------------------------------------------------------------

    def load(self, shape) -> tuple[int, torch.Tensor | None]:
        """``(start_step, latents)`` from the job's checkpoint, or ``(0, None)``."""
        payload = self._broadcast_checkpoint()
        if payload is None:
            return 0, None
        step, tensors, meta = payload
        latents = tensors.get("latents")
        if meta.get("strategy") != self.strategy or latents is None or tuple(latents.shape) != tuple(shape):
            log.warning("ignoring a checkpoint of another strategy or shape (%s)", meta)
            return 0, None
        self.resumed_from = step
        log.info("resuming from the checkpoint after step %d", step)
        cache_tensors = {k: v for k, v in tensors.items() if k.startswith("adaptive.")}
        if cache_tensors:
            self._loaded_cache = (cache_tensors, meta.get("adaptive", {}))
        return step, latents.to(self.topo.device)

    def attach(self, cache) -> None:
        """The render's cache: an adaptive step cache gets the state of the checkpoint just loaded and is saved with
        every later checkpoint (the deep cache and None: nothing to do)."""
        from avatar.pipeline.adaptive import AdaptiveCache

        if not isinstance(cache, AdaptiveCache):
            return
        cache.bind(self.topo)
        self._cache = cache
        if self._loaded_cache is not None:
            cache.restore(*self._loaded_cache)
            self._loaded_cache = None
        elif self.resumed_from is not None:
            log.warning(
                "the checkpoint holds no adaptive cache state; the cache starts empty after step %d", self.resumed_from
            )

    def on_step(self, step: int, latents: torch.Tensor) -> None:
        done = step + 1
        self._progress(done)
        stop = self.stop_requested()
        if stop and self.discard:
            raise Preempted(done)
        if not self._checkpoint_due(done, stop):
            return
        tensors, meta = {"latents": latents}, {"strategy": self.strategy}
        if self._cache is not None and self.state is not None:  # a collective: every rank of the group takes part
            cache_tensors, cache_meta = self._cache.snapshot()
            tensors.update(cache_tensors)
            meta["adaptive"] = cache_meta
        if self.state is not None and self.topo.is_main:
            self.state.save_checkpoint(self.key, done, tensors, meta)
        if stop:
            raise Preempted(done)

    # --- segments -----------------------------------------------------------------------------------------------------

    def finished_segments(self) -> set[int]:
        found = self.state.finished_segments(self.key) if self.state is not None and self.topo.is_main else []
        found = set(self.topo.broadcast_object(found))
        if found:
            log.info("resuming: %d finished segment(s) kept", len(found))
        return found

    def load_segments(self, indices) -> dict[int, torch.Tensor]:
        """Latents of finished segments (read by rank 0, broadcast)."""
        loaded = None
        if self.topo.is_main:
            loaded = {i: self.state.load_segment(self.key, i)[0]["latents"] for i in indices}
        return self.topo.broadcast_object(loaded)

    def save_segments(self, results: dict[int, torch.Tensor]) -> None:
        if self.state is not None and self.topo.is_main:
            for index, latents in results.items():
                self.state.save_segment(self.key, index, {"latents": latents})

    def load_round(self) -> tuple[int, dict[int, torch.Tensor]]:
        """``(step, {segment: latents})`` of a checkpointed unfinished round, or ``(0, {})``."""
        payload = self._broadcast_checkpoint()
        if payload is None:
            return 0, {}
        step, tensors, meta = payload
        if meta.get("strategy") != "segments":
            return 0, {}
        self.resumed_from = step
        log.info("resuming %d segment(s) from the checkpoint after step %d", len(tensors), step)
        return step, {int(name.removeprefix("segment_")): t for name, t in tensors.items()}

    def on_round_step(self, step: int, mine: dict[int, torch.Tensor]) -> None:
        done = step + 1
        self._progress(done)
        stop = self.stop_requested()
        if stop and self.discard:
            raise Preempted(done)
        if self.adaptive:  # no mid-round checkpoint: the round restarts from its noise (exact)
            if stop:
                raise Preempted(done)
            return
        if not self._checkpoint_due(done, stop):
            return
        gathered = self.topo.all_gather_data(mine)
        if self.state is not None and self.topo.is_main:
            tensors = {f"segment_{i}": t for i, t in gathered.items()}
            self.state.save_checkpoint(self.key, done, tensors, {"strategy": "segments"})
        if stop:
            raise Preempted(done)

    def _broadcast_checkpoint(self):
        payload = None
        if self.state is not None and self.topo.is_main:
            payload = self.state.load_checkpoint(self.key)
        return self.topo.broadcast_object(payload)
