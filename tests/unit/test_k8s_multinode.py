"""The multi-node learner's Kubernetes pieces, offline: the vendored CRD schemas catch what the API
server would refuse, the world checks of k8s/check_manifests.py catch worlds that would not start or
not restart, and learner_world.py orders start-up and answers probes by rank.

The overlay cases render k8s/overlays/multinode-* with kubectl (skipped without it), then break one
thing at a time in the rendered objects and expect the check that names it to fail.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
sys.path.insert(0, str(K8S))

import check_crds  # noqa: E402
import check_manifests  # noqa: E402


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


learner_world = load_module(K8S / "components" / "learner-world" / "learner_world.py")


# ---------------------------------------------------------------------------------- CRD schemas


@pytest.fixture(scope="module")
def crds():
    return check_crds.load_crds()


def jobset() -> dict[str, Any]:
    source = yaml.safe_load((K8S / "overlays/multinode-jobset/learner-jobset.yaml").read_text())
    source["metadata"]["namespace"] = "protege"
    return source


def schema_problems(obj: dict[str, Any], crds) -> list[str]:
    group, _, version = obj["apiVersion"].rpartition("/")
    return check_crds.check_object(obj, crds[(group, obj["kind"])][version])


def test_the_jobset_as_written_passes_its_schema(crds):
    assert schema_problems(jobset(), crds) == []


@pytest.mark.parametrize(
    ("breaks", "expected"),
    [
        (lambda o: o["spec"]["replicatedJobs"][1].update(replicas="1"),
         "replicatedJobs[1].replicas: '1' is not of type 'integer'"),
        (lambda o: o["spec"]["network"].update(enableDNSHostName=True),
         "'enableDNSHostName' was unexpected"),
        (lambda o: o["spec"]["failurePolicy"].update(restartStrategy="Restart"),
         "failurePolicy.restartStrategy: 'Restart' is not one of"),
        (lambda o: o["spec"]["replicatedJobs"][1].update(name="leader"),
         "have the same key {'name': 'leader'}"),
        (lambda o: o["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
            "containers"][0].update(imagePullPolicy=None), "imagePullPolicy: None is not of type"),
        (lambda o: o["metadata"].pop("namespace"), "metadata.namespace: missing"),
        (lambda o: o["metadata"].update(name="Protege_Learner"),
         "metadata.name: 'Protege_Learner'"),
    ],
)
def test_schema_violations_fail(crds, breaks: Callable[[dict], Any], expected: str):
    obj = jobset()
    breaks(obj)
    problems = schema_problems(obj, crds)
    assert any(expected in p for p in problems), problems


def test_an_api_version_the_crd_does_not_serve_fails(tmp_path, capsys):
    obj = jobset()
    obj["apiVersion"] = "jobset.x-k8s.io/v1alpha1"
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump(obj))
    assert check_crds.check_file(path) == 1
    assert "serves JobSet as ['v1alpha2'], not v1alpha1" in capsys.readouterr().out


def test_a_namespace_on_a_cluster_scoped_kind_fails(crds):
    queue = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue",
             "metadata": {"name": "protege", "namespace": "protege"}, "spec": {}}
    assert schema_problems(queue, crds) == ["metadata.namespace: 'protege' set on a cluster-scoped "
                                            "kind"]


def test_preserve_unknown_fields_and_int_or_string_convert():
    counts = {"cel": 0}
    schema = check_crds.to_json_schema({
        "type": "object",
        "properties": {
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "quantity": {"x-kubernetes-int-or-string": True},
            "ruled": {"type": "string", "x-kubernetes-validations": [{"rule": "self != ''"}]},
        },
    }, counts)
    validator = check_crds.StrictValidator(schema)
    assert validator.is_valid({"free": {"anything": 1}, "quantity": "2Gi"})
    assert validator.is_valid({"quantity": 4})
    assert not validator.is_valid({"quantity": 1.5})
    assert not validator.is_valid({"other": 1})
    assert counts["cel"] == 1


# ------------------------------------------------------------------------------- world checks


def render(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], check=True,
                         capture_output=True, text=True).stdout
    return [o for o in yaml.safe_load_all(out) if o]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Any]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed (it renders the overlays)")
    cluster = [o for part in ("cluster", "cluster/multinode", "cluster/trainer")
               for o in render(K8S / part)]
    path = tmp_path_factory.mktemp("cluster") / "cluster.yaml"
    path.write_text(yaml.safe_dump_all(cluster))
    return {"cluster": path, "cluster_objects": cluster,
            **{name: render(K8S / "overlays" / name)
               for name in ("multinode-jobset", "multinode-trainjob")}}


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"]))


def errors(rendered, overlay: str, objects=None, cluster=None, tmp_path=None, capsys=None):
    """check_manifests' ERROR lines for `objects` (default: the overlay as rendered)."""
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump_all(objects if objects is not None else rendered[overlay]))
    cluster_path = rendered["cluster"]
    if cluster is not None:
        cluster_path = tmp_path / "cluster.yaml"
        cluster_path.write_text(yaml.safe_dump_all(cluster))
    check_manifests.check_manifests(path, f"overlays/{overlay}", cluster_path)
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("ERROR")]


@pytest.mark.parametrize("overlay", ["multinode-jobset", "multinode-trainjob"])
def test_the_overlays_pass(rendered, overlay, tmp_path, capsys):
    assert errors(rendered, overlay, tmp_path=tmp_path, capsys=capsys) == []


def leader_pod(objects) -> dict[str, Any]:
    return find(objects, "JobSet")["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


def workers(objects) -> dict[str, Any]:
    return find(objects, "JobSet")["spec"]["replicatedJobs"][1]


def add_depends_on(objects):
    workers(objects)["dependsOn"] = [{"name": "leader", "status": "Ready"}]


def share_the_rwo_claim(objects):
    pod = workers(objects)["template"]["spec"]["template"]["spec"]
    pod["volumes"].append({"name": "data", "persistentVolumeClaim":
                           {"claimName": "protege-learner-data"}})
    pod["containers"][0]["volumeMounts"].append({"name": "data", "mountPath": "/data"})


def keep_checkpoints_local(objects):
    pod = workers(objects)["template"]["spec"]["template"]["spec"]
    pod["containers"][0]["volumeMounts"] = [m for m in pod["containers"][0]["volumeMounts"]
                                            if m["name"] != "checkpoints"]


def select_every_rank(objects):
    find(objects, "Service", "protege-learner")["spec"]["selector"].pop(
        "jobset.sigs.k8s.io/replicatedjob-name")


def drop_the_world_policy(objects):
    objects.remove(find(objects, "NetworkPolicy", "protege-learner-world"))


def one_rank_per_gpu_broken(objects):
    env = leader_pod(objects)["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "PET_NPROC_PER_NODE")["value"] = "4"


def torchrun_kills_checkpoints(objects):
    args = leader_pod(objects)["spec"]["containers"][0]["args"]
    args.remove("--shutdown-timeout=580")


def retry_a_rank_alone(objects):
    workers(objects)["template"]["spec"]["backoffLimit"] = 6


def workers_start_unordered(objects):
    workers(objects)["template"]["spec"]["template"]["spec"].pop("initContainers")


def workers_hold_tokens(objects):
    pod = workers(objects)["template"]["spec"]["template"]["spec"]
    etc = next(v for v in pod["volumes"] if v["name"] == "etc-protege")
    etc["projected"]["sources"].append({"secret": {"name": "protege-learner-client"}})
    pod["containers"][0]["args"].append("--generator-token-file=/etc/protege/client/generator-token")
    pod["containers"][0]["env"].append({"name": "PROTEGE_TOKENS_FILE",
                                        "value": "/etc/protege/auth/tokens.yaml"})


def queue_missing(objects):
    objects.remove(find(objects, "LocalQueue"))


@pytest.mark.parametrize(
    ("breaks", "expected"),
    [
        (add_depends_on, "uses dependsOn, which deadlocks under gang scheduling"),
        (share_the_rwo_claim, "needs ReadWriteMany"),
        (keep_checkpoints_local, "workers: checkpoint_root /data/checkpoints is on no claim"),
        (select_every_rank, "Service/protege-learner: selects JobSet/protege-learner/workers"),
        (drop_the_world_policy, "NetworkPolicies block JobSet/protege-learner/workers -> "
                                "JobSet/protege-learner/leader:29400"),
        (one_rank_per_gpu_broken, "PET_NPROC_PER_NODE '4' but 8 GPUs"),
        (torchrun_kills_checkpoints, "torchrun --shutdown-timeout 30 must be at least 2 x grace_s"),
        (retry_a_rank_alone, "needs backoffLimit 0"),
        (workers_start_unordered, "no init container runs learner_world.py wait"),
        (queue_missing, "kueue.x-k8s.io/queue-name protege names no LocalQueue"),
        (workers_hold_tokens, "mounts Secret protege-learner-client, but ranks above 0 use no "
                              "credentials"),
        (workers_hold_tokens, "passes ['--generator-token-file=/etc/protege/client/generator-"
                              "token'], but ranks above 0 call no service"),
        (workers_hold_tokens, "sets PROTEGE_TOKENS_FILE, but ranks above 0 serve no Jobs API"),
    ],
)
def test_a_broken_jobset_world_fails(rendered, breaks, expected, tmp_path, capsys):
    objects = copy.deepcopy(rendered["multinode-jobset"])
    breaks(objects)
    found = errors(rendered, "multinode-jobset", objects, tmp_path=tmp_path, capsys=capsys)
    assert any(expected in e for e in found), found


def test_only_the_jobset_leader_holds_the_learners_tokens(rendered):
    (world,) = check_manifests.worlds.build(rendered["multinode-jobset"], [])
    by_rank = {role["world"]["rank0"]: role for role in world.roles}
    leader, worker = by_rank[True], by_rank[False]
    assert {name for name, _ in check_manifests.mounted_secrets(leader)} == {
        "protege-learner-auth", "protege-learner-client"}
    assert check_manifests.mounted_secrets(worker) == []
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert not any("token-file" in a for a in container["args"])
    assert "PROTEGE_TOKENS_FILE" not in {e["name"] for e in container["env"]}


def test_a_world_larger_than_its_queue_is_never_admitted(rendered, tmp_path, capsys):
    cluster = copy.deepcopy(rendered["cluster_objects"])
    gpus = find(cluster, "ClusterQueue")["spec"]["resourceGroups"][0]["flavors"][0]["resources"]
    next(r for r in gpus if r["name"] == "nvidia.com/gpu")["nominalQuota"] = 8
    found = errors(rendered, "multinode-jobset", cluster=cluster, tmp_path=tmp_path, capsys=capsys)
    assert any("request 16 nvidia.com/gpu together, more than ClusterQueue/protege's quota 8" in e
               for e in found), found


def test_a_trainjob_named_like_the_jobs_service_fails(rendered, tmp_path, capsys):
    objects = copy.deepcopy(rendered["multinode-trainjob"])
    find(objects, "TrainJob")["metadata"]["name"] = "protege-learner"
    found = errors(rendered, "multinode-trainjob", objects, tmp_path=tmp_path, capsys=capsys)
    assert any("a Service named protege-learner exists" in e for e in found), found


def test_a_trainjob_without_its_runtime_fails(rendered, tmp_path, capsys):
    cluster = [o for o in rendered["cluster_objects"] if o["kind"] != "ClusterTrainingRuntime"]
    found = errors(rendered, "multinode-trainjob", cluster=cluster, tmp_path=tmp_path,
                   capsys=capsys)
    assert any("runtimeRef ClusterTrainingRuntime/protege-learner is not in k8s/cluster/trainer"
               in e for e in found), found


def test_a_trainjob_needs_its_data_shared(rendered, tmp_path, capsys):
    objects = copy.deepcopy(rendered["multinode-trainjob"])
    find(objects, "PersistentVolumeClaim", "protege-learner-shared")["spec"]["accessModes"] = [
        "ReadWriteOnce"]
    found = errors(rendered, "multinode-trainjob", objects, tmp_path=tmp_path, capsys=capsys)
    assert any("protege-learner-shared: 2 pods of a learner world mount it read-write, which "
               "needs ReadWriteMany" in e for e in found), found


def test_a_trainjob_may_not_set_torchrun_variables(rendered, tmp_path, capsys):
    objects = copy.deepcopy(rendered["multinode-trainjob"])
    find(objects, "TrainJob")["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "2"})
    found = errors(rendered, "multinode-trainjob", objects, tmp_path=tmp_path, capsys=capsys)
    assert any("trainer.env sets ['PET_NNODES']" in e for e in found), found


def test_trainjob_pods_are_the_runtime_merged_with_the_trainjob(rendered):
    (world,) = check_manifests.worlds.build(rendered["multinode-trainjob"],
                                            rendered["cluster_objects"])
    rank0, others = world.roles
    pod = rank0["spec"]["template"]
    node = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in node["env"]}
    assert (rank0["world"]["pods"], others["world"]["pods"]) == (1, 1)
    assert node["command"] == ["python", "-m", "torch.distributed.run"]
    assert env["PET_MASTER_ADDR"]["value"] == "protege-learner-world-node-0-0.protege-learner-world"
    assert env["PET_MASTER_PORT"]["value"] == "29500"
    assert {"tmp", "dshm", "etc-protege", "data", "models"} == {v["name"] for v in
                                                                pod["spec"]["volumes"]}
    init_env = {e["name"] for e in pod["spec"]["initContainers"][0]["env"]}
    assert {"PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"} <= init_env
    assert pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "0"


# ------------------------------------------------------------------------------ learner_world.py


def test_rank_0_waits_for_names_to_resolve(monkeypatch):
    monkeypatch.setenv("PET_NODE_RANK", "0")
    assert learner_world.wait(["localhost"], poll_s=0.01) == 0


def test_other_ranks_wait_for_rank_0_to_listen(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PET_NODE_RANK", "1")
    monkeypatch.setenv("PET_MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("PET_MASTER_PORT", str(port))
    assert not learner_world.accepts("127.0.0.1", port)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening = threading.Timer(0.2, lambda: (server.bind(("127.0.0.1", port)), server.listen()))
    listening.start()
    try:
        assert learner_world.wait([], poll_s=0.05) == 0
    finally:
        listening.join()
        server.close()


def test_health_passes_other_ranks_and_asks_rank_0(monkeypatch):
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    monkeypatch.setenv("PET_NODE_RANK", "3")
    assert learner_world.health(1) == 0  # nothing listens on port 1: ranks above 0 serve nothing
    monkeypatch.setenv("PET_NODE_RANK", "0")
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert learner_world.health(port) == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert learner_world.health(port) == 0
    finally:
        server.stop(0)
