"""The start-of-study rules for clusters (`ia2ray.study.cluster`): which storage counts as shared,
when a local folder or a local MLflow store is refused, and what the autoscaler may add."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ia2ray.config import ConfigError
from ia2ray.study.cluster import (
    ClusterShape,
    check_cluster,
    file_system,
    is_shared,
    scalable_node_types,
    storage_errors,
)

ROOT = Path(__file__).resolve().parents[1]
MOUNTS = """\
overlay / overlay rw,relatime 0 0
proc /proc proc rw 0 0
fs-0123.efs.us-east-1.amazonaws.com:/ /mnt/ia2ray nfs4 rw,vers=4.1 0 0
10.0.0.2:/ia2ray /mnt/ia2ray/filestore nfs rw 0 0
/dev/nvme1n1 /mnt/ia2ray-scratch ext4 rw 0 0
gcsfuse-bucket /mnt/my\\040bucket fuse.gcsfuse rw 0 0
"""


@pytest.mark.parametrize("path, fstype", [
    ("/mnt/ia2ray/studies", "nfs4"),                   # below the mount point, not yet created
    ("/mnt/ia2ray", "nfs4"),
    ("/mnt/ia2ray/filestore/studies", "nfs"),         # the longest mount point wins
    ("/mnt/ia2ray-scratch/studies", "ext4"),          # a name that starts like /mnt/ia2ray is not inside it
    ("/mnt/my bucket/studies", "fuse.gcsfuse"),       # spaces are \040 in the mounts table
    ("/home/ray/studies", "overlay"),
])
def test_file_system_of_a_path(path, fstype):
    assert file_system(Path(path), MOUNTS) == fstype


@pytest.mark.parametrize("path, shared", [
    ("/mnt/ia2ray/studies", True),
    ("/mnt/ia2ray/filestore/studies", True),
    ("/mnt/ia2ray-scratch/studies", False),
    ("/mnt/my bucket/studies", False),  # a bucket FUSE mount cannot hold SQLite databases
    ("/home/ray/studies", False),
])
def test_network_file_systems_count_as_shared(path, shared):
    assert is_shared(path, None, MOUNTS)[0] is shared


def test_file_system_of_this_machine():
    assert file_system(Path("/proc/self/status")) == "proc"
    assert file_system(Path("/")) != ""


def test_shared_is_the_file_system_unless_declared(tmp_path):
    shared, why = is_shared(str(tmp_path), None)  # the test machine's temp folder is local
    assert not shared and why.startswith("its file system is ")
    assert is_shared(str(tmp_path), True) == (True, "study.shared_storage = true")
    assert is_shared(str(tmp_path), False) == (False, "study.shared_storage = false")


@pytest.mark.parametrize("shape, shared, expected", [
    (ClusterShape(1, 1), False, None),                  # one machine: any folder
    (ClusterShape(3, 1), False, None),                  # several nodes on one machine (fake cluster)
    (ClusterShape(3, 2), True, None),                   # several machines, NFS
    (ClusterShape(3, 2), False, "the Ray cluster spans 2 machines"),
    (ClusterShape(1, 1, ["gpu1", "gpu8"]), False, "the autoscaler can add nodes of type gpu1, gpu8"),
    (ClusterShape(1, 1, ["gpu1"]), True, None),
])
def test_local_storage_is_refused_when_the_study_can_span_machines(shape, shared, expected):
    errors = storage_errors("/data/studies", shared, "its file system is ext4", shape)
    if expected is None:
        assert errors == []
    else:
        (err,) = errors
        assert err.startswith("--storage / study.storage = '/data/studies': " + expected)
        assert "(its file system is ext4)" in err and "study.shared_storage=true" in err


def test_check_cluster_reports_storage_and_tracking_together(tmp_path):
    shape = ClusterShape(2, 2)
    with pytest.raises(ConfigError) as exc:
        check_cluster(str(tmp_path), None, "sqlite:////x/mlflow.db", shape)
    text = str(exc.value)
    assert "--storage / study.storage" in text and "--tracking-uri / study.tracking_uri" in text
    assert "2 node(s) on 2 machine(s)" in text
    check_cluster(str(tmp_path), True, "http://10.0.0.5:5000", shape)  # shared + a server: fine


def test_scalable_node_types_from_the_launchers_bootstrap_config(tmp_path, monkeypatch):
    """On a head made by `ray up`, ~/ray_bootstrap_config.yaml lists the worker types; the shipped AWS
    config has three that scale."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert scalable_node_types() == []
    shutil.copy(ROOT / "cluster" / "aws.yaml", tmp_path / "ray_bootstrap_config.yaml")
    assert scalable_node_types() == ["driver", "gpu1", "gpu8"]


def test_a_kuberay_head_knows_worker_pods_can_join():
    """The shipped KubeRay configs set IA2RAY_KUBERAY_CLUSTER on the head pod (Kubernetes sets
    KUBERNETES_SERVICE_HOST in every pod)."""
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "IA2RAY_KUBERAY_CLUSTER": "ia2ray"}
    assert scalable_node_types(env) == ["KubeRay worker groups of ia2ray"]
    assert scalable_node_types({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "RAY_CLUSTER_NAME": "rc"}) == [
        "KubeRay worker groups of rc"]
    assert scalable_node_types({"IA2RAY_KUBERAY_CLUSTER": "ia2ray"}) == []  # not in a pod: not KubeRay
    for path in ("raycluster.yaml", "rayjob.yaml"):
        text = (ROOT / "cluster" / "kuberay" / path).read_text()
        assert "name: IA2RAY_KUBERAY_CLUSTER" in text and "metadata.labels['ray.io/cluster']" in text


def test_a_node_without_the_study_folder_says_so(tmp_path):
    """What a trial driver or Train worker on a node that does not mount the storage raises."""
    import socket

    from ia2ray.fileio import StorageNotSharedError, require_visible

    (tmp_path / "study.json").write_text("{}")
    require_visible(tmp_path / "study.json", "the study folder's")  # present: nothing happens
    missing = tmp_path / "other" / "study.json"
    with pytest.raises(StorageNotSharedError) as exc:
        require_visible(missing, "the study folder's")
    text = str(exc.value)
    assert text.startswith(f"the study folder's {missing} is not visible on this node ({socket.gethostname()})")
    assert "every node mounts at the same path" in text
