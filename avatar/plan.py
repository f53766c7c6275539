"""The parallel plan: how the world is split into data × cfg × ring × ulysses, and the device mesh.

Mesh layout: row-major over (data, cfg, ring, ulysses), so ulysses is innermost: the ranks of one Ulysses group are
consecutive global ranks, and under torchrun (which numbers the ranks of a node consecutively) consecutive local
ranks of one node whenever ulysses divides the GPUs per node. Then ring, then cfg, then data are further out, so with
several nodes CFG and data parallelism are what crosses the network (one exchange per step or none), while the
per-layer all-to-alls of Ulysses stay on the node's NVLink.

The ``auto`` rule (each degree of ``ParallelConfig`` is an integer string or ``auto``; ``gpus_per_node`` comes from
torchrun's ``LOCAL_WORLD_SIZE`` via ``launch.dist``; unknown means one node; ``num_tokens``, when known, is the
count of image tokens one sequence shards, and a sequence-parallel degree of n pads it to a multiple of n):

0. The explicit degrees are taken as given; their product must divide the world. ``free`` = world / that product.
1. ``cfg``: 2 when ``free`` is even (the two guidance branches run side by side), else 1. ``free`` /= cfg.
2. ``ulysses``: the largest divisor of the head count that also divides ``free`` and the GPUs per node (a Ulysses
   group never spans nodes) and, with ``num_tokens`` known, pads the sequence by at most 10 %. ``free`` /= ulysses.
3. ``ring``: with ``data`` explicit, all of ``free`` (sequence parallelism gets world / (data·cfg); with several
   nodes the ring is what crosses them). With ``data`` auto, the largest divisor of ``free`` that keeps the
   sequence group (ring·ulysses) inside one node and, with ``num_tokens`` known, pads by at most 10 %. ``free`` /=
   ring.
4. ``data``: what remains.

Examples for 24 heads: world 8 → cfg 2 × ulysses 4; world 6 → cfg 2 × ulysses 3; world 5 → ring 5; with
``data=2`` and world 8 → data 2 × cfg 2 × ulysses 2; world 48 on 8-GPU nodes → data 3 × cfg 2 × ulysses 8 (each
Ulysses group is one node; ulysses 24 would make every attention all-to-all cross three nodes). The plan is valid
when every degree is ≥ 1, cfg ∈ {1, 2}, the head count is divisible by ulysses, the product equals the world size
and the GPUs per node divide the world (torchrun starts as many on every node). Explicit degrees that put a Ulysses
group across nodes are allowed (an interconnect may be fast enough) with a warning line in ``ParallelPlan.warnings``
that the launcher logs and ``launch.plan`` prints.

``python -m launch.plan world=48 gpus_per_node=8 model=hunyuan_avatar [parallel=sp] [parallel.ulysses=2]
[num_tokens=34]`` prints the plan, why each degree was chosen and where each axis lies (inside a node or across
nodes), without GPUs and without a process group.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from avatar.config import AttentionConfig, ModelConfig, ParallelConfig, RunConfig
from avatar.io.errors import InputError
from avatar.resources import config_dir

if TYPE_CHECKING:
    from avatar.pipeline.topology import Topology

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


def check_gpus_per_node(gpus_per_node: int | None, world_size: int) -> None:
    """``gpus_per_node`` is None or a positive count that divides the world (or exceeds it: one partial node)."""
    if gpus_per_node is None:
        return
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise InputError(f"gpus_per_node={gpus_per_node!r} is invalid; give the ranks per node (a positive integer)")
    if gpus_per_node < world_size and world_size % gpus_per_node:
        raise InputError(
            f"gpus_per_node={gpus_per_node} does not divide the world size {world_size}; torchrun starts the same "
            "number of ranks on every node (--nproc_per_node)"
        )


#: The most padding an automatic sequence-parallel degree may add to a known token count (10 %).
MAX_PADDING = 0.10


def sequence_padding(num_tokens: int, ways: int) -> int:
    """Padding tokens when ``num_tokens`` are split into ``ways`` equal shards (``ceil(T / n)·n − T``)."""
    return -(-num_tokens // ways) * ways - num_tokens


def pads_at_most(num_tokens: int | None, ways: int, limit: float = MAX_PADDING) -> bool:
    """True when ``ways`` sequence shards pad ``num_tokens`` by at most ``limit`` (always true when unknown)."""
    return num_tokens is None or sequence_padding(num_tokens, ways) <= limit * num_tokens


def _fits_node(size: int, gpus_per_node: int | None) -> bool:
    """A block of ``size`` consecutive ranks (aligned at multiples of ``size``) stays inside one node."""
    return gpus_per_node is None or gpus_per_node % size == 0


def _largest(limit: int, ok) -> int:
    """The largest divisor ``d`` of ``limit`` with ``ok(d)`` (1 always qualifies)."""
    return max(d for d in range(1, limit + 1) if limit % d == 0 and (d == 1 or ok(d)))


def _pick_ulysses(free: int, num_heads: int, gpus_per_node: int | None, num_tokens: int | None) -> tuple[int, str]:
    """Rule 2: the automatic Ulysses degree and its reason."""
    degree = _largest(
        free, lambda d: num_heads % d == 0 and _fits_node(d, gpus_per_node) and pads_at_most(num_tokens, d)
    )
    why = f"auto, the largest divisor of {num_heads} heads that divides the {free} ranks left"
    if gpus_per_node is not None:
        why += f" and the {gpus_per_node} GPUs of a node (its all-to-alls stay on the node's links)"
    if num_tokens is not None:
        why += f" and pads the {num_tokens} tokens by ≤ {MAX_PADDING:.0%}"
    return degree, why


def _pick_ring(
    free: int, ulysses: int, data_given: bool, gpus_per_node: int | None, num_tokens: int | None
) -> tuple[int, str]:
    """Rule 3: the automatic Ring degree and its reason."""
    if data_given:
        return free, "auto, the rest of the sequence-parallel share (data is given)"
    if not _fits_node(ulysses, gpus_per_node):
        return 1, f"auto, ulysses={ulysses} already spans nodes of {gpus_per_node}; the rest goes to data"
    degree = _largest(free, lambda d: _fits_node(ulysses * d, gpus_per_node) and pads_at_most(num_tokens, ulysses * d))
    limits = []
    if gpus_per_node is not None:
        limits.append(f"keeps ring·ulysses inside a node of {gpus_per_node}")
    if num_tokens is not None:
        limits.append(f"pads the {num_tokens} tokens by ≤ {MAX_PADDING:.0%}")
    if not limits:
        return degree, "auto, the rest of the sequence-parallel share"
    return degree, f"auto, the largest divisor of the {free} ranks left that " + " and ".join(limits)


def _node_warnings(ulysses: int, given: bool, world_size: int, gpus_per_node: int | None) -> tuple[str, ...]:
    """A line when an explicit Ulysses degree puts a group across nodes (automatic degrees never do)."""
    if not given or gpus_per_node is None or gpus_per_node >= world_size or gpus_per_node % ulysses == 0:
        return ()
    inside = max(d for d in range(1, gpus_per_node + 1) if gpus_per_node % d == 0 and ulysses % d == 0)
    return (
        f"parallel.ulysses={ulysses} puts Ulysses groups across nodes of {gpus_per_node} GPUs: every attention "
        f"all-to-all crosses the network; a degree dividing {gpus_per_node} (e.g. parallel.ulysses={inside}, the "
        "rest as ring) keeps them inside a node",
    )


@dataclass(frozen=True)
class ParallelPlan:
    """Degrees of the four mesh axes; their product is the world size."""

    data: int = 1
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    world_size: int = 1
    num_heads: int | None = None
    gpus_per_node: int | None = None
    """Ranks per node (torchrun's ``LOCAL_WORLD_SIZE``); None: unknown, taken as one node."""
    reasons: tuple[str, ...] = field(default=(), compare=False)
    """One line per degree saying which rule chose it (for the CLI and the log)."""
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """Lines the launcher logs as warnings (explicit degrees that put a Ulysses group across nodes)."""

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
        check_gpus_per_node(self.gpus_per_node, self.world_size)

    def degrees(self) -> dict[str, int]:
        return {"data": self.data, "cfg": self.cfg, "ring": self.ring, "ulysses": self.ulysses}

    @property
    def sequence_size(self) -> int:
        """Ranks sharing one sequence (ring × ulysses)."""
        return self.ring * self.ulysses

    def size(self, axis: MeshAxis | str) -> int:
        return self.degrees()[MeshAxis(axis).value]

    def axis_groups(self, axis: MeshAxis | str) -> list[list[int]]:
        """The global ranks of every group along ``axis``, in the mesh's row-major layout over ``MESH_AXES`` (the
        layout ``init_device_mesh`` gives ``build_mesh``'s mesh)."""
        index = MESH_AXES.index(MeshAxis(axis))
        sizes = [self.size(a) for a in MESH_AXES]
        stride = math.prod(sizes[index + 1 :])
        block = stride * sizes[index]
        return [
            [start + offset + k * stride for k in range(sizes[index])]
            for start in range(0, self.world_size, block)
            for offset in range(stride)
        ]

    def placement(self, axis: MeshAxis | str) -> str:
        """``inside a node`` or ``across nodes`` for the groups of ``axis`` (``-`` when its degree is 1)."""
        if self.size(axis) == 1:
            return "-"
        per_node = self.gpus_per_node or self.world_size
        groups = self.axis_groups(axis)
        inside = all(len({rank // per_node for rank in group}) == 1 for group in groups)
        return "inside a node" if inside else "across nodes"

    @classmethod
    def resolve(
        cls,
        parallel_cfg: ParallelConfig,
        world_size: int,
        num_heads: int,
        num_tokens: int | None = None,
        gpus_per_node: int | None = None,
    ) -> ParallelPlan:
        """Apply the ``auto`` rule of the module docstring. ``num_tokens``: optional count of image tokens one
        sequence shards (automatic sequence parallelism pads it by at most 10 %); ``gpus_per_node``: ranks per node
        (torchrun's ``LOCAL_WORLD_SIZE``), None = one node."""
        given = {name: _parse_degree(name, getattr(parallel_cfg, name)) for name in ("data", "cfg", "ring", "ulysses")}
        shown = {name: ("auto" if value is None else value) for name, value in given.items()}
        if world_size < 1:
            raise InputError(f"invalid {_describe(shown, world_size, num_heads)}: the world size must be ≥ 1")
        if any(value is not None and value < 1 for value in given.values()):
            raise InputError(f"invalid {_describe(shown, world_size, num_heads)}: every degree must be ≥ 1")
        if num_tokens is not None and num_tokens < 1:
            raise InputError(f"num_tokens={num_tokens} is invalid; give the image token count (≥ 1) or leave it out")
        check_gpus_per_node(gpus_per_node, world_size)
        node = None if gpus_per_node is None or gpus_per_node >= world_size else gpus_per_node
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

        if given["ulysses"] is None:
            degrees["ulysses"], why = _pick_ulysses(free, num_heads, node, num_tokens)
            reasons.append(f"ulysses={degrees['ulysses']}: {why}")
            free //= degrees["ulysses"]
        else:
            reasons.append(f"ulysses={degrees['ulysses']}: given")

        if given["ring"] is None:
            degrees["ring"], why = _pick_ring(free, degrees["ulysses"], given["data"] is not None, node, num_tokens)
            reasons.append(f"ring={degrees['ring']}: {why}")
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
        warnings = _node_warnings(degrees["ulysses"], given["ulysses"] is not None, world_size, gpus_per_node)
        return cls(
            world_size=world_size,
            num_heads=num_heads,
            gpus_per_node=gpus_per_node,
            reasons=tuple(reasons),
            warnings=warnings,
            **degrees,
        )

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


#: Name of the flattened (cfg, ring, ulysses) axis: the ranks rendering one video (a batch row's group).
VIDEO_AXIS = "video"


def resolve_plan(cfg: RunConfig, world_size: int, gpus_per_node: int | None = None) -> ParallelPlan:
    """The plan of a run for ``world_size`` ranks, ``gpus_per_node`` per node (raises InputError naming the
    degrees, world and heads)."""
    return ParallelPlan.resolve(cfg.parallel, world_size, cfg.model.num_heads, gpus_per_node=gpus_per_node)


class ParallelMesh:
    """The plan plus its ``DeviceMesh``; per-axis group, rank and size that also work without a process group.
    Every process group of a run comes from this mesh: the four axes, and the flattened ``video`` axis (the ranks
    of one data group) for batch rows."""

    def __init__(self, plan: ParallelPlan, mesh) -> None:
        self.plan = plan
        self.mesh = mesh
        self._video = None

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
        from avatar.parallel.backends import build_sequence

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

    def video_mesh(self):
        """The 1-D mesh of the ranks rendering one video with this one (cfg × ring × ulysses flattened, named
        ``video``; the root mesh then also answers ``mesh["video"]``); None in a world of one. Built on first use
        (a collective: call it on every rank)."""
        if self.mesh is None:
            return None
        if self._video is None:
            try:  # flattened already (by another holder of the same mesh)
                self._video = self.mesh[VIDEO_AXIS]
            except KeyError:
                self._video = self.mesh[tuple(axis.value for axis in MESH_AXES[1:])]._flatten(VIDEO_AXIS)
        return self._video

    def topologies(self, rank: int, device, attention: AttentionConfig | None = None) -> tuple[Topology, Topology]:
        """``(job, rows)``: the pipeline's view of this mesh for one video rendered by the whole world (windows
        spread over the data groups), and for batch rows (each data group renders its own rows; ``rank``/``world``
        within the group, whose process group is ``video_mesh()``'s). Logs the plan on rank 0. Call on every
        rank (the sequence backend and the row groups are collectives)."""
        from avatar.pipeline.topology import Topology

        attention = attention or AttentionConfig()
        plan = self.plan
        if rank == 0:
            logger.info("parallel plan: %s (%s)", plan.describe(), "; ".join(plan.reasons))
            for line in plan.warnings:
                logger.warning("parallel plan: %s", line)
        job = Topology(
            rank=rank,
            world=plan.world_size,
            data_rank=self.rank(MeshAxis.DATA),
            data_size=plan.data,
            data_group=self.group(MeshAxis.DATA),
            cfg_rank=self.rank(MeshAxis.CFG),
            cfg_size=plan.cfg,
            cfg_group=self.group(MeshAxis.CFG),
            seq=self.sequence(backend=str(attention.backend), kernel=str(attention.kernel)),
            device=device,
            mesh=self.mesh,
        )
        if plan.data == 1:
            return job, job
        video = self.video_mesh()
        job.window_group = video.get_group()  # the ranks of one data group (one window's CFG and sequence ranks)
        rows = replace(
            job,
            rank=video.get_local_rank(),
            world=video.size(),
            data_rank=0,
            data_size=1,
            data_group=None,
            group=video.get_group(),
            leader=int(video.mesh.flatten()[0]),
        )
        return job, rows


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
    """Parse ``world=N model=NAME [gpus_per_node=G] [heads=H] [num_tokens=N] [parallel=PRESET]
    [parallel.X=V ...]``."""
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
        gpus_per_node = int(options.pop("gpus_per_node")) if "gpus_per_node" in options else None
    except ValueError as err:
        raise InputError(f"world, gpus_per_node, heads and num_tokens must be integers ({err})") from err
    options.pop("model", None)
    if options:
        raise InputError(
            f"unknown arguments {sorted(options)}; valid: world, gpus_per_node, model, heads, num_tokens, parallel, "
            "parallel.<axis>"
        )
    return ParallelPlan.resolve(parallel, world, heads, num_tokens, gpus_per_node=gpus_per_node)


def placement_lines(plan: ParallelPlan) -> list[str]:
    """Where the plan's groups lie: the node count and, per axis of degree > 1, inside a node or across nodes."""
    per_node = plan.gpus_per_node or plan.world_size
    nodes = max(1, plan.world_size // per_node)
    given = "" if plan.gpus_per_node else " (gpus_per_node not given: one node)"
    lines = [f"nodes {nodes} × {min(per_node, plan.world_size)} ranks{given}"]
    why = {
        MeshAxis.ULYSSES: "an all-to-all in every attention layer",
        MeshAxis.RING: "k/v blocks passed on in every attention layer",
        MeshAxis.CFG: "one exchange of the two branches per step",
        MeshAxis.DATA: "window results and cache exchanged, no per-layer traffic",
    }
    for axis in reversed(MESH_AXES):
        if plan.size(axis) > 1:
            lines.append(f"  {axis.value} groups of {plan.size(axis)}: {plan.placement(axis)} ({why[axis]})")
    return lines


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
        f"({width}x{height}, {frames} frames) over {sequence_size} sequence-parallel ranks"
    )


# --- CLI: the memory plan (``gpu_memory=GB image_size=PX seconds=S [size=WxH] [speakers=N] [memory=MODE]``) ---------

#: The memory keys of ``python -m launch.plan``; the others are the parallel plan's.
MEMORY_KEYS = ("gpu_memory", "image_size", "seconds", "size", "speakers", "memory", "fp8", "token_chunk")


def split_memory_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` without the memory keys, and those keys' values."""
    rest, memory = [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.strip() in MEMORY_KEYS:
            memory[key.strip()] = value.strip()
        else:
            rest.append(arg)
    return rest, memory


def memory_lines(plan: ParallelPlan, argv: list[str], options: dict[str, str]) -> list[str]:
    """The ``memory:`` and ``peak per rank:`` lines for ``plan``; raises InputError (exit 2) when no mode fits."""
    from dataclasses import replace

    from avatar.config import MemoryConfig, MemoryMode
    from avatar.memory import estimate as memory_plan
    from avatar.memory.measure import MeasureCache, default_cache_dir

    model_name = next((a.partition("=")[2].strip() for a in argv if a.partition("=")[0].strip() == "model"), None)
    model = _model_config(model_name or "hunyuan_avatar")
    try:
        if "image_size" in options:
            model = replace(model, image_size=int(options["image_size"]))
        seconds = float(options.get("seconds", model.window_frames / 25))
        gpu_bytes = int(float(options["gpu_memory"]) * 10**9) if "gpu_memory" in options else None
        size = None
        if "size" in options:
            width, _, height = options["size"].lower().partition("x")
            size = (int(width), int(height))
        token_chunk = int(options.get("token_chunk", MemoryConfig.token_chunk))
        speakers = int(options.get("speakers", 1))
    except ValueError as err:
        raise InputError(
            f"gpu_memory and seconds must be numbers, image_size, token_chunk and speakers integers, size WxH ({err})"
        ) from err
    if seconds <= 0 or (gpu_bytes is not None and gpu_bytes <= 0) or model.image_size <= 0 or speakers < 1:
        raise InputError("gpu_memory, image_size, seconds and speakers must be positive")
    mode = options.get("memory", "auto")
    try:
        memory = MemoryConfig(mode=MemoryMode(mode), token_chunk=token_chunk)
    except ValueError as err:
        valid = ", ".join(m.value for m in MemoryMode)
        raise InputError(f"memory={mode!r} is not valid: use one of {valid}") from err
    fp8 = options.get("fp8", "false").lower() in ("1", "true", "yes")
    heads = plan.num_heads or model.num_heads

    def widen(world: int) -> ParallelPlan:
        return ParallelPlan.resolve(ParallelConfig(), world, heads)

    geometry = replace(memory_plan.planning_geometry(model, seconds, size), speakers=speakers)
    chosen = memory_plan.resolve(
        memory, plan, model, geometry, gpu_bytes, widen=widen, fp8=fp8, cache=MeasureCache(default_cache_dir())
    )
    padding = sequence_padding_line(plan.sequence_size, model, (geometry.height, geometry.width))
    return [f"video {geometry.describe()}", padding, *chosen.lines()]


def _model_config(name: str) -> ModelConfig:
    """``configs/model/<name>.yaml`` over ModelConfig's defaults."""
    path = CONFIG_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        model_num_heads(name)  # the "known models" error
        return ModelConfig(name=name)
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(path))
    return ModelConfig(**values)
