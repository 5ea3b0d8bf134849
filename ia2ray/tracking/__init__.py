"""MLflow tracking, a service the train and study layers call (it imports neither).

- `shape`: what a run looks like in MLflow (flat params, metric names, tags), pure functions.
- `runlog`: `RunLog`, one MLflow run written through a buffer that survives an unreachable server,
  found again by its tags after a restart; `open_experiment`, `resolve_uri`, `replay_pending`.
- `server`: a local `mlflow server` on 127.0.0.1 (tests, benchmarks).
"""

from ia2ray.tracking.runlog import (
    RunLog,
    TrackingError,
    close_orphans,
    find_runs,
    is_local_uri,
    open_experiment,
    replay_pending,
    resolve_uri,
)

__all__ = ["RunLog", "TrackingError", "close_orphans", "find_runs", "is_local_uri", "open_experiment", "replay_pending",
           "resolve_uri"]
