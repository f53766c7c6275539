"""avatar-launcher's library: models, attention, parallel, pipeline, weights, io (see avatar/README.md).
``from avatar import AvatarPipeline`` is the Python API (``avatar/api.py``)."""

#: The launcher's version (setup.py reads it from here; the run report records it).
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("AvatarPipeline", "AvatarResult"):
        from avatar import api

        return getattr(api, name)
    raise AttributeError(f"module 'avatar' has no attribute {name!r}")
