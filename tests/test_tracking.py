"""MLflow tracking: the run shape (pure functions), `RunLog` against a real `mlflow server` on 127.0.0.1
(continue-by-tag, step de-duplication, an outage survived through the buffer), and a whole study
logging through an outage. The kill-and-resume study with its MLflow checks is in test_tune.py."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ia2ray.tracking import RunLog, TrackingError, is_local_uri, open_experiment, replay_pending, resolve_uri
from ia2ray.tracking.server import free_port
from ia2ray.tracking.shape import flat_params, slug, split_metrics, step_metrics

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"


# -- the shape of a run ----------------------------------------------------------------------------
def test_flat_params_are_dotted_and_readable():
    tree = {"pipeline": "ia2->sft", "lora": {"rank": 8, "targets": ["q_proj", "v_proj"], "layers": None},
            "align": {"layers": "band:0:2", "weights": [0.5, 1.0]}, "lr": {"align": 1e-4}, "extra": {}}
    assert flat_params(tree) == {
        "pipeline": "ia2->sft", "lora.rank": "8", "lora.targets": '["q_proj", "v_proj"]', "lora.layers": "null",
        "align.layers": "band:0:2", "align.weights": "[0.5, 1.0]", "lr.align": "0.0001", "extra": "{}"}
    assert len(flat_params({"x": "a" * 7000})["x"]) == 6000


def test_stage_metrics_split_metrics_and_slugs():
    assert step_metrics("align", {"step": 3, "train_loss": 0.5}) == [("align/loss", 0.5, 3)]
    assert step_metrics("sft", {"step": 4, "dev_loss": 1.25}) == [("sft/dev_loss", 1.25, 4)]
    summary = {"val": {"acc": 0.75, "ece": 0.1, "n": 8, "ece_bins": 10, "nll": float("nan"), "confidence": "prob",
                       "reliability": [{"conf": 0.5}]}, "test": {"acc": 1, "draws": 2}}
    assert split_metrics(summary, ("val", "test")) == {"val/acc": 0.75, "val/ece": 0.1, "test/acc": 1.0}
    assert slug("IA2 -> SFT") == "IA2-SFT" and slug("best-1") == "best-1"


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_uri("none", tmp_path) is None and resolve_uri("None", tmp_path) is None
    assert resolve_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("sqlite:///rel/m.db", Path("/x")) == f"sqlite:///{tmp_path / 'rel' / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_uri(None, tmp_path) == "http://tracking:5000"
    assert resolve_uri("http://other:1", tmp_path) == "http://other:1"  # the flag beats the environment
    for bad in ("/some/folder", "file:///some/folder"):
        with pytest.raises(ValueError, match="refuses folder"):
            resolve_uri(bad, tmp_path)
    assert is_local_uri("sqlite:////a/b.db") and not is_local_uri("http://host:5000")


def test_multi_node_study_needs_a_server():
    from ia2ray.study.cluster import ClusterShape, tracking_errors

    one, three = ClusterShape(1, 1), ClusterShape(3, 3)
    assert tracking_errors("sqlite:////s/mlflow.db", one) == []
    assert tracking_errors("http://mlflow:5000", three) == []
    assert tracking_errors(None, three) == []
    (err,) = tracking_errors("sqlite:////s/mlflow.db", ClusterShape(2, 1))
    assert "2 nodes" in err and "mlflow server" in err and "--tracking-uri" in err
    (err,) = tracking_errors("sqlite:////s/mlflow.db", ClusterShape(1, 1, ["gpu1"]))
    assert "autoscaler can add nodes of type gpu1" in err
    # a server on the loopback address: fine while every node is on this machine, refused across machines
    assert tracking_errors("http://127.0.0.1:5000", ClusterShape(2, 1)) == []
    for uri in ("http://127.0.0.1:5000", "http://localhost:5000"):
        (err,) = tracking_errors(uri, ClusterShape(3, 2))
        assert "spans 2 machines" in err and "loopback" in err
    (err,) = tracking_errors("http://127.0.0.1:5000", ClusterShape(1, 1, ["gpu8"]))
    assert "autoscaler can add nodes" in err and "loopback" in err


# -- RunLog against a real server ------------------------------------------------------------------
def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(url)


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_runlog_continues_its_run_and_logs_each_step_once(mlflow_server, tmp_path):
    exp = open_experiment(mlflow_server, "runlog-continue")
    assert open_experiment(mlflow_server, "runlog-continue") == exp  # found, not created twice
    key = {"ia2ray.study_id": "s1", "ia2ray.trial_key": "t1"}
    (tmp_path / "config.yaml").write_text("lora:\n  rank: 8\n")
    first = RunLog(mlflow_server, exp, key, {"ia2ray.task": "toy"}, run_name="trial-t1")
    first.log_params({"lora.rank": "8"})
    first.log_metrics([("align/loss", 1.0 / s, s) for s in range(1, 6)])
    first.log_artifact(tmp_path / "config.yaml")
    assert first.close() == [] and not first.resumed  # killed here: the run stays RUNNING

    again = RunLog(mlflow_server, exp, key, {"ia2ray.task": "toy"}, run_name="trial-t1")
    with again.running():
        again.log_params({"lora.rank": "8"})  # same value again: skipped
        # the resumed trial replays its whole history (steps 1..8; 1..5 are already logged)
        again.log_metrics([("align/loss", 1.0 / s, s) for s in range(1, 9)] + [("val/acc", 0.75, 0)])
    assert again.resumed and again.run_id == first.run_id and again.unlogged == []
    client = _client(mlflow_server)
    runs = client.search_runs([exp])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert _history(client, first.run_id, "align/loss") == [(s, 1.0 / s) for s in range(1, 9)]
    assert runs[0].data.params == {"lora.rank": "8"} and runs[0].data.metrics["val/acc"] == 0.75
    assert runs[0].data.tags["ia2ray.task"] == "toy" and runs[0].info.run_name == "trial-t1"
    assert [a.path for a in client.list_artifacts(first.run_id)] == ["config.yaml"]


def test_runlog_failure_ends_failed_with_the_error(mlflow_server):
    exp = open_experiment(mlflow_server, "runlog-failed")
    run = RunLog(mlflow_server, exp, {"ia2ray.study_id": "s", "ia2ray.trial_key": "bad"})
    with pytest.raises(FloatingPointError):
        with run.running():
            raise FloatingPointError("loss is nan at step 3")
    got = _client(mlflow_server).get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["ia2ray.error"] == "FloatingPointError: loss is nan at step 3"
    # run again and succeed: the same run, FINISHED, and the old error no longer stands
    again = RunLog(mlflow_server, exp, {"ia2ray.study_id": "s", "ia2ray.trial_key": "bad"})
    with again.running():
        again.log_metrics([("val/acc", 0.5, 0)])
    got = _client(mlflow_server).get_run(run.run_id)
    assert again.run_id == run.run_id and got.info.status == "FINISHED" and "ia2ray.error" not in got.data.tags


class Gate:
    """A TCP forwarder on its own port: closed (connections refused, MLflow unreachable) until
    `open()`, then it relays to the real server; `close()` makes it unreachable again."""

    def __init__(self, target_url: str):
        self.target = ("127.0.0.1", int(target_url.rsplit(":", 1)[1]))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.listener = None
        self.conns: list[socket.socket] = []

    def open(self):
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def close(self):
        self.listener.close()
        self.listener = None
        for conn in self.conns:  # open keep-alive connections die too
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns = []

    def _accept(self, listener):
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if self.listener is not listener:
                conn.close()
                return
            upstream = socket.create_connection(self.target)
            self.conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_runlog_buffers_while_mlflow_is_down_and_replays_later(mlflow_server, tmp_path, caplog):
    exp = open_experiment(mlflow_server, "runlog-outage")
    gate = Gate(mlflow_server)  # closed: MLflow is unreachable through it
    run = RunLog(gate.url, exp, {"ia2ray.study_id": "s", "ia2ray.trial_key": "down"}, run_name="trial-down")
    with caplog.at_level(logging.WARNING, logger="ia2ray.tracking.runlog"):
        run.log_params({"lora.rank": "4"})
        run.log_metrics([("align/loss", 0.5, 1), ("align/loss", 0.25, 2)])
        run.end("FINISHED")
        lines = run.close(tmp_path / "pending.json", tries=2)
    warnings = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 1 and "1 operation(s) buffered" in warnings[0].getMessage()  # warned once
    assert lines == ["params (1) (buffered; MLflow unreachable)", "metrics (2) (buffered; MLflow unreachable)",
                     "status FINISHED (buffered; MLflow unreachable)", f"kept in {tmp_path / 'pending.json'}"]
    assert json.loads((tmp_path / "pending.json").read_text())["run_name"] == "trial-down"
    left, waiting = replay_pending([tmp_path / "pending.json"])  # still down: reported again, file kept
    assert left and waiting == set() and (tmp_path / "pending.json").is_file()  # (the run was never created)

    gate.open()  # MLflow is back
    try:
        assert replay_pending([tmp_path / "pending.json"]) == ([], set())
    finally:
        gate.close()
    assert not (tmp_path / "pending.json").exists()
    client = _client(mlflow_server)
    (got,) = client.search_runs([exp])
    assert got.info.status == "FINISHED" and got.data.params == {"lora.rank": "4"}
    assert _history(client, got.info.run_id, "align/loss") == [(1, 0.5), (2, 0.25)]


def test_what_mlflow_refuses_is_reported_once_at_the_end(mlflow_server, tmp_path):
    exp = open_experiment(mlflow_server, "runlog-refused")
    run = RunLog(mlflow_server, exp, {"ia2ray.study_id": "s", "ia2ray.trial_key": "r"})
    run.log_params({"lora.rank": "8"})
    run.log_params({"lora.rank": "16"})  # a param cannot change
    run.log_artifact(tmp_path / "missing.png")
    lines = run.close(tmp_path / "pending.json")
    assert len(lines) == 2 and "lora.rank='16'" in lines[0] and "missing.png" in lines[1]
    left, waiting = replay_pending([tmp_path / "pending.json"])  # the study's end collects them
    assert [line.split(": ", 1)[1] for line in left] == lines and waiting == set()
    assert not (tmp_path / "pending.json").exists()


def test_study_end_replays_buffers_before_closing_runs_left_running(mlflow_server, tmp_path):
    """A trial that finished while MLflow was down ends FINISHED (its buffered ending is replayed first,
    no error tag); one whose buffer still cannot be sent stays as it is; one that was killed ends KILLED."""
    from ia2ray.study.driver import close_trial_runs

    exp = open_experiment(mlflow_server, "study-end")
    parent = RunLog(mlflow_server, exp, {"ia2ray.study_id": "e", "ia2ray.role": "study"})
    parent.flush(force=True)
    runs = {}
    for name in ("finished-offline", "still-offline", "killed"):
        runs[name] = RunLog(mlflow_server, exp, {"ia2ray.study_id": "e", "ia2ray.trial_key": name},
                            {"mlflow.parentRunId": parent.run_id}, run_name=name)
        runs[name].flush(force=True)
    for name in ("finished-offline", "still-offline"):  # MLflow went down before they ended
        runs[name].uri = f"http://127.0.0.1:{free_port()}"
        runs[name].log_metrics([("val/acc", 0.75, 0)])
        runs[name].end("FINISHED")
        runs[name].close(tmp_path / "runs" / name / "mlflow-pending.json", tries=1)
    state = json.loads((tmp_path / "runs" / "finished-offline" / "mlflow-pending.json").read_text())
    (tmp_path / "runs" / "finished-offline" / "mlflow-pending.json").write_text(
        json.dumps(state | {"uri": mlflow_server}))  # this one's server is back
    problems = close_trial_runs(tmp_path, {"uri": mlflow_server, "experiment_id": exp,
                                           "parent_run_id": parent.run_id})
    client = _client(mlflow_server)
    got = {name: client.get_run(run.run_id) for name, run in runs.items()}
    assert got["finished-offline"].info.status == "FINISHED" and "ia2ray.error" not in got["finished-offline"].data.tags
    assert got["finished-offline"].data.metrics == {"val/acc": 0.75}
    assert got["still-offline"].info.status == "RUNNING"  # its ending still waits in its file
    assert got["killed"].info.status == "KILLED" and "interrupted" in got["killed"].data.tags["ia2ray.error"]
    assert any("still-offline" in line for line in problems)
    assert (tmp_path / "runs" / "still-offline" / "mlflow-pending.json").is_file()
    assert not (tmp_path / "runs" / "finished-offline" / "mlflow-pending.json").exists()


def test_children_left_running_by_a_kill_are_closed_as_killed(mlflow_server):
    from ia2ray.tracking import close_orphans

    exp = open_experiment(mlflow_server, "runlog-orphans")
    parent = RunLog(mlflow_server, exp, {"ia2ray.study_id": "o", "ia2ray.role": "study"})
    parent.flush(force=True)
    done = RunLog(mlflow_server, exp, {"ia2ray.study_id": "o", "ia2ray.trial_key": "done"},
                  {"mlflow.parentRunId": parent.run_id})
    with done.running():
        pass
    lost = RunLog(mlflow_server, exp, {"ia2ray.study_id": "o", "ia2ray.trial_key": "lost"},
                  {"mlflow.parentRunId": parent.run_id})
    lost.flush(force=True)  # its process was killed: RUNNING
    assert close_orphans(mlflow_server, exp, parent.run_id, "interrupted") == 1
    client = _client(mlflow_server)
    assert client.get_run(lost.run_id).info.status == "KILLED"
    assert client.get_run(lost.run_id).data.tags["ia2ray.error"] == "interrupted"
    assert client.get_run(done.run_id).info.status == "FINISHED"
    assert client.get_run(parent.run_id).info.status == "RUNNING"  # only children are touched


def test_open_experiment_unreachable_is_a_tracking_error():
    with pytest.raises(TrackingError, match="MLflow at http://127.0.0.1:"):
        open_experiment(f"http://127.0.0.1:{free_port()}", "nowhere")


# -- whole studies -----------------------------------------------------------------------------------
def _study_runs(url: str, study_dir: Path):
    """(client, parent, children) of the study in `study_dir`, found by its id."""
    from ia2ray.study.records import study_runs

    client, runs = _client(url), study_runs(url, study_dir)
    parents = [r for r in runs if r.data.tags.get("ia2ray.role") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1  # every other run of the study is nested under its parent
    return client, parents[0], children


def test_unreachable_mlflow_at_the_start_stops_before_any_compute(ray_cluster, tmp_path, capsys):
    from ia2ray.tune import main

    storage = tmp_path / "studies"
    code = main(["--config", str(SMOKE), "--storage", str(storage), "--tracking-uri",
                 f"http://127.0.0.1:{free_port()}", "--set", "train.num_workers=0"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be reached" in err and "--tracking-uri none" in err
    assert not (storage / "smoke" / "study.json").exists() and not (storage / "smoke" / "activations").exists()


def test_a_study_survives_an_mlflow_outage_and_logs_everything_at_the_end(ray_cluster, mlflow_server, tmp_path,
                                                                          capsys):
    """MLflow goes down once the study run exists; trials train and finish regardless, their buffers
    wait in runs/*/mlflow-pending.json; MLflow comes back and the end of the study logs them."""
    import time

    from ia2ray.tune import main

    gate = Gate(mlflow_server)
    gate.open()
    storage = tmp_path / "studies"
    study_dir = storage / "smoke"
    state = {"closed": False, "reopened": False}

    def outage():
        deadline = time.time() + 300
        while time.time() < deadline and not (study_dir / "study.json").exists():
            time.sleep(0.05)
        gate.close()  # down from before the first trial starts
        state["closed"] = True
        while time.time() < deadline and not list(study_dir.glob("runs/*/mlflow-pending.json")):
            time.sleep(0.1)
        gate.open()  # back once a trial could not log everything
        state["reopened"] = True

    watcher = threading.Thread(target=outage, daemon=True)
    watcher.start()
    sets = ["train.num_workers=0", "study.num_trials=2", "study.confirm.baselines=[ia2->sft]"]
    try:
        code = main(["--config", str(SMOKE), "--storage", str(storage), "--tracking-uri", gate.url,
                     *[a for s in sets for a in ("--set", s)]])
        watcher.join(timeout=60)
    finally:
        if gate.listener is not None:
            gate.close()
    err = capsys.readouterr().err
    assert code == 0 and state == {"closed": True, "reopened": True}, err[-3000:]
    assert "MLflow: not logged" not in err
    assert not list(study_dir.glob("runs/*/mlflow-pending.json"))  # all replayed
    client, parent, children = _study_runs(mlflow_server, study_dir)
    assert parent.info.status == "FINISHED" and "ia2ray.error" not in parent.data.tags
    assert sorted(c.data.tags["ia2ray.phase"] for c in children) == ["confirm", "confirm", "search", "search"]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.params["lora.rank"] in ("2", "4", "8")
        assert "ia2ray.error" not in child.data.tags
        summary = json.loads((study_dir / "runs" / child.info.run_name / "summary.json").read_text())
        steps = [h["step"] for h in summary["history"] if h["stage"] == "align" and "train_loss" in h]
        assert [s for s, _ in _history(client, child.info.run_id, "align/loss")] == steps


def test_failed_trials_end_failed_with_the_error(ray_cluster, mlflow_server, tmp_path, capsys):
    """lr 1e30 makes the align loss non-finite: those trials' runs end FAILED with the error as a tag,
    the others FINISHED; Tune's bookkeeping (pid, timestamps, iterations) is not among the metrics."""
    from ia2ray.tune import main

    storage = tmp_path / "studies"
    sets = ["train.num_workers=0", "study.objective=scalar", "study.sampler=random", "study.num_trials=4",
            "study.confirm.baselines=[icl]", "search.params={lr.align: {kind: choice, values: [1.0e-3, 1.0e+30]}}"]
    assert main(["--config", str(SMOKE), "--storage", str(storage), "--tracking-uri", mlflow_server,
                 *[a for s in sets for a in ("--set", s)]]) == 0
    capsys.readouterr()
    _, parent, children = _study_runs(mlflow_server, storage / "smoke")
    search = [c for c in children if c.data.tags["ia2ray.phase"] == "search"]
    assert len(search) == 4
    for run in search:
        if run.data.params["lr.align"] == "1e+30":
            assert run.info.status == "FAILED" and "NonFiniteLossError" in run.data.tags["ia2ray.error"]
        else:
            assert run.info.status == "FINISHED" and "val/acc" in run.data.metrics
        assert all(k.split("/")[0] in ("align", "sft", "val", "time", "objective", "sim") for k in run.data.metrics)
    assert {r.data.params["lr.align"] for r in search if r.info.status == "FAILED"} == {"1e+30"}
    assert parent.info.status == "FINISHED" and "best-1/test/acc" in parent.data.metrics


MULTI_NODE = """
import os, subprocess, sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    out = subprocess.run([sys.executable, "-m", "ia2ray.tune", "--config", sys.argv[1], "--storage", sys.argv[2]],
                         env=dict(os.environ, RAY_ADDRESS=cluster.address), capture_output=True, text=True)
    print("exit", out.returncode)
    print(out.stderr)
finally:
    cluster.shutdown()
"""


def test_a_study_on_two_nodes_refuses_a_local_store(tmp_path):
    """A real 2-node Ray cluster (`ray.cluster_utils.Cluster`, in its own process): the default SQLite
    store is refused before anything is written, naming the node count."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", MULTI_NODE, str(SMOKE), str(tmp_path / "studies")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "exit 2" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert "the Ray cluster has 2 nodes" in out.stdout and "mlflow server" in out.stdout
    assert not (tmp_path / "studies").exists()
