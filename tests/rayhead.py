"""A real `ray start --head` for the cluster tests, with token authentication, torn down completely.

Each head gets its own temp dir, ports and token file; only its own processes are killed at the end
(never `ray stop`, which would also stop the test session's cluster).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

from ia2ray.tracking.server import free_port

VENV_BIN = Path(sys.executable).parent


class RayHead:
    """`ray start --head --block` in its own process group. `env` is what every client (ray job submit,
    python -m ia2ray.tune with RAY_ADDRESS) must run with: the token and RAY_AUTH_MODE=token."""

    def __init__(self, *, num_cpus: int, port: Optional[int] = None, autoscaling_config: Optional[str] = None,
                 extra_env: Optional[dict] = None):
        self.root = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a length limit
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.port = port or free_port()
        if _bound(self.port):  # e.g. someone's own head on 6379: never start beside it, never touch it
            raise RuntimeError(f"port {self.port} is in use; stop what listens there first")
        self.dashboard_port = free_port()
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", **(extra_env or {})}
        self.env.pop("RAY_ADDRESS", None)
        cmd = [str(VENV_BIN / "ray"), "start", "--head", f"--port={self.port}", f"--num-cpus={num_cpus}",
               "--num-gpus=0", f"--temp-dir={self.root / 'ray'}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true", "--block"]
        if autoscaling_config:
            cmd.append(f"--autoscaling-config={autoscaling_config}")
        self.log = open(self.root / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.client_env = {**self.env, "RAY_ADDRESS": self.address}

    def wait_ready(self, timeout: float = 90) -> None:
        """Until `ray status` answers (GCS, raylet and the dashboard's job server are up)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}:\n{self.head_log()}")
            ok = subprocess.run([str(VENV_BIN / "ray"), "status", f"--address={self.address}"], env=self.env,
                                capture_output=True, timeout=60).returncode == 0
            if ok and _http_up(self.dashboard):
                return
            time.sleep(2)
        raise TimeoutError(f"Ray head not ready in {timeout} s:\n{self.head_log()}")

    def head_log(self) -> str:
        return (self.root / "head.log").read_text()[-4000:]

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: the head's process group and anything whose command line
        names this head's own temp dir (its raylets, fake worker nodes and Ray workers all do)."""
        found = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                    continue
                if str(self.root) in " ".join(p.info["cmdline"] or []) or os.getpgid(p.pid) == self.proc.pid:
                    found.append(p)
            except (psutil.Error, ProcessLookupError):
                pass
        return found

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM the head (it stops its own processes), then kill whatever of this cluster is left,
        until nothing is."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        deadline = time.time() + timeout
        while (left := self.processes()) and time.time() < deadline:
            for p in left:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(left, timeout=10)
        self.log.close()


def _bound(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_up(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url + "/api/version", timeout=5)
        return True
    except urllib.error.HTTPError:  # 401 without the token: the server is up
        return True
    except OSError:
        return False
