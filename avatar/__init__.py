"""avatar-launcher's library: models, attention, parallel, pipeline, weights, io (see avatar/README.md).
``from avatar import AvatarPipeline`` is the Python API (``avatar/api.py``)."""

from avatar.version import __version__  # noqa: F401  (the package's version attribute)


def __getattr__(name: str):
    if name in ("AvatarPipeline", "AvatarResult"):
        from avatar import api

        return getattr(api, name)
    raise AttributeError(f"module 'avatar' has no attribute {name!r}")
