"""Atomic file and directory writes: a crash never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def ia2ray_home() -> Path:
    """Root of ia2ray's caches (built models, teacher activations): `$IA2RAY_HOME` or ~/.cache/ia2ray."""
    return Path(os.environ.get("IA2RAY_HOME", "~/.cache/ia2ray")).expanduser()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temp file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path` (an old one is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class StorageNotSharedError(RuntimeError):
    """A folder the study wrote on one node is missing on the node this process runs on."""


def require_visible(path: str | Path, what: str) -> None:
    """Raise StorageNotSharedError unless `path` exists here: a trial or Train worker on a node that
    does not mount the study's storage stops with a message that says so, not a missing-file error."""
    if not Path(path).exists():
        import socket

        raise StorageNotSharedError(
            f"{what} {path} is not visible on this node ({socket.gethostname()}): a study on several machines needs "
            "--storage on a folder every node mounts at the same path (NFS: EFS, Filestore, a ReadWriteMany volume; "
            "see cluster/README.md)")
