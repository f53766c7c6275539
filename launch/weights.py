"""Weights tools: python -m launch.weights COMMAND ... (also installed as ``avatar-weights``).

avatar-weights download DIR [--variant bf16|fp8] [--components dit,vae,llava,clip,whisper,face_detector]
    the official checkpoint from Hugging Face (tencent/HunyuanVideo-Avatar), only the files our layout reads;
    resumable (run it again after an interruption). DIR must not be the repository's tracked weights/ folder.
avatar-weights make-tiny DIR [seed=N]
    deterministic random weights for model=tiny, in the official layout
avatar-weights verify DIR [model=NAME] [fp8=true]
    check a folder the way loading will; every problem listed, one line each; exit 1 if any

Examples:
    avatar-weights download weights/hunyuan_avatar
    avatar-weights verify weights/hunyuan_avatar
    avatar-weights make-tiny weights/tiny && avatar-weights verify weights/tiny model=tiny
"""

from __future__ import annotations

import sys

from avatar.compose import compose
from avatar.io.errors import EXIT_BAD_INPUT, InputError
from launch.log import setup_logging

USAGE = __doc__


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    setup_logging(0)
    if any(a in ("-h", "--help", "help") for a in args[:1]) or (args[:1] and "--help" in args):
        sys.stdout.write(USAGE)
        return 0
    if len(args) < 2 or args[0] not in ("download", "make-tiny", "verify"):
        sys.stderr.write(USAGE)
        return EXIT_BAD_INPUT
    command, folder, overrides = args[0], args[1], args[2:]
    if command == "download":
        return _download(folder, overrides)
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


def _download(folder: str, options: list[str]) -> int:
    import argparse

    from avatar.weights.download import COMPONENTS, VARIANTS, download, parse_components

    parser = argparse.ArgumentParser(prog="avatar-weights download", add_help=False)
    parser.add_argument("--variant", default="bf16", choices=VARIANTS)
    parser.add_argument("--components", default=",".join(COMPONENTS))
    parser.add_argument("--revision", default=None)
    known, unknown = parser.parse_known_args(options)
    try:
        if unknown:
            raise InputError(f"download: unknown option(s) {' '.join(unknown)}; see avatar-weights --help")
        target = download(folder, known.variant, parse_components(known.components), revision=known.revision)
    except InputError as err:
        sys.stderr.write(f"error: {err}\n")
        return EXIT_BAD_INPUT
    except Exception as err:  # network, authentication, disk: one line, the same command resumes
        sys.stderr.write(
            f"error: download into {folder} failed ({type(err).__name__}: {err}); run the same command again to resume\n"
        )
        return 1
    sys.stdout.write(f"downloaded into {target}; check it: avatar-weights verify {target}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
