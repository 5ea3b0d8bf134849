"""Checkpoint directories of a distributed stage run, and their completeness check.

A checkpoint directory holds:
- `state.pt` (rank 0): the consolidated, world-size-independent training state: the full fp32
  adapter, full Adam moments and step, the early-stopping record (with its best adapter), the
  position in the stage (stage index, epoch, batch, step), the stage histories so far, and the
  fingerprint of the job that wrote it;
- `rank-<r>.pt` (every rank): that rank's RNG states (restored when the world size is unchanged);
- `adapter/` (final checkpoint only, rank 0): the best adapter as a peft directory; the final
  checkpoint's state also holds the workers' evaluation (metrics, answers, where it ran);
- `COMPLETE.json` (rank 0, written last): format, world size, and the bytes and sha256 of `state.pt`.

Ray Train merges the ranks' directories into one. `verify` refuses a directory without the marker,
with a missing rank file, or whose `state.pt` does not match the marker: a checkpoint that was
expected but is incomplete is an error, never a silent fresh start.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

FORMAT = 2  # 2: the final checkpoint (`ckpt-<stages>-eval-end`) carries the evaluation
STATE, MARKER = "state.pt", "COMPLETE.json"


class CheckpointError(RuntimeError):
    """A checkpoint that should be resumed from is missing, incomplete, corrupt or from another job."""


_NAME = re.compile(r"^ckpt-(\d+)-[^/]*-(\d{6}|end)$")


def checkpoint_name(stage_index: int, stage: str, step: Optional[int]) -> str:
    """`ckpt-<stage index>-<stage>-<step>` mid-stage, `ckpt-<stage index>-<stage>-end` at its end."""
    return f"ckpt-{stage_index}-{stage}-{'end' if step is None else f'{step:06d}'}"


def progress(name: str) -> Optional[tuple[int, int]]:
    """Order of checkpoints by how far they got: (stages done, steps into the next); None if not ours."""
    m = _NAME.match(name)
    if not m:
        return None
    index, step = int(m.group(1)), m.group(2)
    return (index + 1, 0) if step == "end" else (index, int(step))


def latest_complete(run_dir: Path) -> Optional[Path]:
    """The furthest checkpoint in a local run folder that passes `verify` (Ray may not have registered
    it if the run died between upload and registration); None when there is none."""
    if not run_dir.is_dir():
        return None
    found = sorted((progress(d.name), d) for d in run_dir.iterdir() if d.is_dir() and progress(d.name))
    for _, d in reversed(found):
        try:
            verify(d)
            return d
        except CheckpointError as exc:  # an upload cut short: Ray never registered it either
            log.warning("skipping %s", exc)
    return None


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_rank_part(directory: Path, rank: int) -> None:
    torch.save(rng_state(), directory / rank_file(rank))


def write_state(directory: Path, state: dict, world_size: int) -> None:
    """Rank 0: the consolidated state, then the completion marker."""
    torch.save(state, directory / STATE)
    data = (directory / STATE).read_bytes()
    marker = {"format": FORMAT, "world_size": world_size,
              STATE: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    (directory / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")


def verify(directory: Path) -> bytes:
    """The bytes of `state.pt` of a complete checkpoint; CheckpointError naming what is missing otherwise."""
    marker_file = directory / MARKER
    try:
        marker = json.loads(marker_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: incomplete checkpoint ({MARKER} is missing)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{marker_file}: unreadable completion marker ({exc})") from None
    if marker.get("format") != FORMAT:
        raise CheckpointError(f"{marker_file}: format {marker.get('format')!r}, expected {FORMAT}")
    try:
        data = (directory / STATE).read_bytes()
    except OSError:
        raise CheckpointError(f"{directory / STATE}: missing from a checkpoint marked complete") from None
    want = marker.get(STATE, {})
    if len(data) != want.get("bytes") or hashlib.sha256(data).hexdigest() != want.get("sha256"):
        raise CheckpointError(f"{directory / STATE}: size or sha256 differs from {MARKER} (corrupt or truncated)")
    missing = [rank_file(r) for r in range(int(marker.get("world_size", 0))) if not (directory / rank_file(r)).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: incomplete checkpoint (missing {', '.join(missing)})")
    return data


def read_state(directory: Path, fingerprint: str) -> dict:
    """Verified state of a checkpoint written by the same job (same fingerprint)."""
    state = torch.load(io.BytesIO(verify(directory)), map_location="cpu", weights_only=True)  # read once
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{directory}: written by a different configuration (fingerprint {state.get('fingerprint')}, this "
            f"run {fingerprint}); give the run a new `name` or delete its train storage to start over")
    return state


def read_rank_part(directory: Path, rank: int) -> dict:
    return torch.load(directory / rank_file(rank), map_location="cpu", weights_only=True)
