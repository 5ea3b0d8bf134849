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


class S3Server:
    """A local S3 server (moto) on 127.0.0.1: its URL, the environment that points AWS clients (pyarrow,
    hence Ray Tune and Ray Train too) at it, and its request log."""

    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log
        self.env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def make_bucket(self, name: str) -> None:
        from pyarrow.fs import S3FileSystem

        host = self.url.split("://", 1)[1]
        S3FileSystem(endpoint_override=host, scheme="http", access_key="testing", secret_key="testing",
                     region="us-east-1", allow_bucket_creation=True).create_dir(name)

    def requests(self) -> list[str]:
        """The request lines served so far ("PUT /bucket/key")."""
        import re

        return re.findall(r'"([A-Z]+ /[^ ]*) HTTP', self.log.read_text())


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API server (`moto_server`) on a free port of 127.0.0.1 for the whole session."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("s3") / "requests.log"
    # this interpreter's own moto first: another moto_server on PATH (another Python's) may be a version
    # whose CompleteMultipartUpload answers pyarrow cannot read
    own = Path(sys.executable).parent / "moto_server"
    exe = str(own) if own.is_file() else shutil.which("moto_server")
    with open(log, "w") as out:
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except urllib.error.HTTPError:  # it answers
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)
    yield S3Server(url, log)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """The S3 server's environment for this test, a local-copy root of its own, and a fresh bucket
    (its name is `s3.bucket`)."""
    import secrets

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("IA2RAY_MIRROR", str(tmp_path / "mirror"))
    s3_server.bucket = f"b-{secrets.token_hex(4)}"
    s3_server.make_bucket(s3_server.bucket)
    return s3_server
