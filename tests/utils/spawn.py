"""Run a function on N gloo ranks (fresh processes, a free port) and collect each rank's return value.

``spawn(world_size, fn, *args, timeout=120)`` returns ``[result_of_rank_0, ...]``. ``fn(rank, world_size, *args)``
must be a module-level function (it is pickled into the children); its result must be picklable (tensors are fine).
Every rank gets the default process group from ``launch.dist.init_distributed`` (gloo, a bounded timeout). A rank that
raises makes ``spawn`` raise with that rank's traceback; a run past ``timeout`` seconds is killed and raises
``TimeoutError``, so nothing hangs.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp

#: Per-collective timeout inside the children: a peer that died makes the others fail instead of waiting forever.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, results, fn, args) -> None:
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
        }
    )
    import torch

    from launch.dist import destroy, init_distributed

    torch.set_num_threads(1)
    try:
        init_distributed(device="cpu", timeout=COLLECTIVE_TIMEOUT)
        # Sent as bytes: a tensor in a torch queue travels as a shared file descriptor that vanishes when this
        # rank exits, which under load can happen before the parent reads it.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        destroy()


def spawn(world_size: int, fn, *args, timeout: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results in rank order."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_worker, args=(rank, world_size, port, results, fn, args), daemon=True)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    collected: dict[int, object] = {}
    failures: dict[int, str] = {}
    try:
        while len(collected) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"spawn({world_size}, {fn.__name__}) ran past {timeout:.0f} s; ranks done: {sorted(collected)}"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [p for p in processes if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    time.sleep(0.5)  # a rank may still be flushing its result
                    if results.empty():
                        raise RuntimeError(
                            f"spawn({world_size}, {fn.__name__}): a rank exited with code {dead[0].exitcode}"
                        ) from None
                continue
            if ok:
                collected[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                failures[rank] = value
                break
        if failures:
            rank, trace = next(iter(failures.items()))
            raise RuntimeError(f"rank {rank} of {world_size} failed in {fn.__name__}:\n{trace}")
        for process in processes:
            process.join(timeout=max(1.0, deadline - time.monotonic()))
        return [collected[rank] for rank in range(world_size)]
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
