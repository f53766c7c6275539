"""README.md as a test: every fenced ```bash / ```sh / ```python block runs, in README order, in a sandbox laid out
like a fresh checkout after ``make install`` (the suite's own virtualenv; ``make demo`` writes its tiny weights).

A block that cannot run here says why in its info string (```bash no-run: REASON); there are at most
``MAX_NO_RUN`` of them, and they are still checked for shell syntax and for the repository files they name. Code
may appear only in such fences (an indented code block would escape the test). After each block, every
``outputs/...mp4`` it names must be a video with sound, and every ``output_dir=`` must hold a batch summary without
failures.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

#: Languages whose fences are run; other fences may only show output (no commands).
RUNNABLE = {"bash": "bash", "sh": "bash", "python": "python"}
SHOWN = {"text", "json", "yaml"}
NO_RUN = "no-run:"
#: At most this many blocks may be left unrun (each names its reason).
MAX_NO_RUN = 3
#: Seconds one block may take (the slowest, ``make demo``, renders 5 s at 50 steps: about a minute on 2 cores).
BLOCK_TIMEOUT = 300
#: Entries of the checkout the sandbox does not link: made fresh there, or not needed.
NOT_LINKED = {".venv", "weights", "outputs", ".pytest_cache", ".ruff_cache", "build", "dist"}

FENCE_RE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
MP4_RE = re.compile(r"(?<![\w/.-])outputs/[\w/.-]*?\.mp4(?![\w.])")
OUTPUT_DIR_RE = re.compile(r"\boutput_dir=(\S+)")
REPO_FILE_RE = re.compile(r"(?<![\w/.$-])((?:examples|launch|configs|tests|bench|docs)/[\w/.-]*\.\w+)")


@dataclass(frozen=True)
class Block:
    line: int
    """README line of the opening fence."""
    lang: str
    reason: str | None
    """Why it is not run (``no-run: REASON``), or None for a block that runs."""
    code: str

    def where(self) -> str:
        return f"README.md line {self.line} (```{self.lang}{' no-run' if self.reason else ''})"


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE_RE.finditer(text):
        info = match.group(1).strip()
        lang, _, rest = info.partition(" ")
        rest = rest.strip()
        if not rest:
            reason = None
        elif rest.startswith(NO_RUN):
            reason = rest[len(NO_RUN) :].strip()  # an empty reason is refused by the test below
        else:
            reason = f"<bad info string {rest!r}>"
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(line, lang, reason, match.group(2)))
    return blocks


def indented_code_lines(text: str) -> list[int]:
    """Lines of indented (unfenced) code blocks: four spaces after a blank line, outside any fence."""
    lines, found, in_fence, previous = text.splitlines(), [], False, ""
    for number, line in enumerate(lines, start=1):
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("    ") and line.strip() and not previous.strip():
            found.append(number)
        previous = line
    return found


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_readme_code_is_in_checked_fences():
    text = README.read_text(encoding="utf-8")
    assert BLOCKS, "README.md has no fenced code"
    assert not indented_code_lines(text), (
        f"README.md lines {indented_code_lines(text)}: indented code is not run by this test; use a ```bash fence"
    )
    for block in BLOCKS:
        assert block.lang in RUNNABLE or block.lang in SHOWN, (
            f"{block.where()}: fence language {block.lang!r}; use one of {sorted(RUNNABLE)} (run) or "
            f"{sorted(SHOWN)} (shown output)"
        )
        if block.reason is not None:
            assert block.lang in RUNNABLE and block.reason and not block.reason.startswith("<bad"), (
                f"{block.where()}: the info string after the language must be 'no-run: REASON', got {block.reason!r}"
            )
    skipped = [b for b in BLOCKS if b.reason is not None]
    assert len(skipped) <= MAX_NO_RUN, (
        f"{len(skipped)} README blocks are not run ({', '.join(b.where() for b in skipped)}); at most {MAX_NO_RUN}: "
        "write the others in a form that runs on the tiny model"
    )
    runnable = [b for b in BLOCKS if b.lang in RUNNABLE and b.reason is None]
    assert len(runnable) >= 5, "the README's commands are expected to run"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.reason is not None], ids=lambda b: f"line{b.line}")
def test_not_run_blocks_are_valid_shell_naming_existing_files(block):
    result = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"{block.where()}: not valid shell: {result.stderr.strip()}"
    missing = [p for p in REPO_FILE_RE.findall(block.code) if not (ROOT / p).exists()]
    assert not missing, f"{block.where()} names files that are not in the repository: {missing}"


# --- running them --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A folder that looks like the checkout after ``make install``: the checkout's files linked, a fresh
    ``outputs/`` and ``weights/`` (only the tracked README and manifest), and a ``.venv`` that is the suite's own
    virtualenv with an up-to-date install stamp, so ``make`` never reinstalls the (possibly shared) environment;
    a fresh install is ``make check-install``'s test."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("the README's make targets need the suite to run in a virtualenv (make install)")
    box = tmp_path_factory.mktemp("readme")
    for entry in ROOT.iterdir():
        if entry.name not in NOT_LINKED:
            (box / entry.name).symlink_to(entry)
    weights = box / "weights"
    weights.mkdir()
    for name in ("README.md", "manifest.yaml"):
        if (ROOT / "weights" / name).exists():
            (weights / name).symlink_to(ROOT / "weights" / name)
    venv = box / ".venv"
    venv.mkdir()
    for entry in Path(sys.prefix).iterdir():
        if entry.name != ".installed":
            (venv / entry.name).symlink_to(entry)
    (venv / ".installed").touch()  # newer than requirements.txt and setup.py: `make install` is up to date
    return box


def _env(box: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AVATAR_", "MAKE", "MFLAGS"))}
    env.update(
        PATH=f"{box / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",  # what `source .venv/bin/activate` sets
        VIRTUAL_ENV=str(box / ".venv"),
        PYTHONPATH=str(box),  # this checkout, whatever the venv's editable install points at
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PORT=str(_free_port()),  # the server block's ${PORT:-8000}
    )
    return env


def _run(block: Block, box: Path, env: dict) -> tuple[int | None, str, float, float]:
    """Run one block in its own process group; returns (exit code or None on timeout, output, seconds, CPU seconds of
    the processes that ended with it). Whatever it
    left running (a background server) is killed with the group."""
    scripts = box / ".readme"
    scripts.mkdir(exist_ok=True)
    script = scripts / f"line{block.line}.{'py' if RUNNABLE[block.lang] == 'python' else 'sh'}"
    script.write_text(block.code, encoding="utf-8")
    log = scripts / f"line{block.line}.log"
    if RUNNABLE[block.lang] == "python":
        cmd, stdin = [shutil.which("python", path=env["PATH"]), "-"], script.open("rb")  # as typed at a prompt
    else:
        cmd, stdin = ["bash", "-e", str(script)], subprocess.DEVNULL
    start, cpu = time.monotonic(), _children_cpu()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=box, env=env, stdin=stdin, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            if stdin is not subprocess.DEVNULL:
                stdin.close()
    return code, log.read_text(errors="replace"), time.monotonic() - start, _children_cpu() - cpu


def _children_cpu() -> float:
    """CPU seconds of the waited-for children so far (a block's torchrun workers and servers included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _check_outputs(block: Block, box: Path) -> None:
    from avatar.io.video import probe

    for name in dict.fromkeys(MP4_RE.findall(block.code)):
        path = box / name
        assert path.is_file() and path.stat().st_size > 0, f"{block.where()}: {name} was not written"
        info = probe(path)
        assert info.frames > 0 and info.audio_streams == 1, (
            f"{block.where()}: {name} is not a video with sound: {info}"
        )
    for folder in dict.fromkeys(OUTPUT_DIR_RE.findall(block.code)):
        summary = json.loads((box / folder / "batch_summary.json").read_text())
        assert summary["num_failed"] == 0 and summary["num_done"] + summary["num_skipped"] > 0, (
            f"{block.where()}: {folder}/batch_summary.json: {summary}"
        )
        for row in summary["done"]:
            assert (box / row["output"]).is_file(), f"{block.where()}: {row['output']} is listed done but missing"


@pytest.mark.timeout(1800)
def test_readme_commands_run_in_order(sandbox):
    """Every runnable block, in README order (later blocks use what earlier ones made: the tiny weights, outputs/)."""
    env = _env(sandbox)
    runnable = [b for b in BLOCKS if b.lang in RUNNABLE and b.reason is None]
    times = []
    for block in runnable:
        code, output, seconds, cpu = _run(block, sandbox, env)
        times.append(f"{block.where()}: {seconds:.0f} s ({cpu:.0f} CPU s)")
        assert code is not None, f"{block.where()} did not finish in {BLOCK_TIMEOUT} s:\n{output[-6000:]}"
        assert code == 0, f"{block.where()} exited {code}:\n{block.code}\n--- output ---\n{output[-6000:]}"
        _check_outputs(block, sandbox)
    print("\n".join(times))
