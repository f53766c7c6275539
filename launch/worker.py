"""A worker group only: ``torchrun --nproc_per_node=N -m launch.worker model=... weights=... serve.store=...``.

The same as ``launch.serve serve.role=worker``: every rank loads the models, rank 0 claims jobs from the shared store
under a lease and the group renders them one at a time (``avatar/serve/worker.py``); no HTTP. Start any number of
groups (a Slurm array: ``launch/slurm/worker.sbatch``; Kubernetes: ``launch/k8s/``) against one ``serve.store`` and
``serve.data_dir``, beside any number of ``launch.serve serve.role=api`` front ends.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from avatar.compose import wants_help
    from launch.serve import main as serve_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return serve_main(argv if wants_help(argv) else [*argv, "serve.role=worker"])


if __name__ == "__main__":
    raise SystemExit(main())
