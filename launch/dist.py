"""Process-group setup: the only module that reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``SLURM_*``, ``LWS_*``.

Started by ``srun`` without torchrun (``srun --ntasks-per-node=8 python -m launch.generate ...``), the ranks come from
Slurm instead: ``SLURM_PROCID``, ``SLURM_NTASKS`` (the step's task count), ``SLURM_LOCALID``, and the rendezvous is
``MASTER_ADDR``/``MASTER_PORT`` when set, else the first host of the step's node list (or
``SLURM_LAUNCH_NODE_IPADDR``) and port ``20000 + SLURM_JOB_ID % 20000``. torchrun's variables win when both exist; a
plain ``sbatch`` script (no ``srun`` step) stays one process.

In a Kubernetes LeaderWorkerSet, one process per pod without torchrun (a group of one-GPU pods), the ranks come
from LWS: ``LWS_WORKER_INDEX`` is the rank (0: the leader), ``LWS_GROUP_SIZE`` the world size, and the rendezvous
is ``LWS_LEADER_ADDRESS`` on port ``MASTER_PORT`` (default 29500). Pods with several GPUs run torchrun instead,
given the same three variables (``launch/k8s/``); torchrun's variables then win, as under Slurm.

A plain ``python -m launch.generate`` (no torchrun, ``WORLD_SIZE`` unset or 1) creates no process group at all;
every parallel helper treats "no process group" as a world of one. Under torchrun/srun the group uses NCCL for CUDA
tensors (with gloo beside it for CPU tensors such as pickled objects) or gloo alone on CPU.
"""

from __future__ import annotations

import os
from datetime import timedelta

from avatar.parallel.group import DistEnv, destroy, init_group  # noqa: F401  (destroy: the entry points' teardown)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from err


def _under_srun() -> bool:
    """Started as a task of an ``srun`` step without torchrun (no ``WORLD_SIZE``/``RANK``)."""
    env = os.environ
    return "WORLD_SIZE" not in env and "RANK" not in env and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env


def under_agent() -> bool:
    """Started by torchrun's elastic agent (which forwards a Ctrl-C to its workers: ``launch.signals``)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def _under_lws() -> bool:
    """Started as one process of a LeaderWorkerSet pod without torchrun (no ``WORLD_SIZE``/``RANK``, no srun)."""
    env = os.environ
    return (
        "WORLD_SIZE" not in env
        and "RANK" not in env
        and not _under_srun()
        and bool(env.get("LWS_LEADER_ADDRESS"))
        and "LWS_WORKER_INDEX" in env
    )


#: The rendezvous port of a LeaderWorkerSet group when ``MASTER_PORT`` is not set (torchrun's default).
LWS_PORT = 29500


def peek_rank() -> int:
    """Global rank from the environment without touching any process group (0 for a plain process)."""
    if _under_srun():
        return _env_int("SLURM_PROCID", 0)
    if _under_lws():
        return _env_int("LWS_WORKER_INDEX", 0)
    return _env_int("RANK", 0)


def _first_int(value: str | None, default: int) -> int:
    """The first count of a Slurm per-node list such as ``4(x2),3`` (``SLURM_STEP_TASKS_PER_NODE``)."""
    digits = ""
    for ch in value or "":
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else default


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: ``gpu[003-005,9]-ib,cpu1`` -> ``gpu003-ib``; ``a,b`` -> ``a``."""
    item, depth = "", 0
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        item += ch
    host, i = "", 0
    while i < len(item):
        if item[i] == "[":
            end = item.index("]", i)
            host += item[i + 1 : end].split(",")[0].split("-")[0]
            i = end + 1
        else:
            host += item[i]
            i += 1
    return host


def slurm_rendezvous() -> str | None:
    """``tcp://HOST:PORT`` for ranks started by ``srun`` without torchrun (``None`` otherwise)."""
    if not _under_srun():
        return None
    env = os.environ
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = first_host(nodelist) if nodelist else env.get("SLURM_LAUNCH_NODE_IPADDR")
    if not addr:
        raise ValueError("srun without torchrun: no MASTER_ADDR, SLURM_STEP_NODELIST or SLURM_LAUNCH_NODE_IPADDR")
    port = _env_int("MASTER_PORT", 20000 + _env_int("SLURM_JOB_ID", 9500) % 20000)
    return f"tcp://{addr}:{port}"


def lws_rendezvous() -> str | None:
    """``tcp://LEADER:PORT`` for the pods of a LeaderWorkerSet group without torchrun (``None`` otherwise)."""
    if not _under_lws():
        return None
    return f"tcp://{os.environ['LWS_LEADER_ADDRESS']}:{_env_int('MASTER_PORT', LWS_PORT)}"


def rendezvous() -> str | None:
    """The ``init_method`` of this launch: Slurm's or LeaderWorkerSet's without torchrun, else None (torchrun's
    ``env://``)."""
    return slurm_rendezvous() or lws_rendezvous()


def read_env() -> tuple[int, int, int, int]:
    """``(rank, world_size, local_rank, local_world_size)`` from the launcher's environment (defaults: one
    process)."""
    if _under_srun():
        world_size = _env_int("SLURM_STEP_NUM_TASKS", _env_int("SLURM_NTASKS", 1))
        rank = _env_int("SLURM_PROCID", 0)
        local_rank = _env_int("SLURM_LOCALID", 0)
        per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
        local_world_size = _first_int(per_node, world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"inconsistent srun environment: SLURM_PROCID={rank} SLURM_NTASKS={world_size}")
        return rank, world_size, local_rank, local_world_size
    if _under_lws():
        world_size = _env_int("LWS_GROUP_SIZE", 1)
        rank = _env_int("LWS_WORKER_INDEX", 0)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"inconsistent LeaderWorkerSet environment: LWS_WORKER_INDEX={rank} LWS_GROUP_SIZE={world_size}"
            )
        return rank, world_size, 0, 1
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1 if world_size == 1 else world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent launcher environment: RANK={rank} WORLD_SIZE={world_size}")
    return rank, world_size, local_rank, local_world_size


def init_distributed(device: str = "auto", timeout: timedelta | float | None = None) -> DistEnv:
    """Read the launcher's environment and, for a world of more than one process, initialise the default process
    group (``avatar.parallel.group.init_group``). ``timeout`` (a timedelta or seconds) bounds every collective."""
    rank, world_size, local_rank, local_world_size = read_env()
    install_memory_provider()
    return init_group(rank, world_size, local_rank, local_world_size, device, rendezvous(), timeout)


#: Free GB the device-memory provider reports on every device (``avatar/memory/device.py``): lets a CPU run (tests)
#: or a dry run see a GPU of that size in the pre-flight.
MEMORY_PROVIDER_ENV = "AVATAR_DEVICE_FREE_GB"


def install_memory_provider() -> None:
    """Set the pre-flight's device-memory provider from ``AVATAR_DEVICE_FREE_GB`` when it is set."""
    value = os.environ.get(MEMORY_PROVIDER_ENV)
    if value in (None, ""):
        return
    from avatar.memory.device import fixed_provider, set_provider

    try:
        set_provider(fixed_provider(float(value)))
    except ValueError as err:
        raise ValueError(f"environment variable {MEMORY_PROVIDER_ENV}={value!r} is not a number of GB") from err
