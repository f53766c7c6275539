"""avatar-launcher's library. ``from avatar import AvatarPipeline`` is the Python API (``avatar/api.py``)."""


def __getattr__(name: str):
    if name in ("AvatarPipeline", "AvatarResult"):
        from avatar import api

        return getattr(api, name)
    raise AttributeError(f"module 'avatar' has no attribute {name!r}")
