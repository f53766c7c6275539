"""Config composition: dataclass schemas in Hydra's ConfigStore, YAML groups under ``configs/``, CLI overrides.

Every rank calls ``compose(argv)`` with the same argv and gets the identical ``RunConfig``; nothing here depends on the
clock or the rank, so there is one output directory per run. ``python -m launch.config [overrides]`` (or
``make print-config ARGS=...``) prints the resolved config.

Three command-line keys name both a config group and a path: ``output=PATH.mp4``, ``audio=PATH`` and
``batch=PATH``. When the value is not an option of that group it is rewritten to ``output.path=``, ``audio.path=``
and ``batch.manifest=``, so the documented contract and the group selection both work.
"""

from __future__ import annotations

import sys

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from avatar.config import RunConfig
from avatar.io.errors import InputError
from launch.resources import config_dir

CONFIG_DIR = config_dir()

#: key -> field that receives a path-like value of that key.
PATH_KEYS = {"output": "path", "audio": "path", "batch": "manifest"}

#: fields that take one of a fixed set of values.
CHOICES = {
    "long.strategy": ("auto", "shift", "blend", "segments"),
    "sampling.fidelity": ("official", "fp32"),
    "attention.backend": ("native", "xfuser"),
    "attention.kernel": ("sdpa", "flash"),
    "batch.on_error": ("stop", "skip"),
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("auto", "bf16", "fp16", "fp32"),
    "load_key": ("module", "ema"),
    "model.face_detector": ("official", "opencv"),
}

_registered = False


def register_configs() -> None:
    """Register the schema once per process."""
    global _registered
    if _registered:
        return
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    _registered = True


def group_options(group: str) -> list[str]:
    """Option names of a config group (the YAML files in ``configs/<group>/``)."""
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def rewrite_overrides(argv: list[str]) -> list[str]:
    """Map ``output=X.mp4`` / ``audio=X`` / ``batch=X`` to their path fields when X is not a group option."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in PATH_KEYS and value not in group_options(key):
            arg = f"{key}.{PATH_KEYS[key]}={value}"
        out.append(arg)
    return out


def compose_dict(argv: list[str]):
    """Compose the config as an OmegaConf node (raises InputError with Hydra's message on a bad override)."""
    register_configs()
    overrides = rewrite_overrides(list(argv))
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            node = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise InputError(f"bad config override: {_one_line(err)}") from None
    return node


def compose(argv: list[str] | None = None) -> RunConfig:
    """Compose, convert to the typed ``RunConfig`` and check the fixed-choice fields."""
    node = compose_dict(sys.argv[1:] if argv is None else argv)
    try:
        cfg = OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise InputError(f"bad config: {_one_line(err)}") from None
    check_choices(cfg)
    return cfg


def _one_line(err: BaseException) -> str:
    """Hydra's message plus its cause (the cause holds the field and type), on one line."""
    parts = [str(err)]
    if err.__cause__ is not None and str(err.__cause__) not in parts[0]:
        parts.append(str(err.__cause__))
    return " ".join(" ".join(parts).split())


def get_field(cfg: RunConfig, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def check_choices(cfg: RunConfig) -> None:
    for dotted, valid in CHOICES.items():
        value = get_field(cfg, dotted)
        if value not in valid:
            raise InputError(f"{dotted}={value!r} is not valid; choose one of: {', '.join(valid)}")


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = compose(argv)
    except InputError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stdout.write(to_yaml(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
