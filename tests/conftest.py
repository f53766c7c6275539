"""Shared fixtures: tidy process groups and default dtype between tests, tiny-weights folder built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _clean_torch_state():
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from avatar.compose import compose
    from avatar.weights.tiny import make_tiny

    folder = tmp_path_factory.mktemp("tiny-weights")
    make_tiny(folder, compose(["model=tiny"]).model, seed=0)
    return folder


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (``tests/utils/postgres.py``); skipped, with the reason, where none
    can be started."""
    from tests.utils.postgres import PostgresServer, Unavailable

    server = PostgresServer()
    try:
        server.start()
    except Unavailable as err:
        pytest.skip(f"PostgreSQL: {err}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """The URL of a fresh, empty database on the session's server (one per test)."""
    import re

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    return postgres_server.create_database(name)
