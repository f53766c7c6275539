"""Hydra ``@hydra.main`` entry for Hydra launchers, e.g. one Slurm job per sweep point with submitit:

    python -m launch.submit -m hydra/launcher=submitit_slurm hydra.launcher.partition=gpu \\
        hydra.launcher.gpus_per_node=1 hydra.launcher.timeout_min=120 \\
        model=tiny weights=weights/tiny image=examples/portrait.jpg audio.path=examples/speech_5s.wav \\
        'output.path=outputs/s_${seed}.mp4' seed=1,2,3

Each job is one process that runs the same ``run_from_config`` as ``launch.generate``. Plain Hydra parses the
command line here, so the path shorthands of ``launch.generate`` are spelled out: ``output.path=``, ``audio.path=``,
``batch.manifest=``. A sweep needs one output per job: ``output.path=out_${seed}.mp4`` (resolved per job). Our log
lines also go to each job's Hydra log file. For several GPUs per video use ``launch/slurm/generate.sbatch`` (torchrun) instead.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from avatar.compose import help_text, register_configs, wants_help
from avatar.io.errors import EXIT_BAD_INPUT, InputError
from avatar.resources import config_dir

log = logging.getLogger("launch.submit")

register_configs()


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def main(node: DictConfig) -> int:
    from launch.run import prepare_jobs, run_from_config

    try:
        cfg = OmegaConf.to_object(node)
        jobs = prepare_jobs(cfg)
    except InputError as err:
        log.error("error: %s", err)
        raise SystemExit(EXIT_BAD_INPUT) from None
    code = run_from_config(cfg, jobs)
    if code:
        raise SystemExit(code)
    return code


HELP = help_text(
    "python -m launch.submit [-m] [hydra/launcher=...] [key=value ...]",
    "Hydra's own entry (@hydra.main) for Hydra launchers and sweeps, e.g. one Slurm job per seed with submitit.\n"
    "Plain Hydra parses this command line: spell out output.path=, audio.path=, batch.manifest=, and quote values\n"
    "with commas for Hydra (prompt='\"A, B\"'); launch.generate takes them literally instead.",
    [
        "python -m launch.submit -m hydra/launcher=avatar_slurm model=tiny weights=weights/tiny "
        "image=examples/portrait.jpg audio.path=examples/speech_5s.wav 'output.path=outputs/s${seed}.mp4' seed=1,2,3",
    ],
)


if __name__ == "__main__":
    import sys

    if wants_help(sys.argv[1:]):
        sys.stdout.write(HELP)
        raise SystemExit(0)
    main()
