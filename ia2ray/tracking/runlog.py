"""MLflow runs that survive crashes, resumes and an unreachable server.

A `RunLog` is one MLflow run named by its key tags (`ia2ray.study_id` plus `ia2ray.trial_key` or
`ia2ray.role`). It is found again by those tags after a restart, or created the first time, so a
resumed trial continues its own run instead of starting a second one. Everything logged goes through
a buffer of operations (tags, params, metrics with explicit steps, artifacts, status): when MLflow
cannot be reached the operations stay buffered, one warning is logged and the flush is retried with
backoff; training never waits on, or dies of, MLflow. Metric steps and params already in the run are
skipped, so replaying a resumed trial's history logs each step exactly once. What is still buffered
when the run closes is written to a JSON file that `replay_pending` retries later (the study driver
does at the end of a study) and reports.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ia2ray.fileio import write_json_atomic
from ia2ray.tracking.shape import tag

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
PENDING_FILE = "mlflow-pending.json"


class TrackingError(RuntimeError):
    """MLflow cannot be used as configured (checked before a study computes anything)."""


def resolve_uri(explicit: Optional[str], storage: Path) -> Optional[str]:
    """The tracking URI of a study: `--tracking-uri` / `study.tracking_uri`, else $MLFLOW_TRACKING_URI,
    else `sqlite:///<storage>/mlflow.db`; `none` turns tracking off (None). Relative SQLite paths are
    made absolute (trial drivers run in other working directories). Raises ValueError for a plain
    folder or `file:` store, which MLflow 3 refuses."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(storage) / DEFAULT_DB}"
    if uri.strip().lower() == "none":
        return None
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):]).expanduser()
        return f"sqlite:///{path if path.is_absolute() else Path.cwd() / path}"
    if "://" not in uri or uri.startswith("file:"):
        raise ValueError(f"tracking URI {uri!r}: MLflow 3 refuses folder (file) stores; give sqlite:///<path>.db or "
                         "an `mlflow server` URL (http://host:port), or `none`")
    return uri


def is_local_uri(uri: str) -> bool:
    """A store only this machine can write (SQLite or a folder), as opposed to an `mlflow server`."""
    return uri.split("://", 1)[0].lower() in ("sqlite", "file") or "://" not in uri


def _client(uri: str):
    # MLflow's HTTP client retries for minutes by default; the buffer retries instead
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_experiment(uri: str, name: str, artifact_location: Optional[str] = None) -> str:
    """The id of experiment `name` (created, or restored if deleted); TrackingError if MLflow fails."""
    try:
        client = _client(uri)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            return client.create_experiment(name, artifact_location=artifact_location)
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    except Exception as exc:  # noqa: BLE001 - any failure here means tracking is unusable
        raise TrackingError(f"MLflow at {uri}: {type(exc).__name__}: {exc}"[:2000]) from None


def _permanent(exc: Exception) -> bool:
    """MLflow refused the request itself (HTTP 4xx other than timeouts and rate limits: a bad value,
    no permission); retrying cannot help."""
    status = getattr(exc, "get_http_status_code", lambda: 500)()
    return 400 <= status < 500 and status not in (408, 429)


def describe(op: dict) -> str:
    kind = op["op"]
    if kind == "sync":
        return "sync"
    if kind == "artifact":
        return f"artifact {op['path']}"
    if kind == "status":
        return f"status {op['status']}"
    return f"{kind} ({len(op['data'])})"


class RunLog:
    """One MLflow run, written through a retrying buffer. See the module docstring."""

    def __init__(self, uri: str, experiment_id: str, key: dict[str, str], tags: Optional[dict[str, str]] = None,
                 run_name: Optional[str] = None, flush_every_s: float = 5.0):
        if any("'" in str(v) or "`" in str(k) for k, v in key.items()):
            raise ValueError(f"run key {key}: quotes are not allowed in key tags (they go into a search filter)")
        self.uri, self.experiment_id, self.key = uri, experiment_id, dict(key)
        self.tags = {k: str(v) for k, v in {**self.key, **(tags or {})}.items() if v is not None}
        self.run_name, self.flush_every_s = run_name, flush_every_s
        self.run_id: Optional[str] = None
        self.resumed = False  # an existing run was found by its key tags
        self.pending: list[dict] = []
        self.dropped: list[str] = []  # operations MLflow refused: reported, never retried
        self._steps: dict[str, set[int]] = {}  # metric steps already in the run
        self._params: dict[str, str] = {}
        self._last_flush = self._retry_at = 0.0
        self._failures = 0
        self._warned = False
        self.unlogged: list[str] = []  # what `running` could not log (after its close)

    # -- what callers log ------------------------------------------------------------------------
    def set_tags(self, tags: dict) -> None:
        self._add({"op": "tags", "data": {k: str(v) for k, v in tags.items()}})

    def log_params(self, params: dict[str, str]) -> None:
        self._add({"op": "params", "data": {k: str(v) for k, v in params.items()}})

    def log_metrics(self, items: list[tuple[str, float, int]]) -> None:
        """(key, value, step) triples; a (key, step) already in the run is skipped."""
        now = int(time.time() * 1000)
        rows = [[k, float(v), int(s), now] for k, v, s in items]
        if self.pending and self.pending[-1]["op"] == "metrics":
            self.pending[-1]["data"].extend(rows)
            self.flush(urgent=False)
        else:
            self._add({"op": "metrics", "data": rows}, urgent=False)

    def sync(self) -> None:
        """Re-read the steps already in the run before the next metrics (another process, e.g. a
        Ray Train worker logging live, may have logged some)."""
        self._add({"op": "sync"}, urgent=False)

    def log_artifact(self, path: str | Path, dest: Optional[str] = None) -> None:
        """A file or a folder (its contents under `dest`), read when the buffer flushes."""
        self._add({"op": "artifact", "path": str(path), "dest": dest})

    def end(self, status: str = "FINISHED", error: Optional[str] = None) -> None:
        if error:
            self.set_tags({tag("error"): error[:7000]})
        self._add({"op": "status", "status": status})

    @contextmanager
    def running(self, pending_file: Optional[Path] = None) -> Iterator["RunLog"]:
        """Ends the run FINISHED, FAILED (error tag) on an exception or KILLED on an interrupt, then
        closes it: what stays buffered goes to `pending_file`, what was not logged to `unlogged`."""
        try:
            yield self
        except Exception as exc:
            self.end("FAILED", f"{type(exc).__name__}: {exc}")
            raise
        except BaseException:
            self.end("KILLED", "interrupted")
            raise
        else:
            self.end("FINISHED")
        finally:
            self.unlogged = self.close(pending_file)
            for line in self.unlogged:
                log.warning("MLflow: not logged: %s", line)

    # -- the buffer ------------------------------------------------------------------------------
    def _add(self, op: dict, urgent: bool = True) -> None:
        self.pending.append(op)
        self.flush(urgent=urgent)

    def flush(self, force: bool = False, urgent: bool = True) -> bool:
        """Send what is buffered (a forced flush also finds or creates the run); False, keeping it all,
        when MLflow fails. Unless `force`, waits out the retry backoff, and non-urgent (metric) flushes
        wait `flush_every_s`."""
        if not self.pending and (self.run_id is not None or not force):
            return True
        now = time.monotonic()
        if not force and (now < self._retry_at or (not urgent and now - self._last_flush < self.flush_every_s)):
            return False
        try:
            client = _client(self.uri)
            if self.run_id is None:
                try:
                    self._attach(client)
                except Exception as exc:  # noqa: BLE001 - classified here
                    if not _permanent(exc):
                        raise
                    # MLflow refuses to find or create the run (e.g. the experiment is gone): nothing can land
                    self.dropped += [f"{describe(op)}: {exc}"[:500] for op in self.pending]
                    log.warning("MLflow refused the run %s: %s", self.run_name or self.key, exc)
                    self.pending = []
                    return False
            while self.pending:
                try:
                    self._apply(client, self.pending[0])
                except Exception as exc:  # noqa: BLE001 - classified below
                    if not _permanent(exc):
                        raise
                    op = self.pending[0]
                    self.dropped.append(f"{describe(op)}: {exc}"[:500])
                    log.warning("MLflow refused %s of run %s: %s", describe(op), self.run_id, exc)
                self.pending.pop(0)
        except Exception as exc:  # noqa: BLE001 - unreachable or failing server: buffer and retry
            self._failures += 1
            self._retry_at = now + min(60.0, 2.0 ** self._failures)
            if not self._warned:
                log.warning("MLflow at %s failed (%s: %s); %d operation(s) buffered, retrying", self.uri,
                            type(exc).__name__, str(exc)[:300], len(self.pending))
                self._warned = True
            return False
        if self._warned:
            log.warning("MLflow at %s reachable again; buffered operations of run %s logged", self.uri, self.run_id)
            self._warned = False
        self._last_flush, self._failures = now, 0
        return True

    def _attach(self, client) -> None:
        """Find the run by its key tags (continue it) or create it."""
        from mlflow.entities import RunTag

        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in self.key.items())
        found = client.search_runs([self.experiment_id], where, max_results=10, order_by=["attributes.start_time ASC"])
        if not found:
            run = client.create_run(self.experiment_id, tags=self.tags, run_name=self.run_name)
            self.run_id = run.info.run_id
            return
        if len(found) > 1:
            log.warning("MLflow: %d runs carry the tags %s; continuing the oldest", len(found), self.key)
        run = found[0]
        self.run_id, self.resumed = run.info.run_id, True
        self._params = dict(run.data.params)
        self._read_steps(client, run)
        missing = [RunTag(k, v) for k, v in self.tags.items() if run.data.tags.get(k) != v]
        if missing:  # the run may have been created by another writer with fewer tags
            client.log_batch(self.run_id, tags=missing)
        if run.info.status != "RUNNING":  # an ended run continues: its old ending no longer holds
            if tag("error") in run.data.tags:
                client.delete_tag(self.run_id, tag("error"))
            client.update_run(self.run_id, status="RUNNING")

    def _read_steps(self, client, run) -> None:
        for key in run.data.metrics:
            self._steps[key] = {m.step for m in client.get_metric_history(self.run_id, key)}

    def _apply(self, client, op: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        if kind == "tags":
            items = [RunTag(k, v) for k, v in op["data"].items()]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, tags=items[i:i + 100])
        elif kind == "params":
            for k, v in op["data"].items():
                if k in self._params and self._params[k] != v:
                    self.dropped.append(f"param {k}={v!r}: the run already has {self._params[k]!r}")
            new = [Param(k, v) for k, v in op["data"].items() if k not in self._params]
            for i in range(0, len(new), 100):
                client.log_batch(self.run_id, params=new[i:i + 100])
                self._params.update((p.key, p.value) for p in new[i:i + 100])
        elif kind == "metrics":
            rows, seen = [], set()
            for k, v, step, ts in op["data"]:
                if step not in self._steps.get(k, ()) and (k, step) not in seen:
                    seen.add((k, step))
                    rows.append(Metric(k, v, ts, step))
            for i in range(0, len(rows), 1000):
                client.log_batch(self.run_id, metrics=rows[i:i + 1000])
                for m in rows[i:i + 1000]:
                    self._steps.setdefault(m.key, set()).add(m.step)
            op["data"] = []
        elif kind == "artifact":
            path = Path(op["path"])
            if not os.access(path, os.R_OK):
                self.dropped.append(f"artifact {path}: not readable here")
            elif path.is_dir():
                client.log_artifacts(self.run_id, str(path), op["dest"])
            elif path.is_file():
                client.log_artifact(self.run_id, str(path), op["dest"])
            else:
                self.dropped.append(f"artifact {path}: not a file or folder")
        elif kind == "sync":
            self._read_steps(client, client.get_run(self.run_id))
        elif kind == "status":
            if op["status"] == "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
            else:
                client.set_terminated(self.run_id, op["status"])

    # -- closing and replaying -------------------------------------------------------------------
    def state(self) -> dict:
        return {"uri": self.uri, "experiment_id": self.experiment_id, "key": self.key, "tags": self.tags,
                "run_name": self.run_name, "run_id": self.run_id, "pending": self.pending, "dropped": self.dropped}

    def target(self) -> dict:
        """What another process needs to log into the same run (`RunLog.from_state`)."""
        return {k: v for k, v in self.state().items() if k not in ("pending", "run_id", "dropped")}

    @classmethod
    def from_state(cls, state: dict) -> "RunLog":
        run = cls(state["uri"], state["experiment_id"], state["key"], state["tags"], state["run_name"])
        run.pending, run.dropped = state.get("pending", []), state.get("dropped", [])
        return run

    def close(self, pending_file: Optional[Path] = None, tries: int = 3) -> list[str]:
        """Flush (up to `tries` times); returns what could not be logged, one line per operation.
        Operations still buffered are written to `pending_file` for `replay_pending`, with the lines
        of what MLflow refused, so the study can report both at its end."""
        for attempt in range(tries):
            if self.flush(force=True):
                break
            if attempt < tries - 1:
                time.sleep(attempt + 1)
        lines = list(self.dropped)
        if self.pending:
            lines += [f"{describe(op)} (buffered; MLflow unreachable)" for op in self.pending]
        if pending_file is not None and lines:
            write_json_atomic(pending_file, self.state())
            if self.pending:
                lines.append(f"kept in {pending_file}")
        elif pending_file is not None:
            Path(pending_file).unlink(missing_ok=True)
        return lines


def replay_pending(files: list[Path]) -> tuple[list[str], set[str]]:
    """Retry the buffered operations of closed runs (their pending files) and collect what MLflow
    refused. A file is removed once everything in it is logged or reported; one whose operations
    still cannot be logged stays. Returns (what could not be logged, ids of the runs still waiting)."""
    problems, waiting = [], set()
    for path in files:
        state = json.loads(Path(path).read_text())
        run = RunLog.from_state(state)  # found again by its tags: steps already logged are skipped
        left = run.close(tries=1)
        problems += [f"{run.run_name or path}: {line}" for line in left]
        if run.pending:
            write_json_atomic(path, run.state() | {"dropped": [], "run_id": run.run_id or state.get("run_id")})
            if run.run_id or state.get("run_id"):
                waiting.add(run.run_id or state["run_id"])
        else:
            Path(path).unlink(missing_ok=True)
    return problems, waiting


def close_orphans(uri: str, experiment_id: str, parent_run_id: str, reason: str,
                  keep: frozenset[str] | set[str] = frozenset()) -> int:
    """Mark children of `parent_run_id` still RUNNING (their trials were killed and did not run again)
    KILLED, with `reason` as error tag and tag `ia2ray.superseded=true` (another run took the trial's
    place), except the runs in `keep` (their ending is still buffered); returns how many."""
    client = _client(uri)
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                              "attributes.status = 'RUNNING'", max_results=1000)
    runs = [r for r in runs if r.info.run_id not in keep]
    for run in runs:
        client.set_tag(run.info.run_id, tag("error"), reason)
        client.set_tag(run.info.run_id, tag("superseded"), "true")
        client.set_terminated(run.info.run_id, "KILLED")
    return len(runs)


def find_runs(uri: str, experiment: str, tags: dict[str, str], where: str = "",
              order_by: Optional[list[str]] = None) -> list:
    """Runs of the experiment named `experiment` whose ia2ray tags (`tag(key)`) have these values;
    `where` adds a filter clause; [] when there is no such experiment."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    clause = " and ".join([f"tags.`{tag(k)}` = '{v}'" for k, v in tags.items()] + ([where] if where else []))
    return client.search_runs([found.experiment_id], clause, max_results=1000, order_by=order_by)
