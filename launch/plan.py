"""``python -m launch.plan world=48 gpus_per_node=8 model=hunyuan_avatar [...]`` (``avatar-plan``): print the
parallel plan and, with ``gpu_memory=GB image_size=PX seconds=S``, the memory plan, without GPUs or a process group.
The planner itself is ``avatar.plan``."""

from __future__ import annotations

import sys

from avatar.compose import help_text
from avatar.io.errors import InputError
from avatar.plan import memory_lines, placement_lines, plan_from_argv, split_memory_args


def main(argv: list[str] | None = None) -> int:
    """``python -m launch.plan world=8 model=hunyuan_avatar``: print the plan and why."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        sys.stdout.write(
            help_text(
                "python -m launch.plan | avatar-plan",
                "Print the parallel plan (data x cfg x ring x ulysses) for a world size and model, and why each\n"
                "degree was chosen, and where each axis lies (inside a node or across nodes), without GPUs or a\n"
                "process group. Keys: world=N gpus_per_node=N model=NAME heads=N num_tokens=N parallel=PRESET\n"
                "parallel.<axis>=N|auto.\n"
                "Then the memory plan (docs/memory.md): the mode memory=auto picks and the peak per rank by stage, for\n"
                "gpu_memory=GB (10^9 bytes; absent: no GPU to fit) image_size=PX seconds=S [size=WxH] [speakers=N] [memory=MODE]\n"
                "[fp8=true] [token_chunk=N]; exit 2 with the reason when no mode fits.",
                [
                    "python -m launch.plan world=8 model=hunyuan_avatar",
                    "python -m launch.plan world=48 gpus_per_node=8 model=hunyuan_avatar",
                    "python -m launch.plan world=8 model=hunyuan_avatar parallel.data=2",
                    "python -m launch.plan world=6 heads=24 num_tokens=34",
                    "python -m launch.plan world=1 model=hunyuan_avatar gpu_memory=24 image_size=704 seconds=5",
                ],
                contract=False,
            )
        )
        return 0
    argv, memory_options = split_memory_args(argv)
    try:
        plan = plan_from_argv(argv)
        extra = memory_lines(plan, argv, memory_options)
    except InputError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    lines = [plan.describe(), f"heads {plan.num_heads}, sequence-parallel ranks {plan.sequence_size}"]
    lines += [f"  {reason}" for reason in plan.reasons]
    lines += placement_lines(plan)
    lines += [f"warning: {line}" for line in plan.warnings]
    lines += extra
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
