"""Content fingerprints that key the activation cache: canonical-JSON hashes, model weights by
content (local) or by revision (hub), tokenizers by their serialized vocabulary and pipeline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 8 * 2**20


def content_hash(obj: Any) -> str:
    """sha256 hex digest of the canonical JSON of ``obj`` (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
_MODEL_CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")


def fingerprint_model(name_or_path: str, revision: str | None = None) -> str:
    """Identify model weights: a local directory by content, a hub id by ``id@revision``.

    For a local directory: sha256 over (relative name, size, sha256 of content) of its config and
    weight files (top level only), computed once per process while the files' sizes and modification
    times stay the same. ``revision`` is ignored for local directories.
    """
    root = Path(name_or_path).expanduser()
    if not root.is_dir():
        return f"{name_or_path}@{revision or 'main'}"
    files = sorted(
        p for p in root.iterdir()
        if p.is_file() and (p.name in _MODEL_CONFIG_FILES or p.name.endswith(_MODEL_FILE_SUFFIXES))
    )
    if not files:
        raise ValueError(f"{root} holds no config or weight files to fingerprint")
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    memo = (str(root.resolve()), stats)
    if memo not in _hashed:  # hash the weights once per process while the files stay unchanged
        _hashed[memo] = content_hash([[p.name, p.stat().st_size, file_sha256(p)] for p in files])
    return _hashed[memo]


_hashed: dict[tuple, str] = {}  # (folder, its files' names, sizes and mtimes) -> fingerprint_model


def fingerprint_tokenizer(tokenizer: Any) -> str:
    """sha256 of the tokenizer's class name, serialized vocab/merges/pipeline and special tokens.

    Fast tokenizers are serialized with ``backend_tokenizer.to_str()`` minus the runtime padding /
    truncation settings (which change whenever the tokenizer is called with ``padding=...``); slow
    ones by ``get_vocab()``.
    """
    state: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "special_tokens": getattr(tokenizer, "special_tokens_map", {}),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = json.loads(backend.to_str())
        serialized.pop("padding", None)
        serialized.pop("truncation", None)
        state["backend"] = serialized
    else:
        state["vocab"] = tokenizer.get_vocab()
    return content_hash(state)
