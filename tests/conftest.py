"""Shared fixtures: an isolated IA2RAY_HOME per test session and tiny checkpoints built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def ia2ray_home(tmp_path_factory) -> Path:
    """Builtin models and the activation cache go to a fresh directory for the whole session."""
    home = tmp_path_factory.mktemp("ia2ray-home")
    old = os.environ.get("IA2RAY_HOME")
    os.environ["IA2RAY_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("IA2RAY_HOME", None)
    else:
        os.environ["IA2RAY_HOME"] = old


@pytest.fixture(scope="session")
def tiny_checkpoints(ia2ray_home):
    """arch -> local directory of a tiny random checkpoint (built on first use)."""
    from ia2ray.core.tiny import build_tiny_checkpoint

    built: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = build_tiny_checkpoint(ia2ray_home / "models" / f"tiny-{arch}", arch=arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def ray_cluster(ia2ray_home):
    """One local Ray cluster for the whole session (4 logical CPUs: room for 2 Train workers and the
    Train controller); started on first use."""
    import ray

    from ia2ray.train.launch import RUNTIME_ENV

    ray.init(num_cpus=4, log_to_driver=False, configure_logging=False, runtime_env=RUNTIME_ENV)
    yield
    ray.shutdown()



@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts proxied to a local folder) for the
    whole session; yields its URL."""
    from ia2ray.tracking.server import start_local_server

    server = start_local_server(tmp_path_factory.mktemp("mlflow-server"))
    yield server.url
    server.stop()
