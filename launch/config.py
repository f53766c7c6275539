"""``python -m launch.config [overrides]``: print the resolved config (the composition itself is
``avatar.compose``)."""

from __future__ import annotations

import sys

from avatar.compose import compose, help_text, to_yaml, wants_help
from avatar.io.errors import InputError

HELP = help_text(
    "python -m launch.config",
    "Print the resolved config for these overrides (the same composition every entry point uses).",
    [
        "python -m launch.config model=tiny",
        "python -m launch.config model=tiny parallel=sp sampling.steps=10",
        "python -m launch.config 'prompt=A woman, smiling, says: \"it's ${HOME}\"'",
    ],
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        sys.stdout.write(HELP)
        return 0
    try:
        cfg = compose(argv)
    except InputError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    sys.stdout.write(to_yaml(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
