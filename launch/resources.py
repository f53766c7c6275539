"""``python -m launch.resources [configs|slurm|k8s|manifest]`` prints where the shipped data are, e.g. for
``sbatch "$(python -m launch.resources slurm)/generate.sbatch" ...`` from an installed package. The Slurm templates
are ``launch/slurm/``, the Kubernetes example ``launch/k8s/`` (this package's data); the config groups and the weights manifest are the library's
(``avatar/resources.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from avatar.resources import config_dir, weights_manifest

_HERE = Path(__file__).resolve().parent


def slurm_dir() -> Path:
    """The folder of the sbatch templates (``generate.sbatch``, ``array.sbatch``)."""
    path = _HERE / "slurm"
    if not path.exists():
        raise FileNotFoundError(f"package data not found (looked at {path})")
    return path


def k8s_dir() -> Path:
    """The folder of the Kubernetes example (``leaderworkerset.yaml``)."""
    path = _HERE / "k8s"
    if not path.exists():
        raise FileNotFoundError(f"package data not found (looked at {path})")
    return path


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    paths = {"configs": config_dir, "slurm": slurm_dir, "k8s": k8s_dir, "manifest": weights_manifest}
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(__doc__.strip() + "\n")
        return 0
    names = args or list(paths)
    unknown = [n for n in names if n not in paths]
    if unknown:
        sys.stderr.write(f"error: unknown resource {unknown[0]!r}; valid are {', '.join(paths)}\n")
        return 2
    for name in names:
        sys.stdout.write(f"{paths[name]()}\n" if len(names) == 1 else f"{name}\t{paths[name]()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
