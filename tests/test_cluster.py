"""Studies on real Ray clusters (marked `cluster`: `python -m pytest -m cluster`, ~10 min; CI runs them
after the default suite):

- `ray job submit --working-dir . -- python -m ia2ray.tune` against a `ray start --head` with token auth;
- Ray's fake multi-node autoscaler (cluster/fake-multinode.yaml) adding nodes for trials and removing
  them when idle;
- a spot-style node loss mid-training (`ray.cluster_utils.Cluster`) resumed from the last checkpoint;
- in both, trial drivers on one node type and Train workers on another: evaluation runs on the workers'
  node and the drivers load no weights;
- a study in an S3 bucket (a local moto server) with trials on another node, each node working in
  its own local copy, resumed from the bucket alone.

Each test starts and tears down its own cluster in other processes, beside the session's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rayhead import VENV_BIN, RayHead

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "search_spaces/smoke.yaml"
pytestmark = pytest.mark.cluster


def _summaries(study: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(study.glob("runs/*/summary.json"))}


def _nodes(head: RayHead) -> list[dict]:
    out = subprocess.run([str(VENV_BIN / "ray"), "list", "nodes", "--detail", "--format", "json", "--limit", "100",
                          f"--address={head.address}"], env=head.env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _job_info(head: RayHead, submission_id: str) -> dict:
    import urllib.request

    token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(f"{head.dashboard}/api/jobs/{submission_id}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_ray_job_submit_runs_the_smoke_study(tmp_path, mlflow_server, ia2ray_home):
    """`ray job submit --working-dir . -- python -m ia2ray.tune --config search_spaces/smoke.yaml` against a
    local head whose job server listens on 127.0.0.1 and requires the token: SUCCEEDED, the report,
    and every MLflow run FINISHED."""
    from ia2ray.study.records import study_runs

    head = RayHead(num_cpus=2, extra_env={"IA2RAY_HOME": str(ia2ray_home)})
    try:
        head.wait_ready()
        storage = tmp_path / "studies"
        entry = ["python", "-m", "ia2ray.tune", "--config", SMOKE, "--storage", str(storage),
                 "--tracking-uri", mlflow_server]
        no_token = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", head.dashboard],
                                 env=no_token, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0  # the job server refuses a client without the token
        assert "token" in (refused.stdout + refused.stderr).lower(), refused.stdout[-2000:] + refused.stderr[-2000:]
        out = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".",
                              "--submission-id", "smoke-1", "--", *entry], cwd=ROOT, env=head.env, capture_output=True,
                             text=True, timeout=900)
        tail = out.stdout[-3000:] + out.stderr[-3000:]
        assert out.returncode == 0, tail
        job = _job_info(head, "smoke-1")  # the job server's REST API, with the token
        assert job["status"] == "SUCCEEDED" and job["entrypoint"] == " ".join(entry), job
        study = storage / "smoke"
        assert (study / "report.md").is_file() and (study / "report.csv").is_file(), tail
        runs = study_runs(mlflow_server, study)
        assert {r.info.status for r in runs} == {"FINISHED"}
        roles = sorted(r.data.tags.get("ia2ray.phase", r.data.tags.get("ia2ray.role")) for r in runs)
        # 1 study run, 3 search trials, confirmation: top 1 + baselines icl and ia2->sft, one seed
        assert roles == ["confirm"] * 3 + ["search"] * 3 + ["study"], roles
    finally:
        head.stop()
    assert head.processes() == []


# trial drivers on `trial_driver` nodes, Train workers on `trainer` nodes, confirmation: the ICL row only
PLACED = ["--set", "study.driver_resources={trial_driver: 1}", "--set", "train.worker_resources={trainer: 1}",
          "--set", "study.confirm.top_k=0", "--set", "study.confirm.baselines=[icl]"]
FAKE_STUDY = [*PLACED, "--set", "study.max_concurrent=2", "--set", "study.num_trials=2"]


def test_fake_autoscaler_adds_nodes_for_trials_and_removes_them_when_idle(tmp_path, ia2ray_home):
    """The head has 1 CPU and neither `trial_driver` nor `trainer`: the autoscaler must add a `driver`
    node for the trial drivers and `trainer` nodes for the Ray Train workers; trials run there (node
    ids in the summaries); once idle the nodes are removed."""
    head = RayHead(num_cpus=1, port=6379, autoscaling_config=str(ROOT / "cluster" / "fake-multinode.yaml"),
                   extra_env={"RAY_FAKE_CLUSTER": "1", "IA2RAY_HOME": str(ia2ray_home)})
    try:
        head.wait_ready()
        (only_head,) = _nodes(head)
        storage = tmp_path / "studies"
        # a head made by the cluster launcher (~/ray_bootstrap_config.yaml lists the node types that can
        # join): a local folder is refused before anything starts
        launcher_home = tmp_path / "home"
        launcher_home.mkdir()
        (launcher_home / "ray_bootstrap_config.yaml").write_text((ROOT / "cluster" / "aws.yaml").read_text())
        refused = subprocess.run([sys.executable, "-m", "ia2ray.tune", "--config", SMOKE, "--storage", str(storage),
                                  "--tracking-uri", "none", *FAKE_STUDY], cwd=ROOT,
                                 env={**head.client_env, "HOME": str(launcher_home)}, capture_output=True, text=True,
                                 timeout=300)
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert "the autoscaler can add nodes of type driver, gpu1, gpu8" in refused.stderr
        assert "--storage / study.storage" in refused.stderr and not storage.exists()
        out = subprocess.run([sys.executable, "-m", "ia2ray.tune", "--config", SMOKE, "--storage", str(storage),
                              "--tracking-uri", "none", *FAKE_STUDY], cwd=ROOT, env=head.client_env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        nodes = _nodes(head)
        kinds = {n["node_id"]: ("head" if n["is_head_node"] else "driver" if "trial_driver" in n["resources_total"]
                                else "trainer" if "trainer" in n["resources_total"] else "?") for n in nodes}
        assert kinds[only_head["node_id"]] == "head"
        assert list(kinds.values()).count("driver") >= 1 and list(kinds.values()).count("trainer") >= 1, kinds

        runs = _summaries(storage / "smoke")
        search = {k: v for k, v in runs.items() if v["phase"] == "search"}
        assert len(search) == 2 and len(runs) == 3
        for name, summary in runs.items():  # every trial driver ran on a driver node
            assert kinds[summary["driver_node"]] == "driver", name
        for name, summary in search.items():  # every Train worker on a trainer node
            assert [kinds[s["placement"]["node_id"]] for s in summary["stages"]] == ["trainer", "trainer"], name
        for name, summary in runs.items():  # evaluation (the ICL row's too) where the workers are; no driver loads
            assert kinds[summary["eval_node"]] == "trainer" and summary["driver_model_loads"] == 0, name
            assert summary["model_loads"] == 1, name

        deadline = time.time() + 180  # idle_timeout_minutes 0.25, then the autoscaler's next updates
        while True:
            alive = [n["node_id"] for n in _nodes(head) if n["state"] == "ALIVE"]
            status = subprocess.run([str(VENV_BIN / "ray"), "status", f"--address={head.address}"], env=head.env,
                                    capture_output=True, text=True, timeout=120).stdout
            active = status.split("Active:")[-1].split("Pending:")[0].split()
            if (alive == [only_head["node_id"]] and active == ["1", "ray.head.default"]) or time.time() > deadline:
                break
            time.sleep(5)
        assert alive == [only_head["node_id"]], alive  # the state API: every added node is dead
        assert active == ["1", "ray.head.default"], status  # the autoscaler: only the head is active
    finally:
        head.stop()
    assert head.processes() == []


PREEMPT = """
import json, os, subprocess, sys, time
from pathlib import Path
from ray.cluster_utils import Cluster

config, storage, placed = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"trial_driver": 1}})
spot = cluster.add_node(num_cpus=1, resources={"trainer": 1})
cluster.wait_for_nodes()
args = [*placed, "--set", "train.max_failures=2", "--set", "study.num_trials=1", "--set", "train.max_epochs=60",
        "--set", "train.patience=100", "--set", "train.checkpoint_every=2"]
study = subprocess.Popen([sys.executable, "-m", "ia2ray.tune", "--config", config, "--storage", str(storage),
                          "--tracking-uri", "none", *args], env=dict(os.environ, RAY_ADDRESS=cluster.address),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
report = {"spot": spot.node_id}
try:
    deadline = time.time() + 600
    while time.time() < deadline and study.poll() is None:
        done = sorted(storage.glob("smoke/train/trial-*/ckpt-0-align-0*/COMPLETE.json"))
        if done:  # a mid-stage checkpoint of the align stage exists: the spot node goes away now
            report["killed_after"] = str(done[-1].parent.name)
            cluster.remove_node(spot, allow_graceful=False)
            replacement = cluster.add_node(num_cpus=1, resources={"trainer": 1})
            report["replacement"] = replacement.node_id
            break
        time.sleep(0.05)
    logs, _ = study.communicate(timeout=900)
    report["exit"] = study.returncode
    report["log"] = logs[-6000:]
finally:
    study.kill()
    cluster.shutdown()
print("REPORT " + json.dumps(report))
"""


def test_a_lost_worker_node_resumes_from_the_last_checkpoint(tmp_path, ia2ray_home):
    """Spot preemption: the node of the trial's Ray Train worker is killed after the align stage's
    first mid-stage checkpoint; with train.max_failures the worker group restarts on a new node,
    resumes from that checkpoint (not from step 0), and the study finishes."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["IA2RAY_HOME"] = str(ia2ray_home)
    out = subprocess.run([sys.executable, "-c", PREEMPT, SMOKE, str(tmp_path / "studies"), *PLACED], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert "killed_after" in report and report["exit"] == 0, report
    (summary,) = [s for s in _summaries(tmp_path / "studies" / "smoke").values() if s["phase"] == "search"]
    align, sft = summary["stages"]
    # the align stage finished on the replacement node, resumed from a checkpoint after step 0
    assert align["placement"]["node_id"] == report["replacement"] != report["spot"]
    assert align["placement"]["resumed_at_step"] >= 2, align["placement"]
    assert sft["placement"]["node_id"] == report["replacement"]
    # the trial driver (on the head) loaded no weights; the replacement worker loaded them and evaluated
    assert summary["driver_node"] != report["replacement"] and summary["driver_model_loads"] == 0
    assert summary["eval_node"] == report["replacement"]
    steps = [h["step"] for h in summary["history"] if h["stage"] == "align" and "train_loss" in h]
    assert steps == sorted(set(steps)) and steps[0] == 1, steps  # no step twice, none missing at the start


BUCKET = """
import json, os, shutil, subprocess, sys
from pathlib import Path
from ray.cluster_utils import Cluster
from ia2ray import mirror

config, storage, copies, placed = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4:]
study_uri = storage + "/smoke"
# every node keeps its local copies apart, as on separate machines
cluster = Cluster(initialize_head=True,
                  head_node_args={"num_cpus": 1, "env_vars": {"IA2RAY_MIRROR": str(copies / "head")}})
worker = cluster.add_node(num_cpus=2, resources={"trial_driver": 1, "trainer": 1},
                          env_vars={"IA2RAY_MIRROR": str(copies / "worker")})
cluster.wait_for_nodes()
env = dict(os.environ, RAY_ADDRESS=cluster.address, IA2RAY_MIRROR=str(copies / "driver"))
args = [*placed, "--set", "study.num_trials=2", "--set", "study.confirm.top_k=1"]  # ICL and best-1
report = {"head": cluster.head_node.node_id, "worker": worker.node_id, "runs": []}
try:
    for extra in ([], ["--resume"]):
        out = subprocess.run([sys.executable, "-m", "ia2ray.tune", "--config", config, "--storage", storage,
                              "--tracking-uri", "none", *args, *extra], env=env, capture_output=True, text=True,
                             timeout=900)
        (copies / f"study-{len(report['runs'])}.log").write_text(out.stdout + out.stderr)
        report["runs"].append({"exit": out.returncode, "log": (out.stdout + out.stderr)[-5000:],
                               "train": sorted(mirror._remote_files(study_uri, "train")),
                               "study": json.loads(mirror.read_text(study_uri + "/study.json")),
                               "errors": json.loads(mirror.read_text(study_uri + "/timings.json"))["errors"]})
        if out.returncode:
            break
        if not extra:  # the resumed study has only the bucket to go on
            shutil.rmtree(copies / "driver")
finally:
    cluster.shutdown()
print("REPORT " + json.dumps(report))
"""


def test_a_bucket_study_runs_across_nodes_and_resumes_from_the_bucket(tmp_path, ia2ray_home, s3):
    """`--storage s3://...` with trial drivers and Train workers on another node than the study driver,
    every node in its own local copy (IA2RAY_MIRROR per node): the study finishes, every result is in
    the bucket, and `--resume` from an empty local copy restores the finished study without training."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["IA2RAY_HOME"] = str(ia2ray_home)
    storage, copies = f"s3://{s3.bucket}/studies", tmp_path / "copies"
    out = subprocess.run([sys.executable, "-c", BUCKET, SMOKE, storage, str(copies), *PLACED], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=2400)
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    first, resumed = report["runs"]
    assert first["exit"] == 0 and resumed["exit"] == 0, report
    assert first["errors"] == [] and resumed["errors"] == [], (first["errors"], resumed["errors"])
    assert f"report: {storage}/smoke/report.md" in resumed["log"]

    from ia2ray import mirror

    uri = f"{storage}/smoke"
    files = mirror._remote_files(uri, "")
    summaries = {name.split("/")[1]: json.loads(mirror.read_text(f"{uri}/{name}")) for name in files
                 if name.startswith("runs/") and name.endswith("/summary.json")}
    assert sorted(s["phase"] for s in summaries.values()) == ["confirm", "confirm", "search", "search"]
    for name, summary in summaries.items():  # every trial ran on the worker node, not the study driver's
        assert summary["driver_node"] == report["worker"] != report["head"], name
        assert all(stage["placement"]["node_id"] == report["worker"] for stage in summary.get("stages", []))
    assert {"study.json", "optuna.db", "report.md", "report.csv", "teacher.jsonl", "timings.json"} <= set(files)
    keys = {name.split("/")[1] for name in files if name.startswith("activations/") and name.endswith("manifest.json")}
    assert len(keys) == 4  # the two sites of the smoke study, each with its training and validation-rows teacher

    # the worker node's copy: the trials' own folders, and the teacher entries it fetched
    worker = copies / "worker" / "s3" / s3.bucket / "studies" / "smoke"
    assert {p.parent.name for p in worker.glob("runs/*/summary.json")} == set(summaries)
    assert {p.parent.name for p in worker.glob("activations/*/manifest.json")} <= keys
    assert (worker / "activations").is_dir()
    # the study driver's copy, rebuilt from the bucket by --resume: no Tune or Train folders in it
    driver = copies / "driver" / "s3" / s3.bucket / "studies" / "smoke"
    assert (driver / "optuna.db").is_file() and (driver / "report.md").is_file()
    assert {p.parent.name for p in driver.glob("runs/*/summary.json")} == set(summaries)
    assert not (driver / "train").exists() and not (driver / "search").exists()

    # the resume found everything finished: same study id, no new checkpoint, teacher from the bucket
    assert resumed["study"]["study_id"] == first["study"]["study_id"]
    assert resumed["train"] == first["train"] and any("/ckpt-" in name for name in first["train"])
    captures = [json.loads(line) for line in mirror.read_text(f"{uri}/teacher.jsonl").splitlines()]
    assert [c["computed"] for c in captures] == [True, True, False, False]
