"""Entry point: ``python -m launch.generate [overrides]``, ``torchrun ... -m launch.generate``, ``avatar-generate``.

One plain process needs no process group; under torchrun every rank composes the same config, runs the same
validation (``avatar.validate.validate``) and builds the same plan. Bad input ends here with a one-line error and
exit code 2, before any model is built (``launch/run.py`` has the exit codes).
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from avatar.compose import help_text, wants_help
from launch.run import prepare, prepare_jobs, run_from_config

__all__ = ["main", "prepare", "prepare_jobs", "run_from_config"]

HELP = help_text(
    "python -m launch.generate | torchrun --nproc_per_node=N -m launch.generate | avatar-generate",
    "Render one talking-avatar video from a portrait and a speech file (or a batch manifest), on one process or\n"
    "every rank of torchrun/srun. Bad input stops before any model is built, with one line and exit code 2.",
    [
        "python -m launch.generate model=tiny weights=weights/tiny image=examples/portrait.jpg "
        "audio=examples/speech_5s.wav output=outputs/demo.mp4",
        "torchrun --nproc_per_node=8 -m launch.generate weights=weights image=me.jpg audio=talk.wav "
        "'prompt=A woman, smiling, says: \"hello\"' output=talk.mp4",
        "python -m launch.generate ... prompt_file=prompt.txt sampling.motion_exp=20 seed=7",
        "python -m launch.generate ... batch=rows.csv output_dir=outputs/batch batch.on_error=skip",
        "python -m launch.generate model=tiny weights=weights/tiny image=examples/two_faces.jpg "
        "speakers=examples/two_speakers.json output=outputs/two.mp4",
    ],
)


@record
def main(argv: list[str] | None = None) -> int:
    from launch.run import main as run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        sys.stdout.write(HELP)
        return 0
    return run_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
