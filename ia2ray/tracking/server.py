"""A local `mlflow server` on 127.0.0.1 (SQLite backend, artifacts served from a local folder), for the
tests, the benchmarks and trying the server path on one machine. On a cluster, run `mlflow server`
where every node can reach it and pass its URL as --tracking-uri."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def start_local_server(root: Path, port: Optional[int] = None, timeout_s: float = 120,
                       backend_uri: Optional[str] = None) -> LocalServer:
    """`mlflow server` with `<root>/mlflow.db` (or an existing store, `backend_uri`) and `<root>/artifacts`,
    one worker, its log in `<root>/server.log`; waits for /health."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = root / "server.log"
    backend_uri = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    server = LocalServer(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.time() + timeout_s
    while True:
        try:
            if urllib.request.urlopen(f"{server.url}/health", timeout=2).status == 200:
                return server
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            server.stop()
            raise RuntimeError(f"mlflow server did not start; {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
