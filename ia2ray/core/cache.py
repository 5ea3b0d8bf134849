"""Content-addressed on-disk cache of teacher generations and activations.

An entry is a directory ``<root>/<key>/`` holding ``manifest.json`` and safetensors shards
``shard-00000.safetensors``, ... Each shard stores a run of consecutive records as
``token_ids`` (int64, concatenated), ``offsets`` (int64, record boundaries, ``k + 1`` values) and,
when the records carry activations, ``activations`` ``[L, sum G, d]`` in the storage dtype
(``meta["dtype"]``, default bfloat16), and, when the records carry the teacher's output distribution,
``top_ids`` (int32) and ``top_logp`` (float32) ``[sum G, k]``. The manifest records the format version, the caller's meta,
record count, every record's G, L, d, the dtype, k (``top_k``, 0: none), and every shard's name, byte size and sha256.

Entries appear atomically: they are written to ``<root>/.tmp-<key>-<pid>-<rand>/`` and renamed into
place, so an entry directory exists only when complete; ``load`` still verifies every byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch

from ia2ray.core.fingerprint import content_hash
from ia2ray.core.generate import Generated

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHARD_BYTES = 256 * 2**20  # activation bytes per shard before a new one starts
MANIFEST = "manifest.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_MANIFEST_FIELDS = {  # field -> type, checked on load
    "meta": dict, "num_records": int, "lengths": list, "num_layers": int, "hidden_size": int,
    "dtype": str, "has_activations": bool, "shards": list,
}
_SHARD_RE = re.compile(r"^shard-\d{5}\.safetensors$")
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class CacheError(Exception):
    """A cache entry is missing, incomplete or corrupt; the message names the offending file."""


class ActivationCache:
    """Directory of content-addressed entries, each a list of ``Generated`` records."""

    def __init__(self, root: str | Path, shard_bytes: int = SHARD_BYTES) -> None:
        self.root = Path(root)
        self.shard_bytes = int(shard_bytes)

    @staticmethod
    def key_of(**parts: Any) -> str:
        """Entry key: the first 32 hex digits of ``content_hash(parts)``."""
        return content_hash(parts)[:32]

    def key(self, **parts: Any) -> str:
        return self.key_of(**parts)

    def path(self, key: str) -> Path:
        """Directory of the entry ``key`` (it may not exist)."""
        if not _KEY_RE.match(key):
            raise ValueError(f"invalid cache key {key!r}: use letters, digits, '_' and '-'")
        return self.root / key

    def has(self, key: str) -> bool:
        """True when a complete entry exists (manifest present; contents are not verified)."""
        return (self.path(key) / MANIFEST).is_file()

    def save(self, key: str, records: list[Generated], meta: dict[str, Any]) -> Path:
        """Write ``records`` under ``key`` atomically and return the entry directory.

        ``meta`` must be JSON-serializable; ``meta["dtype"]`` (bfloat16 | float16 | float32, default
        bfloat16) is the storage dtype of activations. Records either all carry activations
        ``[L, G, d]`` with the same L and d, or all have ``activations=None``. If another process
        created the entry meanwhile, ours is discarded and theirs kept.
        """
        dtype_name = meta.get("dtype", "bfloat16")
        if dtype_name not in DTYPES:
            raise ValueError(f"meta['dtype'] must be one of {sorted(DTYPES)}, got {dtype_name!r}")
        dtype, manifest = DTYPES[dtype_name], _describe(records, dtype_name, meta)
        dest = self.path(key)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            manifest["shards"] = [
                _write_shard(tmp / f"shard-{i:05d}.safetensors", group, dtype)
                for i, group in enumerate(_group(records, self.shard_bytes, dtype))
            ]
            _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
            try:
                os.rename(tmp, dest)
            except OSError:
                if not self.has(key):
                    raise
                logger.info("cache entry %s was written by another process; keeping theirs", dest)
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def read_manifest(self, key: str) -> dict[str, Any]:
        """Parse and structurally check the entry's manifest (CacheError if missing or bad)."""
        file = self.path(key) / MANIFEST
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CacheError(f"{file}: missing (no complete cache entry)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CacheError(f"{file}: unreadable manifest ({e})") from e
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        if found != FORMAT_VERSION:
            raise CacheError(f"{file}: format_version {found!r}, expected {FORMAT_VERSION}")
        problem = _manifest_problem(manifest)
        if problem:
            raise CacheError(f"{file}: malformed manifest ({problem})")
        return manifest

    def load(self, key: str) -> list[Generated]:
        """Read and verify an entry; activations come back as float32 on CPU.

        Raises CacheError naming the file when the manifest or any shard is missing, has the wrong
        size or sha256, or holds tensors whose shapes disagree with the manifest.
        """
        manifest = self.read_manifest(key)
        entry, lengths = self.path(key), manifest["lengths"]
        records: list[Generated] = []
        for shard in manifest["shards"]:
            records += _read_shard(entry / shard["file"], shard, lengths[len(records):], manifest)
        if len(records) != len(lengths):
            raise CacheError(f"{entry / MANIFEST}: shards hold {len(records)} of {len(lengths)}")
        return records

    def load_tokens(self, key: str) -> list[Generated]:
        """Every record's token ids without its activations (`activations=None`), read from the shards'
        `token_ids` and `offsets` tensors only: a Ray Train driver builds training items from them and
        leaves the activations, and their verification, to the workers that load them."""
        from safetensors import safe_open

        manifest = self.read_manifest(key)
        entry, lengths = self.path(key), manifest["lengths"]
        out: list[Generated] = []
        for shard in manifest["shards"]:
            try:
                with safe_open(str(entry / shard["file"]), framework="pt") as f:
                    token_ids, offsets = f.get_tensor("token_ids"), f.get_tensor("offsets")
            except Exception as e:  # missing file, or not a safetensors file
                raise CacheError(f"{entry / shard['file']}: unreadable shard ({e})") from e
            want = lengths[len(out) : len(out) + shard["num_records"]]
            if not torch.equal(offsets, _offsets(want)) or token_ids.numel() != int(offsets[-1]):
                raise CacheError(f"{entry / shard['file']}: record lengths disagree with the manifest")
            out += [Generated(token_ids=token_ids[a:b].clone()) for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        if len(out) != len(lengths):
            raise CacheError(f"{entry / MANIFEST}: shards hold {len(out)} of {len(lengths)}")
        return out

    def load_subset(self, key: str, indices: list[int]) -> dict[int, Generated]:
        """Records at `indices` only, reading (and verifying) just the shards that hold them."""
        manifest = self.read_manifest(key)
        entry, lengths = self.path(key), manifest["lengths"]
        wanted = set(indices)
        bad = sorted(i for i in wanted if not 0 <= i < len(lengths))
        if bad:
            raise CacheError(f"{entry / MANIFEST}: records {bad[:5]} out of range (entry holds {len(lengths)})")
        out: dict[int, Generated] = {}
        start = 0
        for shard in manifest["shards"]:
            n = shard["num_records"]
            if any(start <= i < start + n for i in wanted):
                records = _read_shard(entry / shard["file"], shard, lengths[start:], manifest)
                out.update({start + j: r for j, r in enumerate(records) if start + j in wanted})
            start += n
        return out

    def get_or_compute(
        self, key: str, compute: Callable[[], list[Generated]], meta: dict[str, Any]
    ) -> tuple[list[Generated], bool]:
        """Return ``(records, hit)``: load the entry, or compute, save and load it.

        A corrupt entry is logged, moved aside to ``<key>.corrupt-<timestamp>`` and recomputed. On a
        miss the records are returned as stored (activations rounded to the storage dtype), so a
        hit and a miss give identical values.
        """
        entry = self.path(key)
        if entry.exists():
            try:
                return self.load(key), True
            except CacheError as e:
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
                aside = entry.with_name(f"{key}.corrupt-{stamp}")
                logger.warning("corrupt cache entry (%s); moving it to %s, recomputing", e, aside)
                try:
                    os.rename(entry, aside)
                except FileNotFoundError:
                    pass  # another process already moved it
        self.save(key, compute(), meta)
        return self.load(key), False


class EntrySync(Protocol):
    """Copies entries between this node's folder of a cache and shared storage (a bucket): what core's
    cache users are given for a cache that lives elsewhere (`ia2ray.mirror.BucketSync`). Core itself
    only reads and writes local folders."""

    def root(self) -> Path:
        """This node's folder of the cache."""

    def fetch(self, key: str) -> None:
        """Copy the complete entry `key` into the folder, when storage has it and the folder does not."""

    def publish(self, key: str) -> None:
        """Copy the new entry `key` from the folder to storage (its manifest last)."""


def _describe(records: list[Generated], dtype_name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Validate records and build the manifest (without shards)."""
    has_acts = [r.activations is not None for r in records]
    if any(has_acts) and not all(has_acts):
        raise ValueError("records mix activations=None with tensors; all or none must have them")
    first = records[0].activations if any(has_acts) else None
    num_layers, hidden = (first.shape[0], first.shape[-1]) if first is not None else (0, 0)
    for i, r in enumerate(records):
        if r.token_ids.dim() != 1:
            raise ValueError(f"record {i}: token_ids must be 1-D, got {tuple(r.token_ids.shape)}")
        want = (num_layers, r.token_ids.numel(), hidden)
        if r.activations is not None and tuple(r.activations.shape) != want:
            got = tuple(r.activations.shape)
            raise ValueError(f"record {i}: activations shape {got}, expected {want} = [L, G, d]")
    has_top = [r.top_logp is not None for r in records]
    if any(has_top) and not all(has_top):
        raise ValueError("records mix top_logp=None with tensors; all or none must have them")
    top_k = int(records[0].top_logp.shape[-1]) if records and has_top[0] else 0
    for i, r in enumerate(records):
        want = (r.token_ids.numel(), top_k)
        if top_k and (tuple(r.top_logp.shape) != want or r.top_ids is None or tuple(r.top_ids.shape) != want):
            raise ValueError(f"record {i}: top_logp / top_ids must both be {want} = [G, k]")
    return {
        "format_version": FORMAT_VERSION,
        "top_k": top_k,
        "meta": json.loads(json.dumps(meta)),  # fails early if meta is not JSON-serializable
        "num_records": len(records),
        "lengths": [int(r.token_ids.numel()) for r in records],
        "num_layers": int(num_layers),
        "hidden_size": int(hidden),
        "dtype": dtype_name,
        "has_activations": first is not None,
    }


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """Describe what is structurally wrong with a parsed manifest, or None."""
    for field, kind in _MANIFEST_FIELDS.items():
        if type(manifest.get(field)) is not kind:
            return f"field {field!r} missing or not a {kind.__name__}"
    if manifest["dtype"] not in DTYPES:
        return f"unknown dtype {manifest['dtype']!r}"
    if not all(type(g) is int and g >= 0 for g in manifest["lengths"]):
        return "lengths must be non-negative integers"
    if manifest["num_records"] != len(manifest["lengths"]):
        return "num_records disagrees with lengths"
    shards = manifest["shards"]
    if not all(isinstance(s, dict) and _SHARD_RE.match(str(s.get("file"))) for s in shards):
        return "every shard needs a file name like shard-00000.safetensors"
    return None


def _group(records: list[Generated], shard_bytes: int, dtype: torch.dtype) -> list[list[Generated]]:
    """Split records into consecutive runs of at most ``shard_bytes`` stored activation bytes
    (a single larger record gets a shard of its own)."""
    groups: list[list[Generated]] = []
    size = 0
    for r in records:
        nbytes = 0 if r.activations is None else r.activations.numel() * dtype.itemsize
        if not groups or size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(r)
        size += nbytes
    return groups


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)


def _write_shard(path: Path, group: list[Generated], dtype: torch.dtype) -> dict[str, Any]:
    """Write one shard file and return its manifest entry."""
    tensors = {
        "token_ids": torch.cat([r.token_ids.detach().to("cpu", torch.int64) for r in group]),
        "offsets": _offsets([r.token_ids.numel() for r in group]),
    }
    if group[0].top_logp is not None:
        tensors["top_ids"] = torch.cat([r.top_ids.detach().to("cpu", torch.int32) for r in group]).contiguous()
        tensors["top_logp"] = torch.cat([r.top_logp.detach().to("cpu", torch.float32) for r in group]).contiguous()
    if group[0].activations is not None:
        tensors["activations"] = torch.cat(
            [r.activations.detach().to("cpu", dtype) for r in group], dim=1
        ).contiguous()
    data = safetensors.torch.save(tensors)
    _write_bytes(path, data)
    sha256 = hashlib.sha256(data).hexdigest()
    return {"file": path.name, "bytes": len(data), "sha256": sha256, "num_records": len(group)}


def _read_shard(
    path: Path, shard: dict[str, Any], lengths: list[int], manifest: dict[str, Any]
) -> list[Generated]:
    """Verify one shard (size, sha256, tensor shapes) and split it into records.

    ``lengths`` are the manifest's G of the records from this shard onwards.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CacheError(f"{path}: missing or unreadable shard ({e.strerror})") from e
    if len(data) != shard.get("bytes"):
        raise CacheError(f"{path}: size {len(data)} bytes, manifest says {shard.get('bytes')}")
    if hashlib.sha256(data).hexdigest() != shard.get("sha256"):
        raise CacheError(f"{path}: sha256 mismatch (file was modified or corrupted)")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error types
        raise CacheError(f"{path}: not a valid safetensors file ({e})") from e
    n = shard.get("num_records")
    offsets, token_ids, acts = (tensors.get(k) for k in ("offsets", "token_ids", "activations"))
    ok = isinstance(n, int) and 1 <= n <= len(lengths) and offsets is not None
    ok = ok and offsets.dtype == torch.int64 and torch.equal(offsets, _offsets(lengths[:n]))
    total = int(offsets[-1]) if ok else -1
    ok = ok and token_ids is not None and tuple(token_ids.shape) == (total,)
    if manifest["has_activations"]:
        shape = (manifest["num_layers"], total, manifest["hidden_size"])
        ok = ok and acts is not None and tuple(acts.shape) == shape
        ok = ok and acts.dtype == DTYPES[manifest["dtype"]]
    elif acts is not None:
        ok = False
    k = manifest.get("top_k", 0)
    top_ids, top_logp = tensors.get("top_ids"), tensors.get("top_logp")
    if k:
        ok = ok and all(t is not None and tuple(t.shape) == (total, k) for t in (top_ids, top_logp))
    elif top_ids is not None or top_logp is not None:
        ok = False
    if not ok:
        raise CacheError(f"{path}: tensor shapes or record lengths disagree with the manifest")
    out = []
    for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        act = None if acts is None else acts[:, s:e].to(torch.float32, copy=True).contiguous()
        top = (None, None) if not k else (top_ids[s:e].clone(), top_logp[s:e].clone())
        out.append(Generated(token_ids=token_ids[s:e].clone(), activations=act, top_ids=top[0], top_logp=top[1]))
    return out
