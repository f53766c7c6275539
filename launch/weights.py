"""Weights tools.

python -m launch.weights make-tiny DIR [seed=N]     deterministic random weights for model=tiny, official layout
python -m launch.weights verify DIR [model=NAME] [fp8=true]   check a folder; every problem listed; exit 1 if any
"""

from __future__ import annotations

import sys

from avatar.io.errors import EXIT_BAD_INPUT, InputError
from launch.config import compose
from launch.log import setup_logging

USAGE = __doc__


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    setup_logging(0)
    if args and args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if len(args) < 2 or args[0] not in ("make-tiny", "verify"):
        sys.stderr.write(USAGE)
        return EXIT_BAD_INPUT
    command, folder, overrides = args[0], args[1], args[2:]
    seed = 0
    rest = []
    for item in overrides:
        if item.startswith("seed="):
            seed = int(item.split("=", 1)[1])
        else:
            rest.append(item)
    try:
        if command == "make-tiny":
            cfg = compose(["model=tiny", *rest])
        else:
            cfg = compose(rest)
    except InputError as err:
        sys.stderr.write(f"error: {err}\n")
        return EXIT_BAD_INPUT
    if command == "make-tiny":
        from avatar.weights.tiny import make_tiny

        make_tiny(folder, cfg.model, seed=seed)
        sys.stdout.write(f"tiny weights written to {folder}\n")
        return 0
    from avatar.weights.verify import verify_weights

    problems = verify_weights(folder, cfg.model, fp8=cfg.fp8, load_key=cfg.load_key)
    if problems:
        sys.stdout.write(f"{folder}: {len(problems)} problem(s) for model={cfg.model.name}\n")
        for line in problems:
            sys.stdout.write(f"  - {line}\n")
        return 1
    sys.stdout.write(f"{folder}: OK for model={cfg.model.name}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
