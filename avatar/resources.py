"""Where the library's shipped data are: the Hydra config groups and the weights manifest.

In a checkout they are the repository's ``configs/`` and ``weights/manifest.yaml``; an installed wheel carries the
same files as package data (``avatar/_configs/``, ``avatar/_weights/``, see ``setup.py``).
"""

from __future__ import annotations

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


def weights_manifest() -> Path:
    """``manifest.yaml``: the expected layout of a weights folder."""
    return _first(_HERE / "_weights" / "manifest.yaml", _HERE.parent / "weights" / "manifest.yaml")
