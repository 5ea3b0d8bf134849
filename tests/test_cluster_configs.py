"""The cluster configs in cluster/: each parses, opens with the command that runs it, passes Ray's own schema
(launcher configs) or the KubeRay shape ia2ray needs, and every documented `python -m ia2ray.tune` command
parses, loads its study file and asks only for custom resources that its cluster provides.

Pure parsing: no Ray cluster, no cloud, no network. Every *.yaml under cluster/ is picked up by a glob.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ia2ray.config.load import load_study_file
from ia2ray.tune import build_parser

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
README = CLUSTER / "README.md"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))

# The command on the first line of a config, by what the config is.
RUN_COMMANDS = ("ray up ", "kubectl apply ", "RAY_FAKE_CLUSTER=1 ray start ")
CLOUD = {"aws.yaml": "aws", "gcp.yaml": "gcp"}  # launcher configs of real clouds (stricter checks)
BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
TUNE_CMD = re.compile(r"python -m ia2ray\.tune\b[^\n`]*")
SHARED = "/mnt/ia2ray"


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def header(path: Path) -> list[str]:
    """The leading comment block, without the '# '."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def is_launcher(path: Path) -> bool:
    docs = load_docs(path)
    return len(docs) == 1 and "available_node_types" in docs[0]


def is_kuberay(path: Path) -> bool:
    return any(str(doc.get("apiVersion", "")).startswith("ray.io/") for doc in load_docs(path))


LAUNCHERS = [p for p in YAMLS if is_launcher(p)]
CLOUDS = [p for p in LAUNCHERS if p.name in CLOUD]
KUBERAY = [p for p in YAMLS if is_kuberay(p)]
STORAGE = CLUSTER / "kuberay" / "storage.yaml"


def ids(paths: list[Path]) -> list[str]:
    return [rel(p) for p in paths]


# ---------------------------------------------------------------------------------------------- every file


def test_the_expected_configs_exist():
    names = set(ids(YAMLS))
    for expected in ("cluster/aws.yaml", "cluster/gcp.yaml", "cluster/fake-multinode.yaml",
                     "cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml", "cluster/kuberay/storage.yaml"):
        assert expected in names
    assert {p.name for p in CLOUDS} == set(CLOUD)
    assert {p.name for p in KUBERAY} == {"raycluster.yaml", "rayjob.yaml"}


@pytest.mark.parametrize("path", YAMLS, ids=ids(YAMLS))
def test_parses_and_opens_with_the_command_that_runs_it(path):
    assert load_docs(path), f"{rel(path)}: no YAML document"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{rel(path)}: the first line must be a comment with the command that runs it"
    command = first[2:]
    assert command.startswith(RUN_COMMANDS), f"{rel(path)}: {command!r} starts with none of {RUN_COMMANDS}"
    assert rel(path) in re.split(r"[\s=]", command), f"{rel(path)}: its first-line command {command!r} does not name it"
    assert len(header(path)) >= 2, f"{rel(path)}: a short comment header should explain the file"


# -------------------------------------------------------------------------------- cluster-launcher configs


def node_types(config: dict) -> dict:
    return config["available_node_types"]


def custom_resources(resources: dict) -> set[str]:
    return {name for name in resources if name not in BUILTIN_RESOURCES}


def driver_types(config: dict) -> list[str]:
    return [name for name, t in node_types(config).items() if "trial_driver" in t["resources"]]


def commands(config: dict, key: str) -> list[str]:
    return [str(c) for c in config.get(key) or []]


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_launcher_config_passes_rays_schema(path):
    from ray.autoscaler._private.util import validate_config

    validate_config(load_docs(path)[0])  # raises on a schema error


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_launcher_node_types(path):
    config = load_docs(path)[0]
    types = node_types(config)
    head = config["head_node_type"]
    assert head in types
    for name, t in types.items():
        assert isinstance(t.get("resources"), dict) and "CPU" in t["resources"], \
            f"{rel(path)}: node type {name} needs explicit resources (at least CPU)"
    assert types[head]["resources"].get("GPU", 0) == 0, f"{rel(path)}: the head runs no training"
    assert "trial_driver" not in types[head]["resources"]
    assert len(driver_types(config)) == 1, f"{rel(path)}: exactly one node type carries trial_driver"


@pytest.mark.parametrize("path", CLOUDS, ids=ids(CLOUDS))
def test_cloud_node_types(path):
    config = load_docs(path)[0]
    types, head = node_types(config), config["head_node_type"]
    assert not custom_resources(types[head]["resources"]), f"{rel(path)}: no custom resources on the head"
    assert types[head]["resources"].get("GPU") == 0, f"{rel(path)}: the head says GPU: 0"
    for name, t in types.items():
        assert "GPU" in t["resources"], f"{rel(path)}: node type {name} needs an explicit GPU count"

    (driver,) = driver_types(config)
    assert types[driver]["resources"]["GPU"] == 0
    assert types[driver].get("min_workers", 0) in (0, 1)
    node = types[driver]["node_config"]
    assert "InstanceMarketOptions" not in node, f"{rel(path)}: the driver type must be on-demand, not spot"
    scheduling = node.get("scheduling") or {}
    for item in scheduling if isinstance(scheduling, list) else [scheduling]:
        assert not item.get("preemptible"), f"{rel(path)}: the driver type must not be preemptible"
        assert item.get("provisioningModel") != "SPOT", f"{rel(path)}: the driver type must not be spot"

    gpu_types = {name: t for name, t in types.items() if t["resources"]["GPU"] > 0}
    assert {t["resources"]["GPU"] for t in gpu_types.values()} >= {1, 8}, f"{rel(path)}: 1-GPU and 8-GPU shapes"
    for name, t in gpu_types.items():
        assert t.get("min_workers", 0) == 0, f"{rel(path)}: GPU type {name} must scale from 0"
        assert t.get("max_workers", 0) >= 1
        assert not custom_resources(t["resources"]), f"{rel(path)}: trial drivers never land on {name}"


def ray_start(config: dict, key: str) -> list[str]:
    return [c for c in commands(config, key) if "ray start" in c]


@pytest.mark.parametrize("path", CLOUDS, ids=ids(CLOUDS))
def test_cloud_start_commands(path):
    config = load_docs(path)[0]
    (head_start,) = ray_start(config, "head_start_ray_commands")
    (worker_start,) = ray_start(config, "worker_start_ray_commands")
    assert "--head" in head_start and "--port=6379" in head_start
    assert "$RAY_HEAD_IP:6379" in worker_start
    assert "--dashboard-host=127.0.0.1" in head_start, f"{rel(path)}: the dashboard listens on localhost only"
    for command in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in command, f"{rel(path)}: token auth in {command!r}"
    for command in commands(config, "head_start_ray_commands") + commands(config, "worker_start_ray_commands"):
        assert "0.0.0.0" not in command, f"{rel(path)}: nothing binds 0.0.0.0: {command!r}"
    for line in path.read_text().splitlines():
        if "dashboard" in line:
            assert "0.0.0.0" not in line, f"{rel(path)}: {line!r}"
    # MLflow on the head's private IP, its URI in the env of the head's `ray start` (the job entrypoint's env)
    mlflow = [c for c in commands(config, "head_start_ray_commands") if "mlflow server" in c]
    assert len(mlflow) == 1, f"{rel(path)}: one MLflow server started on the head"
    for part in ("--port 5000", "--backend-store-uri sqlite:///" + SHARED + "/mlflow.db",
                 "--artifacts-destination " + SHARED + "/mlartifacts", "hostname -I"):
        assert part in mlflow[0], f"{rel(path)}: the MLflow server command lacks {part!r}"
    assert re.search(r"MLFLOW_TRACKING_URI=http://.+:5000;", head_start), head_start


def mount_targets(shell_commands: list[str]) -> set[str]:
    """The mount points of the `mount` (or `sudo mount`) commands in these shell lines."""
    targets = set()
    for line in shell_commands:
        for simple in re.split(r"&&|\|\||;|\(|\)", line):
            argv = shlex.split(simple)
            argv = argv[1:] if argv[:1] == ["sudo"] else argv
            if argv[:1] == ["mount"] and len(argv) >= 3:
                targets.add(argv[-1])
    return targets


@pytest.mark.parametrize("path", CLOUDS, ids=ids(CLOUDS))
def test_cloud_setup_storage_and_token(path):
    config = load_docs(path)[0]
    setup = commands(config, "setup_commands")
    assert SHARED in mount_targets(setup), f"{rel(path)}: every node mounts the shared storage at {SHARED} in setup"
    assert any("torch==2.13.0" in c for c in setup)
    mounts = config["file_mounts"]
    repo_remote = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert len(repo_remote) == 1, f"{rel(path)}: file_mounts syncs the checkout (`.`, `ray up` from the repo root)"
    installed = repo_remote[0].replace("/home/ubuntu", "~")
    assert any(f"pip install -e {installed}" in c or f"pip install -e {repo_remote[0]}" in c for c in setup)
    token = [(remote, local) for remote, local in mounts.items() if local.endswith(".ray/auth_token")]
    assert token and token[0][0].endswith("/.ray/auth_token"), f"{rel(path)}: copy ~/.ray/auth_token to every node"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("path", CLOUDS, ids=ids(CLOUDS))
def test_cloud_shell_commands_are_valid_bash(path):
    config = load_docs(path)[0]
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    for key in keys:
        for command in commands(config, key):
            result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert result.returncode == 0, f"{rel(path)} {key}: {command!r}: {result.stderr}"


# ------------------------------------------------------------------------------------------------- KubeRay


def kuberay_doc(path: Path) -> dict:
    (doc,) = [d for d in load_docs(path) if str(d.get("apiVersion", "")).startswith("ray.io/")]
    return doc


def cluster_spec(path: Path) -> dict:
    doc = kuberay_doc(path)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def group_resources(params: dict) -> dict:
    """rayStartParams.resources in KubeRay's documented form '"{\\"name\\": n}"': a JSON string of JSON."""
    raw = params.get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"resources {raw!r}: KubeRay wants the JSON in double quotes"
    value = json.loads(json.loads(raw))
    assert isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()), raw
    return value


def pods(spec: dict) -> list[tuple[str, dict]]:
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    return out + [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]


def gpu_limit(pod: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in pod["containers"])


def pvc_names() -> set[str]:
    return {d["metadata"]["name"] for d in load_docs(STORAGE) if d.get("kind") == "PersistentVolumeClaim"}


def test_storage_yaml_holds_a_read_write_many_claim():
    claims = [d for d in load_docs(STORAGE) if d.get("kind") == "PersistentVolumeClaim"]
    assert claims, "storage.yaml: a PersistentVolumeClaim"
    for claim in claims:
        assert claim["apiVersion"] == "v1"
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every pod mounts it, on any node"


@pytest.mark.parametrize("path", KUBERAY, ids=ids(KUBERAY))
def test_kuberay_cluster_spec(path):
    doc = kuberay_doc(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[path.name]
    spec = cluster_spec(path)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]["rayStartParams"]
    assert head["num-gpus"] == "0" and "num-cpus" in head
    assert not group_resources(head), "no custom resources on the head"
    assert gpu_limit(spec["headGroupSpec"]["template"]["spec"]) == 0

    groups = spec["workerGroupSpecs"]
    drivers = [g for g in groups if "trial_driver" in group_resources(g["rayStartParams"])]
    assert len(drivers) == 1, f"{rel(path)}: exactly one worker group carries trial_driver"
    assert gpu_limit(drivers[0]["template"]["spec"]) == 0
    gpu_groups = [g for g in groups if gpu_limit(g["template"]["spec"]) > 0]
    for g in gpu_groups:
        assert g["minReplicas"] == 0, f"{rel(path)}: GPU group {g['groupName']} scales from 0"
        assert g["maxReplicas"] >= 1
        assert int(g["rayStartParams"]["num-gpus"]) == gpu_limit(g["template"]["spec"]), g["groupName"]
        assert not group_resources(g["rayStartParams"])
    assert {gpu_limit(g["template"]["spec"]) for g in gpu_groups} >= {1, 8}


@pytest.mark.parametrize("path", KUBERAY, ids=ids(KUBERAY))
def test_kuberay_every_pod_mounts_the_shared_claim(path):
    claims = pvc_names()
    for name, pod in pods(cluster_spec(path)):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{rel(path)} {name}: unknown claim"
        mounted = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["mountPath"] == SHARED]
        assert mounted, f"{rel(path)} {name}: mounts nothing at {SHARED}"
        for m in mounted:
            assert "persistentVolumeClaim" in volumes[m["name"]], f"{rel(path)} {name}: {SHARED} is not the claim"


def test_rayjob_shuts_down_and_matches_the_raycluster():
    job = kuberay_doc(CLUSTER / "kuberay" / "rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] >= 0
    shape = lambda spec: {g["groupName"]: g["rayStartParams"] for g in spec["workerGroupSpecs"]}  # noqa: E731
    assert shape(job["rayClusterSpec"]) == shape(cluster_spec(CLUSTER / "kuberay" / "raycluster.yaml"))


# ------------------------------------------------------------------------------------- documented commands


def provided_resources(path: Path) -> set[str]:
    """Custom resources some node type / worker group of this config provides."""
    if is_launcher(path):
        return set().union(*(custom_resources(t["resources"]) for t in node_types(load_docs(path)[0]).values()))
    spec = cluster_spec(path)
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return set().union(*(group_resources(g["rayStartParams"]) for g in groups))


CLUSTER_CONFIGS = LAUNCHERS + KUBERAY


def documented_commands() -> list[tuple[str, str, set[str]]]:
    """(where, `python -m ia2ray.tune ...` command, custom resources its cluster provides): the YAML headers,
    the RayJob entrypoint (against their own config) and cluster/README.md's code blocks (against every
    cluster config, since the README's commands go to any of them)."""
    found = []
    for path in YAMLS:
        for line in header(path):
            for match in TUNE_CMD.findall(line):
                found.append((f"{rel(path)} header", match.strip(), provided_resources(path)))
        doc = load_docs(path)[-1]
        if doc.get("kind") == "RayJob":
            found.append((f"{rel(path)} entrypoint", doc["spec"]["entrypoint"].strip(), provided_resources(path)))
    everywhere = set.intersection(*(provided_resources(p) for p in CLUSTER_CONFIGS))
    in_code = False
    for n, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        elif in_code:  # commands in fenced code blocks; inline mentions in the prose are not commands
            for match in TUNE_CMD.findall(line):
                found.append((f"cluster/README.md:{n}", match.strip(), everywhere))
    return found


COMMANDS = documented_commands()


def test_commands_are_documented_where_expected():
    places = {where.split(":")[0].replace(" header", "").replace(" entrypoint", "") for where, _, _ in COMMANDS}
    for expected in ("cluster/aws.yaml", "cluster/gcp.yaml", "cluster/kuberay/raycluster.yaml",
                     "cluster/kuberay/rayjob.yaml", "cluster/README.md"):
        assert expected in places, f"no `python -m ia2ray.tune` command documented in {expected}"


@pytest.mark.parametrize("where, command, provided", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_documented_command_parses_and_loads(where, command, provided):
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "ia2ray.tune"]
    parser = build_parser()
    parser.allow_abbrev = False  # documented options are spelled out
    args = parser.parse_args(argv[3:])  # exits (SystemExit) on an unknown option
    assert args.config, f"{where}: name the study file with --config"
    config = REPO / args.config
    assert config.is_file(), f"{where}: {args.config} does not exist"
    study, _ = load_study_file(config, args.overrides)  # raises ConfigError on a bad --set key or value
    wanted = set(study.study.driver_resources)
    assert wanted, f"{where}: trial drivers need study.driver_resources (e.g. {{trial_driver: 1}})"
    missing = wanted - provided
    assert not missing, f"{where}: no node type / worker group of its cluster provides {sorted(missing)}"


def test_documented_cluster_commands_use_shared_storage():
    for where, command, _ in COMMANDS:
        args = build_parser().parse_args(shlex.split(command)[3:])
        assert args.storage and args.storage.startswith((SHARED + "/", "s3://", "gs://")), \
            f"{where}: --storage {SHARED}/... or a bucket"
