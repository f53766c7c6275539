"""``python -m launch.batch batch=MANIFEST output_dir=DIR`` (the same as ``launch.generate batch=``): every row
validated before any model is built, then ``avatar.pipeline.batch.run_batch`` renders the rows (see there for the
dealing over data groups, the resume state in ``DIR/.state`` and ``DIR/batch_summary.json``).
"""

from __future__ import annotations

import sys

from avatar.compose import help_text, wants_help

HELP = help_text(
    "python -m launch.batch | torchrun --nproc_per_node=N -m launch.batch",
    "Render every row of a manifest (CSV videoid,image,audio,prompt,fps or JSON Lines) into output_dir/<videoid>.mp4,\n"
    "models loaded once, rows spread over the data-parallel groups. Every row is validated before any model is\n"
    "built; a rerun skips finished rows and resumes the one in progress; output_dir/batch_summary.json accounts for\n"
    "every line of the manifest (done, skipped with reason, failed with reason). The same as launch.generate batch=.",
    [
        "python -m launch.batch model=tiny weights=weights/tiny batch=rows.csv output_dir=outputs/batch",
        "torchrun --nproc_per_node=8 -m launch.batch batch=rows.jsonl output_dir=out parallel.data=4",
        "python -m launch.batch batch=rows.csv output_dir=out batch.on_error=skip batch.shard_index=0 "
        "batch.shard_count=4",
    ],
)


def main(argv: list[str] | None = None) -> int:
    from launch.run import main as run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        sys.stdout.write(HELP)
        return 0
    return run_main(argv, require_batch=True)


if __name__ == "__main__":
    raise SystemExit(main())
