"""The parallel plan: how the world is split into data × cfg × ring × ulysses, and the device mesh.

The ``auto`` rule (each degree of ``ParallelConfig`` is an integer string or ``auto``):

0. The explicit degrees are taken as given; their product must divide the world. ``free`` = world / that product.
1. ``cfg``: 2 when ``free`` is even (the two guidance branches run side by side), else 1. ``free`` /= cfg.
2. ``ulysses``: the largest divisor of the head count that also divides ``free`` (capped by ``num_tokens`` when
   that is given and ``data`` is ``auto``). ``free`` /= ulysses.
3. ``ring``: with ``data`` explicit, all of ``free`` (so sequence parallelism gets world / (data·cfg)); with
   ``data`` auto, all of ``free`` as well, unless ``num_tokens`` is given: then the largest divisor of ``free``
   that keeps ulysses·ring ≤ num_tokens. ``free`` /= ring.
4. ``data``: what remains.

Examples for 24 heads: world 8 → cfg 2 × ulysses 4; world 6 → cfg 2 × ulysses 3; world 5 → ring 5; with
``data=2`` and world 8 → data 2 × cfg 2 × ulysses 2. The plan is valid when every degree is ≥ 1, cfg ∈ {1, 2},
the head count is divisible by ulysses and the product equals the world size.

``python -m launch.plan world=8 model=hunyuan_avatar [parallel=sp] [parallel.ulysses=2] [num_tokens=34]`` prints the
plan and why each degree was chosen, without GPUs and without a process group.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from enum import StrEnum

from avatar.config import ModelConfig, ParallelConfig
from avatar.io.errors import InputError
from launch.resources import config_dir

logger = logging.getLogger(__name__)

CONFIG_DIR = config_dir()


class MeshAxis(StrEnum):
    """Named axes of the device mesh, outermost first."""

    DATA = "data"
    CFG = "cfg"
    RING = "ring"
    ULYSSES = "ulysses"


MESH_AXES = (MeshAxis.DATA, MeshAxis.CFG, MeshAxis.RING, MeshAxis.ULYSSES)


def _describe(degrees: dict[str, object], world_size: int, num_heads: int | None) -> str:
    shown = " ".join(f"{name}={value}" for name, value in degrees.items())
    heads = "" if num_heads is None else f" and {num_heads} heads"
    return f"parallel plan {shown} for world size {world_size}{heads}"


def _parse_degree(name: str, value: object) -> int | None:
    """``auto`` → None, an integer (string) → int; anything else is an InputError."""
    if isinstance(value, bool):
        raise InputError(f"parallel.{name}={value!r} is not valid: use a positive integer or 'auto'")
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError as err:
        raise InputError(f"parallel.{name}={value!r} is not valid: use a positive integer or 'auto'") from err


@dataclass(frozen=True)
class ParallelPlan:
    """Degrees of the four mesh axes; their product is the world size."""

    data: int = 1
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    world_size: int = 1
    num_heads: int | None = None
    reasons: tuple[str, ...] = field(default=(), compare=False)
    """One line per degree saying which rule chose it (for the CLI and the log)."""

    def __post_init__(self) -> None:
        degrees = self.degrees()
        problem = None
        if any(not isinstance(value, int) or value < 1 for value in degrees.values()):
            problem = "every degree must be an integer ≥ 1"
        elif self.cfg not in (1, 2):
            problem = "cfg must be 1 or 2 (two guidance branches)"
        elif self.num_heads is not None and self.num_heads % self.ulysses != 0:
            problem = f"the head count {self.num_heads} is not divisible by ulysses={self.ulysses}"
        elif math.prod(degrees.values()) != self.world_size:
            problem = f"the product of the degrees is {math.prod(degrees.values())}, not the world size"
        if problem is not None:
            raise InputError(f"invalid {_describe(degrees, self.world_size, self.num_heads)}: {problem}")

    def degrees(self) -> dict[str, int]:
        return {"data": self.data, "cfg": self.cfg, "ring": self.ring, "ulysses": self.ulysses}

    @property
    def sequence_size(self) -> int:
        """Ranks sharing one sequence (ring × ulysses)."""
        return self.ring * self.ulysses

    def size(self, axis: MeshAxis | str) -> int:
        return self.degrees()[MeshAxis(axis).value]

    @classmethod
    def resolve(
        cls, parallel_cfg: ParallelConfig, world_size: int, num_heads: int, num_tokens: int | None = None
    ) -> ParallelPlan:
        """Apply the ``auto`` rule of the module docstring. ``num_tokens``: optional count of shardable sequence
        units (latent frames incl. the reference frame) that caps automatic sequence parallelism."""
        given = {name: _parse_degree(name, getattr(parallel_cfg, name)) for name in ("data", "cfg", "ring", "ulysses")}
        shown = {name: ("auto" if value is None else value) for name, value in given.items()}
        if world_size < 1:
            raise InputError(f"invalid {_describe(shown, world_size, num_heads)}: the world size must be ≥ 1")
        if any(value is not None and value < 1 for value in given.values()):
            raise InputError(f"invalid {_describe(shown, world_size, num_heads)}: every degree must be ≥ 1")
        fixed = math.prod(value for value in given.values() if value is not None)
        if world_size % fixed != 0:
            raise InputError(
                f"invalid {_describe(shown, world_size, num_heads)}: the explicit degrees multiply to {fixed}, "
                "which does not divide the world size"
            )
        free = world_size // fixed
        reasons: list[str] = []
        degrees = dict(given)

        if given["cfg"] is None:
            degrees["cfg"] = 2 if free % 2 == 0 else 1
            why = "even: the two guidance branches run side by side" if free % 2 == 0 else "odd: no CFG split"
            reasons.append(f"cfg={degrees['cfg']}: auto, {free} ranks left, {why}")
            free //= degrees["cfg"]
        else:
            reasons.append(f"cfg={degrees['cfg']}: given")

        token_cap = num_tokens if (num_tokens is not None and given["data"] is None) else None
        if given["ulysses"] is None:
            cap = free if token_cap is None else min(free, token_cap)
            degrees["ulysses"] = max(d for d in range(1, cap + 1) if num_heads % d == 0 and free % d == 0)
            reasons.append(
                f"ulysses={degrees['ulysses']}: auto, the largest divisor of {num_heads} heads that divides the "
                f"{free} ranks left" + ("" if token_cap is None else f" and is ≤ {token_cap} tokens")
            )
            free //= degrees["ulysses"]
        else:
            reasons.append(f"ulysses={degrees['ulysses']}: given")

        if given["ring"] is None:
            if token_cap is None:
                degrees["ring"] = free
                reasons.append(f"ring={free}: auto, the rest of the sequence-parallel share")
            else:
                limit = max(1, token_cap // degrees["ulysses"])
                degrees["ring"] = max(d for d in range(1, free + 1) if free % d == 0 and d <= limit)
                reasons.append(
                    f"ring={degrees['ring']}: auto, the largest divisor of the {free} ranks left keeping "
                    f"ulysses·ring ≤ {token_cap} tokens"
                )
            free //= degrees["ring"]
        else:
            reasons.append(f"ring={degrees['ring']}: given")

        if given["data"] is None:
            degrees["data"] = free
            reasons.append(f"data={free}: auto, the ranks that remain")
            free = 1
        else:
            reasons.append(f"data={degrees['data']}: given")
        if free != 1:
            raise InputError(
                f"invalid {_describe(shown, world_size, num_heads)}: the degrees multiply to {world_size // free}, "
                f"leaving {free}× of the world over with no 'auto' degree to take it"
            )
        return cls(world_size=world_size, num_heads=num_heads, reasons=tuple(reasons), **degrees)

    def build_mesh(self, device_type: str = "cpu") -> ParallelMesh:
        """One named ``DeviceMesh`` (data, cfg, ring, ulysses) when the world has more than one rank; needs the
        default process group. A world of one gets a mesh-less ``ParallelMesh``."""
        if self.world_size == 1:
            return ParallelMesh(self, None)
        from torch.distributed.device_mesh import init_device_mesh

        shape = tuple(self.size(axis) for axis in MESH_AXES)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=tuple(axis.value for axis in MESH_AXES))
        return ParallelMesh(self, mesh)

    def describe(self) -> str:
        shown = " × ".join(f"{name} {value}" for name, value in self.degrees().items())
        return f"world {self.world_size} = {shown}"


class ParallelMesh:
    """The plan plus its ``DeviceMesh``; per-axis group, rank and size that also work without a process group."""

    def __init__(self, plan: ParallelPlan, mesh) -> None:
        self.plan = plan
        self.mesh = mesh

    def size(self, axis: MeshAxis | str) -> int:
        return self.plan.size(axis)

    def group(self, axis: MeshAxis | str):
        """The ProcessGroup of ``axis`` (None in a world of one)."""
        if self.mesh is None:
            return None
        return self.mesh.get_group(MeshAxis(axis).value)

    def rank(self, axis: MeshAxis | str) -> int:
        """This process's coordinate along ``axis``."""
        if self.mesh is None:
            return 0
        return self.mesh.get_local_rank(MeshAxis(axis).value)

    def sequence(self, backend: str = "native", kernel: str = "sdpa"):
        """The sequence-parallel boundary object for the DiT (``LocalSequence`` when ring·ulysses is 1)."""
        from avatar.parallel.sequence import build_sequence

        ring = self.group(MeshAxis.RING) if self.size(MeshAxis.RING) > 1 else None
        ulysses = self.group(MeshAxis.ULYSSES) if self.size(MeshAxis.ULYSSES) > 1 else None
        return build_sequence(
            backend=backend,
            kernel=kernel,
            ring_group=ring,
            ulysses_group=ulysses,
            data_degree=self.size(MeshAxis.DATA),
            cfg_degree=self.size(MeshAxis.CFG),
        )


# --- CLI -------------------------------------------------------------------------------------------------------------


def model_num_heads(model: str) -> int:
    """``num_heads`` of ``configs/model/<model>.yaml`` (ModelConfig's default for hunyuan_avatar when absent)."""
    path = CONFIG_DIR / "model" / f"{model}.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        values = OmegaConf.load(path)
        return int(values.get("num_heads", ModelConfig.num_heads))
    if model == "hunyuan_avatar":
        return ModelConfig.num_heads
    known = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
    raise InputError(f"model={model!r}: no {path}; known models: {', '.join(known) or 'hunyuan_avatar'}")


def _parallel_preset(name: str) -> ParallelConfig:
    path = CONFIG_DIR / "parallel" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "parallel").glob("*.yaml"))
        raise InputError(f"parallel={name!r}: no {path}; known: {', '.join(known)}")
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(path))
    return ParallelConfig(**{key: str(value) for key, value in values.items()})


def plan_from_argv(argv: list[str]) -> ParallelPlan:
    """Parse ``world=N model=NAME [heads=H] [num_tokens=N] [parallel=PRESET] [parallel.X=V ...]``."""
    options: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise InputError(f"argument {arg!r} is not key=value (e.g. world=8 model=hunyuan_avatar)")
        options[key.strip()] = value.strip()
    parallel = _parallel_preset(options.pop("parallel")) if "parallel" in options else ParallelConfig()
    for name in ("data", "cfg", "ring", "ulysses"):
        if f"parallel.{name}" in options:
            setattr(parallel, name, options.pop(f"parallel.{name}"))
    try:
        world = int(options.pop("world", "1"))
        heads = (
            int(options.pop("heads"))
            if "heads" in options
            else model_num_heads(options.get("model", "hunyuan_avatar"))
        )
        num_tokens = int(options.pop("num_tokens")) if "num_tokens" in options else None
    except ValueError as err:
        raise InputError(f"world, heads and num_tokens must be integers ({err})") from err
    options.pop("model", None)
    if options:
        raise InputError(
            f"unknown arguments {sorted(options)}; valid: world, model, heads, num_tokens, parallel, parallel.<axis>"
        )
    return ParallelPlan.resolve(parallel, world, heads, num_tokens)


def sequence_padding_line(
    sequence_size: int, model: ModelConfig, image_size: tuple[int, int] | None = None, video_frames: int | None = None
) -> str:
    """``padding: N tokens (P %)`` of one sequence (reference frame + the latent frames of ``video_frames``, default
    the model's window, at ``image_size`` (height, width), default ``model.image_size`` square) over
    ``sequence_size`` ranks, by the model's own token-level sharding (``avatar.parallel.base.sequence_padding``)."""
    from avatar.parallel.base import sequence_padding

    height, width = image_size or (model.image_size, model.image_size)
    frames = video_frames or model.window_frames
    _, patch_h, patch_w = model.patch_size
    per_frame = (height // model.vae_spatial_ratio // patch_h) * (width // model.vae_spatial_ratio // patch_w)
    num_tokens = ((frames - 1) // model.vae_temporal_ratio + 2) * per_frame
    padding = sequence_padding(num_tokens, sequence_size)
    return (
        f"padding: {padding} tokens ({100 * padding / num_tokens:.3f} %) of {num_tokens} image tokens "
        f"({height}×{width}, {frames} frames) over {sequence_size} sequence-parallel ranks"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.plan world=8 model=hunyuan_avatar``: print the plan and why."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        from launch.config import help_text

        sys.stdout.write(
            help_text(
                "python -m launch.plan | avatar-plan",
                "Print the parallel plan (data x cfg x ring x ulysses) for a world size and model, and why each\n"
                "degree was chosen, without GPUs or a process group. Keys: world=N model=NAME heads=N "
                "num_tokens=N parallel=PRESET parallel.<axis>=N|auto.",
                [
                    "python -m launch.plan world=8 model=hunyuan_avatar",
                    "python -m launch.plan world=8 model=hunyuan_avatar parallel.data=2",
                    "python -m launch.plan world=6 heads=24 num_tokens=34",
                ],
                contract=False,
            )
        )
        return 0
    try:
        plan = plan_from_argv(argv)
    except InputError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    lines = [plan.describe(), f"heads {plan.num_heads}, sequence-parallel ranks {plan.sequence_size}"]
    lines += [f"  {reason}" for reason in plan.reasons]
    model_name = dict(arg.partition("=")[::2] for arg in argv).get("model", "hunyuan_avatar")
    from launch.config import compose

    lines.append(sequence_padding_line(plan.sequence_size, compose([f"model={model_name}"]).model))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
