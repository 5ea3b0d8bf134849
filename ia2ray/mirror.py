"""Folders on object storage (`s3://`, `gs://`), used through a copy on each node's own disk.

ia2ray reads and writes plain files: SQLite for Optuna, the teacher cache, run summaries. When a
study's storage is a bucket, every process works in its node's local copy of the study folder and
copies files up (`push`) and down (`pull`, `fetch_dir`) at fixed points:

- the study driver pulls the study folder on `--resume`, pushes `study.json` at the start, the Optuna
  database after every finished trial, and everything it wrote at the end; it pulls `runs/` after
  the search and after the confirmation;
- a teacher capture pushes its cache entry (manifest last), and whoever reads an entry fetches it
  whole into the local copy first;
- a trial pulls its `runs/<run>/` (a resumed trial may find its finished result there) and pushes it
  when it ends, also when it fails.

Ray Tune and Ray Train write their own parts (`search/`, `confirm/`, `train/`) straight to the bucket.
The local copy of `<scheme>://<bucket>/<path>` is `<IA2RAY_MIRROR>/<scheme>/<bucket>/<path>`, with
`IA2RAY_MIRROR` defaulting to `$IA2RAY_HOME/mirror`. Credentials and endpoints come from the
environment, read by pyarrow as Ray reads them (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL` for an
S3-compatible server, `GOOGLE_APPLICATION_CREDENTIALS`, ...).

A file is uploaded when it changed since this process last uploaded or downloaded it (size or
mtime), or, the first time, when its size differs from the bucket's copy or it is newer by more than
a second (object stores keep whole seconds). Downloads go to a temporary name and are renamed into
place, so a reader never sees half a file. Hidden files (temporaries) and SQLite journals are never
copied.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import urlparse

from ia2ray.fileio import ia2ray_home

SCHEMES = ("s3", "gs", "gcs")
_synced: dict[Path, tuple[int, int]] = {}  # local file -> (size, mtime_ns) when this process last synced it


def is_remote(path) -> bool:
    """Whether `path` is an object-storage URI (`s3://`, `gs://`, `gcs://`)."""
    return isinstance(path, str) and urlparse(path).scheme in SCHEMES and "://" in path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def mirror_root() -> Path:
    return Path(os.environ.get("IA2RAY_MIRROR") or ia2ray_home() / "mirror").expanduser()


def local_copy(uri: str) -> Path:
    """This node's copy of the folder `uri`."""
    u = urlparse(uri)
    return mirror_root() / u.scheme / u.netloc / u.path.strip("/")


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def check_remote(uri: str) -> Optional[str]:
    """Why `uri` cannot hold a study (None when it can): an unknown scheme, a bucket that does not
    exist, missing credentials, no write permission. Writes and deletes one small probe object."""
    u = urlparse(uri)
    if u.scheme not in SCHEMES:
        return f"unsupported scheme {u.scheme!r} (use {', '.join(s + '://' for s in SCHEMES[:2])} or a folder)"
    if not u.netloc:
        return "no bucket in the URI"
    try:
        fs, path = _fs(uri)
        from pyarrow.fs import FileType

        if fs.get_file_info(u.netloc).type == FileType.NotFound:
            return f"bucket {u.netloc!r} does not exist"
        probe = f"{path.rstrip('/')}/.ia2ray-probe-{secrets.token_hex(4)}"
        with fs.open_output_stream(probe) as fh:
            fh.write(b"ok")
        fs.delete_file(probe)
    except Exception as exc:  # noqa: BLE001 - credentials, network, permissions: all reported as is
        return f"cannot write there ({str(exc).splitlines()[0][:300]})"
    return None


def exists(uri: str) -> bool:
    from pyarrow.fs import FileType

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != FileType.NotFound


def read_text(uri: str) -> str:
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as fh:
        return fh.read().decode("utf-8")


def _remote_files(uri: str, rel: str) -> dict[str, object]:
    """rel path (from `uri`) -> FileInfo of every file under `uri/rel`."""
    from pyarrow.fs import FileSelector, FileType

    fs, root = _fs(uri)
    base = root.rstrip("/")
    info = fs.get_file_info(f"{base}/{rel}" if rel else base)
    if info.type == FileType.File:
        return {rel: info}
    found = fs.get_file_info(FileSelector(info.path, recursive=True, allow_not_found=True))
    return {f.path[len(base) + 1:]: f for f in found if f.type == FileType.File}


def _skipped(rel: str, skip: Iterable[str]) -> bool:
    """Not copied: what `skip` names, hidden files (temporaries of atomic writes) and SQLite's journals."""
    return (any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in skip)
            or any(part.startswith(".") for part in rel.split("/")) or rel.endswith(("-journal", "-wal", "-shm")))


def _ns(info) -> int:
    """A bucket object's modification time in ns (0 when the store gives none)."""
    return int(info.mtime.timestamp() * 1e9) if info.mtime else 0


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def pull(uri: str, rel: str = "", skip: Iterable[str] = (), names: Optional[Iterable[str]] = None) -> int:
    """Download the files under `uri/rel` that are missing locally or differ (size, or newer in the
    bucket), only those whose file name is in `names` when given; returns how many were downloaded."""
    fs, root = _fs(uri)
    local, count, names = local_copy(uri), 0, None if names is None else set(names)
    for name, info in sorted(_remote_files(uri, rel).items()):
        if _skipped(name, skip) or (names is not None and name.rsplit("/", 1)[-1] not in names):
            continue
        dest = local / name
        remote_ns = _ns(info)
        if dest.is_file():
            size, mtime_ns = _stat(dest)
            if size == info.size and mtime_ns >= remote_ns:
                continue
        _download(fs, info.path, dest, remote_ns)
        count += 1
    return count


def _download(fs, remote: str, dest: Path, mtime_ns: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        with fs.open_input_stream(remote) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 8 * 2**20)
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _synced[dest] = _stat(dest)


def push(uri: str, rel: str = "", skip: Iterable[str] = (), last: Iterable[str] = ()) -> int:
    """Upload the local files under `rel` that changed since this process last synced them (or, not
    synced yet, differ in size from the bucket's copy or are newer). Files named in `last` go after
    the others (a cache entry's manifest: an entry with a manifest is complete). Returns the count."""
    local = local_copy(uri)
    start = local / rel if rel else local
    if not start.exists():
        return 0
    files = [start] if start.is_file() else [p for p in start.rglob("*") if p.is_file()]
    names = sorted((p.relative_to(local).as_posix() for p in files), key=lambda n: (Path(n).name in last, n))
    remote = None
    fs, root = _fs(uri)
    count = 0
    for name in names:
        if _skipped(name, skip):
            continue
        path = local / name
        stat = _stat(path)
        if path in _synced:
            if _synced[path] == stat:
                continue
        else:
            remote = _remote_files(uri, rel) if remote is None else remote
            info = remote.get(name)
            if info is not None and info.size == stat[0] and info.mtime and stat[1] < _ns(info) + 1e9:
                _synced[path] = stat
                continue
        with open(path, "rb") as src, fs.open_output_stream(f"{root.rstrip('/')}/{name}") as out:
            shutil.copyfileobj(src, out, 8 * 2**20)
        _synced[path] = stat
        count += 1
    return count


def fetch_dir(uri: str, rel: str, complete_when: str) -> Optional[Path]:
    """This node's copy of the folder `uri/rel`, downloaded whole when it is not here yet and the
    bucket holds `rel/complete_when` (written last); None when the bucket has no complete folder.
    The folder appears atomically (downloaded under a temporary name, then renamed)."""
    dest = local_copy(uri) / rel
    if (dest / complete_when).is_file():
        return dest
    if not exists(join(uri, rel, complete_when)):
        return None
    fs, _ = _fs(uri)
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        for name, info in _remote_files(uri, rel).items():
            _download(fs, info.path, tmp / name[len(rel) + 1:], _ns(info))
        try:
            os.rename(tmp, dest)
        except OSError:  # another process on this node fetched it meanwhile
            if not (dest / complete_when).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


class BucketSync:
    """A folder of entries (the teacher cache) in a bucket, used through this node's copy: `fetch(key)`
    downloads an entry whole when the bucket has it complete (its `complete_when` file, written last)
    and this node does not; `publish(key)` uploads a new entry with that file last. The
    `ia2ray.core.cache.EntrySync` that core's cache functions are given for a bucket location."""

    def __init__(self, uri: str, complete_when: str = "manifest.json"):
        self.uri, self.complete_when = uri, complete_when

    def root(self) -> Path:
        return local_copy(self.uri)

    def fetch(self, key: str) -> None:
        fetch_dir(self.uri, key, complete_when=self.complete_when)

    def publish(self, key: str) -> None:
        push(self.uri, key, last=(self.complete_when,))


def bucket_sync(location: str) -> Optional[BucketSync]:
    """The sync of a cache at `location`: a `BucketSync` for a bucket URI, None for a folder on this
    node (nothing to copy)."""
    return BucketSync(location) if is_remote(location) else None
