"""``launch.serve`` / ``launch.worker`` settings before anything is built: the role against the world size, the lease,
the store URL, an unreachable store (one line, exit 2, password never shown), the renderer's config without secrets;
and the templates (the LeaderWorkerSet example's commands compose, the sbatch template parses)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_roles_leases_and_stores_are_checked_first(tiny_weights, tmp_path, capsys, monkeypatch):
    from avatar.compose import compose
    from avatar.config import plain
    from launch.serve import main, redacted
    from launch.worker import main as worker_main
    from tests.utils.spawn import free_port

    args = ["model=tiny", f"weights={tiny_weights}", f"serve.data_dir={tmp_path / 'd'}"]
    assert main([*args, "serve.lease_seconds=0"]) == 2
    assert "serve.lease_seconds=0.0 is invalid; give a number > 0" in capsys.readouterr().err
    assert main([*args, "serve.store=mysql://x/y"]) == 2
    assert "serve.store=mysql://x/y is not a store URL; give sqlite:///PATH" in capsys.readouterr().err
    closed = f"postgresql://avatar:hunter2@127.0.0.1:{free_port()}/avatar"
    assert worker_main([*args, f"serve.store={closed}"]) == 2  # unreachable: before any model is loaded
    err = capsys.readouterr().err
    assert err.startswith("error: the job store cannot be used: job store postgresql://avatar:***@127.0.0.1:")
    assert "hunter2" not in err
    assert err.count("\n") == 1
    assert main([*args, "serve.role=bogus"]) == 2
    assert "serve.role" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # rank 1 of 2 prints nothing; rank 0 prints the line
    assert main([*args, "serve.role=api"]) == 2
    monkeypatch.setenv("RANK", "0")
    assert main([*args, "serve.role=api"]) == 2
    assert "serve.role=api runs no model: start it as one process" in capsys.readouterr().err

    cfg = compose([*args, "serve.store=postgresql://avatar:hunter2@db/avatar", "serve.api_key=s3cret"])
    shown = plain(redacted(cfg))
    assert "hunter2" not in str(shown) and "s3cret" not in str(shown) and shown["overwrite"] is True


def test_filesystem_type_from_proc_mounts():
    from avatar.serve.store import filesystem_type

    assert filesystem_type("/proc/self") == "proc"
    assert filesystem_type(ROOT) not in ("", "proc")


def test_templates_compose_and_parse(tiny_weights):
    import yaml

    from avatar.compose import compose

    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "launch/k8s/leaderworkerset.yaml").read_text())}
    container = docs["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    command = container["args"][0].split()
    assert command[:4] == ["exec", "python", "-m", "torch.distributed.run"]
    assert '--nnodes="${LWS_GROUP_SIZE}"' in command and '--master_addr="${LWS_LEADER_ADDRESS}"' in command
    overrides = command[command.index("launch.worker") + 1 :]
    worker = compose([*overrides, "serve.role=worker"])
    assert worker.serve.store.startswith("postgresql://") and worker.serve.data_dir == "/data"
    api = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    front = compose(api["args"])
    assert front.serve.role == "api" and front.serve.store == worker.serve.store
    assert {e["name"] for e in api["env"]} == {"PGPASSWORD", "AVATAR_API_KEY"}
    for script in ("worker.sbatch", "generate.sbatch"):
        result = subprocess.run(["bash", "-n", str(ROOT / "launch/slurm" / script)], capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr
    assert "MODULE=${MODULE:-launch.worker}" in (ROOT / "launch/slurm/worker.sbatch").read_text()
