"""Does the Ray cluster fit the study's storage and MLflow store? Checked when the study starts.

A study on several machines writes its folder (teacher cache, checkpoints, trial summaries) from every
node and logs to MLflow from every node. So when the cluster spans machines, or its autoscaler can add
nodes, the storage must be a bucket (`s3://`, `gs://`: every node works in a local copy, see
`ia2ray.mirror`) or a folder every node mounts at the same path (NFS and other network file systems,
or `study.shared_storage: true`), and MLflow must be a server every node reaches.

What can join later: the cluster launcher leaves `~/ray_bootstrap_config.yaml` (its node types) on the
head; on KubeRay the head pod's environment names the RayCluster (`IA2RAY_KUBERAY_CLUSTER`, set by the
shipped configs, or `RAY_CLUSTER_NAME`), and worker pods run on other Kubernetes nodes; an autoscaler
that publishes its node groups in the GCS (`get_cluster_config`; Ray 2.60's do not) lists them. None
of these exists for `ray start` by hand or Ray's fake multi-node provider, whose nodes all run on this
machine. A node that joins later and still does not see the folder stops its trial with a clear
message (`ia2ray.fileio.require_visible`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from ia2ray.config.load import ConfigError
from ia2ray.mirror import is_remote

# file systems every node of a cluster can mount at the same path (the kernel's names in /proc/mounts).
# Not bucket FUSE mounts (gcsfuse, s3fs, mountpoint-s3): they cannot hold the Optuna SQLite database.
NETWORK_FILE_SYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
                        "fuse.cephfs", "fuse.ceph-fuse", "fuse.glusterfs", "fuse.juicefs", "fuse.sshfs")
LOOPBACK = ("localhost", "127.", "::1", "[::1]", "0.0.0.0")
KUBERAY_ENV = "IA2RAY_KUBERAY_CLUSTER"  # set on the head pod by cluster/kuberay/*.yaml (the pod's ray.io/cluster label)
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # the cluster launcher's copy of the cluster config on the head


@dataclass
class ClusterShape:
    nodes: int  # alive nodes now
    hosts: int  # distinct machine addresses among them
    scalable: list[str] = field(default_factory=list)  # node types the autoscaler may add (on other machines)

    @property
    def multi_machine(self) -> bool:
        return self.hosts > 1 or bool(self.scalable)

    def spread(self) -> str:
        """Why the study may run on several machines (when `multi_machine`)."""
        if self.hosts > 1:
            return f"the Ray cluster spans {self.hosts} machines"
        return f"the autoscaler can add nodes of type {', '.join(self.scalable)}"


def file_system(path: Path, mounts: Optional[str] = None) -> str:
    """The type of the file system holding `path`: that of the longest mount point containing it in
    `mounts` (text in /proc/self/mounts format, default this machine's); "" when unknown (no /proc)."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return ""
    lines = mounts.splitlines()
    path = path.expanduser().absolute()
    existing = path  # resolve symlinks in the part that exists; the rest (not created yet) stays as given
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probe = existing.resolve() / path.relative_to(existing)
    best, fstype = "", ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        inside = str(probe) == mount or str(probe).startswith(mount.rstrip("/") + "/")
        if inside and len(mount) > len(best):
            best, fstype = mount, parts[2]
    return fstype


def is_shared(storage: str, declared: Optional[bool], mounts: Optional[str] = None) -> tuple[bool, str]:
    """Whether every node sees `storage` (and can hold the study's SQLite files), and why."""
    if is_remote(storage):
        return True, "object storage"
    if declared is not None:
        return declared, f"study.shared_storage = {str(declared).lower()}"
    fstype = file_system(Path(storage).expanduser(), mounts)
    shared = fstype in NETWORK_FILE_SYSTEMS
    return shared, f"its file system is {fstype or 'unknown'}"


def storage_errors(storage: str, shared: bool, why: str, shape: ClusterShape) -> list[str]:
    """The storage rule: a study that can run on several machines needs storage every node sees."""
    if shared or not shape.multi_machine:
        return []
    return [f"--storage / study.storage = {storage!r}: {shape.spread()}, but this folder is local to one machine "
            f"({why}). Every node writes the study folder (teacher cache, checkpoints, trial results): pass a bucket "
            "(s3://bucket/studies, gs://bucket/studies) or a folder every node mounts at the same path (NFS: EFS, "
            "Filestore, a ReadWriteMany volume; see cluster/README.md), or set study.shared_storage=true if it is "
            "shared"]


def tracking_errors(uri: Optional[str], shape: ClusterShape) -> list[str]:
    """A study on several nodes logs from all of them: a local SQLite store cannot be shared, and a
    server on this machine's loopback address is unreachable from the other machines."""
    from ia2ray.tracking import is_local_uri

    if not uri:
        return []
    fix = "start an `mlflow server` that every node reaches and pass its URL (http://host:port), or --tracking-uri none"
    if is_local_uri(uri) and (shape.nodes > 1 or shape.scalable):
        where = f"the Ray cluster has {shape.nodes} nodes" if shape.nodes > 1 else shape.spread()
        return [f"--tracking-uri / study.tracking_uri: {where}, but {uri} is a local store that trials on other "
                f"nodes cannot write; {fix}"]
    host = urlparse(uri).hostname or ""
    if shape.multi_machine and host.startswith(LOOPBACK):
        return [f"--tracking-uri / study.tracking_uri: {shape.spread()}, but {uri} is a loopback address the other "
                f"machines cannot reach; {fix}"]
    return []


def scalable_node_types(env: Optional[dict] = None) -> list[str]:
    """Worker node types that may join: KubeRay worker groups (this process runs in a KubeRay pod), the
    node groups an autoscaler published in the GCS, else those of the cluster launcher's bootstrap config
    on this (head) node."""
    import ray._private.state

    env = os.environ if env is None else env
    kuberay = env.get(KUBERAY_ENV) or env.get("RAY_CLUSTER_NAME")
    if env.get("KUBERNETES_SERVICE_HOST") and kuberay:
        return [f"KubeRay worker groups of {kuberay}"]
    types = []
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - older GCS or no autoscaler: nothing known
        config = None
    for group in config.node_group_configs if config is not None else []:
        if group.max_count != 0 and group.name:
            types.append(group.name)
    bootstrap = Path(BOOTSTRAP_CONFIG).expanduser()
    if not types and bootstrap.is_file():
        import yaml

        launcher = yaml.safe_load(bootstrap.read_text()) or {}
        head = launcher.get("head_node_type")
        for name, node in (launcher.get("available_node_types") or {}).items():
            if name != head and node.get("max_workers", launcher.get("max_workers", 0)):
                types.append(name)
    return types


def cluster_shape() -> ClusterShape:
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterShape(len(alive), len({n.get("NodeManagerAddress") for n in alive}), scalable_node_types())


def check_cluster(storage: str, declared_shared: Optional[bool], tracking_uri: Optional[str],
                  shape: ClusterShape) -> None:
    """Raise ConfigError naming every key the cluster does not fit."""
    shared, why = is_shared(storage, declared_shared)
    errors = storage_errors(storage, shared, why, shape) + tracking_errors(tracking_uri, shape)
    if errors:
        raise ConfigError(errors, f"the Ray cluster ({shape.nodes} node(s) on {shape.hosts} machine(s)"
                          + (f", autoscaling {', '.join(shape.scalable)})" if shape.scalable else ")"))

