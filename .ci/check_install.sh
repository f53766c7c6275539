#!/usr/bin/env bash
# A real, non-editable install: build the wheel, install it into a fresh virtualenv, and from a folder outside the
# checkout write the tiny weights, verify them and render the demo with the installed console scripts.
# To stay fast and offline, the fresh venv sees the project's .venv site-packages (torch & co.) through a .pth line;
# .pth files inside that folder (the editable install's finder) are not processed, so `launch`/`avatar` can only come
# from the installed wheel, which the script checks.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-$REPO/.venv/bin/python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset PYTHONPATH

rm -rf "$REPO/build"  # a stale build/lib could carry deleted modules into the wheel
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation "$REPO" -w "$TMP/wheel"
"$PY" -m venv --without-pip "$TMP/venv"
SITE=$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/project-deps.pth"
"$PY" -m pip --python "$TMP/venv/bin/python" install -q --disable-pip-version-check --no-deps --no-index \
    "$TMP"/wheel/avatar_launcher-*.whl 2>/dev/null \
    || "$TMP/venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-index \
        "$TMP"/wheel/avatar_launcher-*.whl

mkdir "$TMP/run" && cd "$TMP/run"
BIN=$TMP/venv/bin
"$BIN/python" - "$SITE" <<'PY'
import sys
from pathlib import Path

import avatar
import launch
from avatar.resources import config_dir, weights_manifest
from avatar.serve.store import migrations
from launch.resources import k8s_dir, slurm_dir

site = Path(sys.argv[1]).resolve()
for module in (avatar, launch):
    assert Path(module.__file__).resolve().is_relative_to(site), f"{module.__name__} imported from {module.__file__}"
for path in (config_dir() / "config.yaml", slurm_dir() / "worker.sbatch", k8s_dir() / "leaderworkerset.yaml",
             weights_manifest()):
    assert path.resolve().is_relative_to(site) and path.is_file(), path
assert [v for v, _, _ in migrations()][:1] == [1], "the job store's migrations are not in the wheel"
print(f"check-install: avatar {avatar.__version__} from {Path(avatar.__file__).parent}")
PY
"$BIN/avatar-weights" make-tiny w >/dev/null
"$BIN/avatar-weights" verify w model=tiny
"$BIN/avatar-generate" model=tiny weights=w image="$REPO/examples/portrait.jpg" audio="$REPO/examples/speech_5s.wav" \
    prompt="A woman speaks to the camera." output=demo.mp4 sampling.steps=2 2> generate.log \
    || { cat generate.log; exit 1; }
test -s demo.mp4 && test -s demo.mp4.json
echo "check-install: OK (wheel installed in a fresh venv, demo rendered in $TMP/run)"
