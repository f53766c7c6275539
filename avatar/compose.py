"""Config composition: dataclass schemas in Hydra's ConfigStore, YAML groups under ``configs/``, CLI overrides.

Every rank calls ``compose(argv)`` with the same argv and gets the identical ``RunConfig``; nothing here depends on the
clock or the rank, so there is one output directory per run. ``python -m launch.config [overrides]`` (the entry point in ``launch/config.py``) (or
``make print-config ARGS=...``) prints the resolved config.

Three command-line keys name both a config group and a path: ``output=PATH.mp4``, ``audio=PATH`` and
``batch=PATH``. When the value is not an option of that group it is rewritten to ``output.path=``, ``audio.path=``
and ``batch.manifest=``, so the documented contract and the group selection both work.

Text and path values (``LITERAL_KEYS``: prompt, image, audio, output, batch, output_dir, weights, prompt_file, the
negative prompt and prefix, speakers) are taken literally, everything after the first ``=``: commas, quotes, apostrophes,
``:``, newlines, non-ASCII and ``${...}`` are kept as typed and never parsed or interpolated by Hydra. The other keys
go through Hydra's override grammar; a key that is not in the schema is refused with the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from avatar.config import FPS, RunConfig, plain
from avatar.io.errors import InputError
from avatar.resources import config_dir

CONFIG_DIR = config_dir()

#: key -> field that receives a path-like value of that key.
PATH_KEYS = {"output": "path", "audio": "path", "batch": "manifest"}

#: fields whose command-line value is taken literally (after the path-key rewrite).
LITERAL_KEYS = (
    "prompt",
    "prompt_file",
    "image",
    "speakers",
    "weights",
    "output_dir",
    "audio.path",
    "output.path",
    "batch.manifest",
    "sampling.negative_prompt",
    "sampling.prompt_prefix",
)

#: keys that existed once, with what to use instead.
REMOVED_KEYS = {
    "audio.fps": f"the frame rate is not a setting: the model renders, and the mp4 plays, at {FPS} fps",
    "output.fps": f"the frame rate is not a setting: the model renders, and the mp4 plays, at {FPS} fps",
    "model.motion_exp": "the motion buckets are sampling settings now: use sampling.motion_exp",
    "model.motion_pose": "the motion buckets are sampling settings now: use sampling.motion_pose",
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


def _schema_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = prefix + f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys.append(dotted)
            keys += _schema_keys(hint, dotted + ".")
        else:
            keys.append(dotted)
    return keys


def schema_keys() -> list[str]:
    """Every dotted key of ``RunConfig`` (and the config groups)."""
    return _schema_keys(RunConfig) + ["long", "batch"]


def check_key(key: str) -> None:
    """Refuse a key that is not in the schema, suggesting the closest ones."""
    bare = key.lstrip("+~")
    if bare.startswith("hydra") or not bare:
        return
    if bare in REMOVED_KEYS:
        raise InputError(f"{bare} is not a setting any more: {REMOVED_KEYS[bare]}")
    known = schema_keys()
    if bare in known:
        return
    close = difflib.get_close_matches(bare, known, n=2, cutoff=0.6)
    if not close:  # a typo in the last part only: compare within the same group
        group, _, leaf = bare.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == group]
        close = [f"{group}.{m}" if group else m for m in difflib.get_close_matches(leaf, siblings, n=3, cutoff=0.5)]
    hint = f"; did you mean {' or '.join(close)}?" if close else "; `python -m launch.config --help` lists the keys"
    raise InputError(f"unknown key {bare!r}{hint}")


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """``(hydra_overrides, literals)``: path shorthands rewritten, literal keys pulled out (value as typed), every
    other key checked against the schema."""
    overrides, literals = [], {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key.lstrip("+~"):
            raise InputError(f"argument {arg!r} is not key=value (e.g. image=portrait.jpg); see --help")
        if key in PATH_KEYS and value not in group_options(key):
            key = f"{key}.{PATH_KEYS[key]}"
        if key in LITERAL_KEYS:
            literals[key] = value
            continue
        if key not in PATH_KEYS and key not in group_options_all():
            check_key(key)
        overrides.append(f"{key}={value}")
    return overrides, literals


def group_options_all() -> list[str]:
    """The config group names (``model``, ``sampling``, ...)."""
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra")


def compose_dict(argv: list[str]):
    """Compose the config as an OmegaConf node from Hydra-grammar overrides (raises InputError with Hydra's message
    on a bad override)."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            node = hydra_compose(config_name="config", overrides=list(argv))
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        # ValueError: Hydra's own refusal of a group override that is not a name (``model=5``, ``sampling=1.5``)
        raise InputError(f"bad config override: {_one_line(err)}") from None
    return node


def _set_field(cfg, dotted: str, value: str) -> None:
    *parents, last = dotted.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    setattr(node, last, value)


def read_prompt_file(path: str) -> str:
    """The prompt in a UTF-8 text file (trailing newlines dropped)."""
    from avatar.io.paths import check_input_file

    check_input_file(path, "prompt_file", "a UTF-8 text file holding the prompt")
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"prompt_file={path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    text = text.rstrip("\r\n")
    if not text.strip():
        raise InputError(f"prompt_file={path}: the file is empty; write the prompt in it or give prompt=TEXT")
    return text


def compose(argv: list[str] | None = None) -> RunConfig:
    """Compose the typed ``RunConfig`` (choices are Enum fields: a bad value names the valid ones); literal keys
    are set as typed; ``prompt_file`` is read into ``prompt``."""
    overrides, literals = split_overrides(list(sys.argv[1:] if argv is None else argv))
    node = compose_dict(overrides)
    try:
        cfg = OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise InputError(f"bad config: {_one_line(err)}") from None
    for dotted, value in literals.items():
        _set_field(cfg, dotted, value)
    if cfg.prompt_file:
        if "prompt" in literals:
            raise InputError("give prompt=TEXT or prompt_file=PATH, not both")
        cfg.prompt = read_prompt_file(cfg.prompt_file)
    return cfg


def _one_line(err: BaseException) -> str:
    """Hydra's message plus its cause (the cause holds the field and type), on one line."""
    parts = [str(err)]
    if err.__cause__ is not None and str(err.__cause__) not in parts[0]:
        parts.append(str(err.__cause__))
    return " ".join(" ".join(parts).split())


def to_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(plain(cfg), sort_keys=False, allow_unicode=True, width=119)


CONTRACT = """\
Command-line contract (key=value, no dashes; text and path values are taken literally, quote them for the shell only):
  image=PATH              portrait (PNG/JPEG/WebP)
  audio=PATH              speech (wav, flac, mp3, m4a; any rate)
  prompt=TEXT             scene description, kept exactly as typed (commas, quotes, ${...}, non-ASCII)
  prompt_file=PATH        or read the prompt from a UTF-8 file
  output=PATH.mp4         the video (never replaces an existing file unless overwrite=true)
  model=tiny|hunyuan_avatar   weights=DIR   seed=INT (0..2**63-2)   sampling.steps=INT
  batch=MANIFEST.csv|.jsonl output_dir=DIR   one video per manifest row
  sampling.motion_exp=30 sampling.motion_pose=25   motion buckets (lower: calmer face / head)
  any other field as group.key=value (full reference: docs/config.md)
"""


def help_text(prog: str, summary: str, examples: list[str], contract: bool = True) -> str:
    """``--help`` of an entry point: what it does, the command-line contract, the config groups and examples."""
    groups = "\n".join(f"  {g}: {', '.join(group_options(g))}" for g in group_options_all())
    lines = [f"usage: {prog} [key=value ...]", "", summary.strip(), ""]
    if contract:
        lines += [CONTRACT, "Config groups (group=option):", groups, ""]
    lines += ["Examples:"] + [f"  {e}" for e in examples] + [""]
    return "\n".join(lines)


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help", "help") for a in argv)
