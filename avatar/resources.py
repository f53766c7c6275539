"""Where the shipped data files are: the Hydra config groups, the Slurm templates and the weights manifest.

In a checkout they are the repository's ``configs/``, ``launch/slurm/`` and ``weights/manifest.yaml``; an installed
wheel carries the same files as package data (``launch/_configs/``, ``launch/slurm/``, ``launch/_weights/``, see
``setup.py``). ``python -m launch.resources [configs|slurm|manifest]`` prints the paths, e.g. for
``sbatch "$(python -m launch.resources slurm)/generate.sbatch" ...`` from an installed package.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _first(*candidates: Path) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(f"package data not found (looked at {', '.join(str(p) for p in candidates)})")


def config_dir() -> Path:
    """The folder of ``config.yaml`` and the config groups."""
    return _first(_HERE / "_configs", _HERE.parent / "configs")


def slurm_dir() -> Path:
    """The folder of the sbatch templates (``generate.sbatch``, ``array.sbatch``)."""
    return _first(_HERE / "slurm")


def weights_manifest() -> Path:
    """``manifest.yaml``: the expected layout of a weights folder."""
    return _first(_HERE / "_weights" / "manifest.yaml", _HERE.parent / "weights" / "manifest.yaml")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    paths = {"configs": config_dir, "slurm": slurm_dir, "manifest": weights_manifest}
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
