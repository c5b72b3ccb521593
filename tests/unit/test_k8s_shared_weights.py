"""The shared weights directory on Kubernetes (k8s/components/shared-weights), offline: the
component composes with the gpu overlay and both multi-node learners, and the checks of
k8s/check_manifests.py fail a learner and generators that would not meet in one directory.

Each case renders an overlay with kubectl (skipped without it), or the component added to an
overlay in a kustomization of its own under tmp_path, then breaks one thing in the rendered objects
and expects the check that names it to fail.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"
sys.path.insert(0, str(K8S))

import check_manifests  # noqa: E402

LEARNER_FLAGS = ["--weight-transport=shared", "--weight-shared-dir=/weights"]


def render(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(directory)], check=True,
                         capture_output=True, text=True).stdout
    return [o for o in yaml.safe_load_all(out) if o]


def with_component(overlay: str, root: Path) -> list[dict[str, Any]]:
    """`overlay` with the shared-weights component added, as a user's overlay would add it.
    kustomize takes relative paths only."""
    root.mkdir()
    (root / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "protege",
        "resources": [os.path.relpath(K8S / "overlays" / overlay, root)],
        "components": [os.path.relpath(K8S / "components" / "shared-weights", root)],
    }))
    return render(root)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Any]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed (it renders the overlays)")
    tmp = tmp_path_factory.mktemp("shared-weights")
    cluster = [o for part in ("cluster", "cluster/multinode", "cluster/trainer",
                              "cluster/shared-weights") for o in render(K8S / part)]
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump_all(cluster))
    return {"cluster": path, "gpu-shared-weights": render(K8S / "overlays/gpu-shared-weights"),
            **{name: with_component(name, tmp / name)
               for name in ("multinode-jobset", "multinode-trainjob")}}


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def errors(rendered, overlay: str, objects=None, tmp_path=None, capsys=None) -> list[str]:
    """check_manifests' ERROR lines for `objects` (default: the overlay as rendered)."""
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump_all(objects if objects is not None else rendered[overlay]))
    check_manifests.check_manifests(path, f"overlays/{overlay}", rendered["cluster"])
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("ERROR")]


@pytest.mark.parametrize("overlay",
                         ["gpu-shared-weights", "multinode-jobset", "multinode-trainjob"])
def test_the_component_passes_with_each_learner(rendered, overlay, tmp_path, capsys):
    assert errors(rendered, overlay, tmp_path=tmp_path, capsys=capsys) == []


def pod(objects, kind: str, name: str) -> dict[str, Any]:
    return find(objects, kind, name)["spec"]["template"]["spec"]


def generator(objects) -> dict[str, Any]:
    return pod(objects, "Deployment", "protege-generator")


def learner(objects) -> dict[str, Any]:
    return pod(objects, "StatefulSet", "protege-learner")


def drop_mount(spec: dict[str, Any], volume: str = "weights") -> None:
    c = spec["containers"][0]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != volume]


def learner_unmounted(objects):
    drop_mount(learner(objects))


def learner_mounts_read_only(objects):
    next(m for m in learner(objects)["containers"][0]["volumeMounts"]
         if m["name"] == "weights")["readOnly"] = True


def generator_writable(objects):
    spec = generator(objects)
    next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "weights").pop("readOnly")
    next(v for v in spec["volumes"] if v["name"] == "weights")["persistentVolumeClaim"].pop(
        "readOnly")


def generator_without_weights_dir(objects):
    args = generator(objects)["containers"][0]["args"]
    args.remove("--weights-dir=/weights")


def generator_in_another_directory(objects):
    next(m for m in generator(objects)["containers"][0]["volumeMounts"]
         if m["name"] == "weights")["subPath"] = "other"


def generator_on_another_claim(objects):
    next(v for v in generator(objects)["volumes"]
         if v["name"] == "weights")["persistentVolumeClaim"]["claimName"] = "protege-models"


def claim_read_write_once(objects):
    find(objects, "PersistentVolumeClaim", "protege-weights")["spec"]["accessModes"] = [
        "ReadWriteOnce"]


def claim_on_unknown_class(objects):
    find(objects, "PersistentVolumeClaim", "protege-weights")["spec"][
        "storageClassName"] = "fast-nfs"


@pytest.mark.parametrize(
    ("breaks", "expected"),
    [
        (learner_unmounted, "StatefulSet/protege-learner: weight_shared_dir '/weights' is on no "
                            "claim mounted read-write"),
        (learner_mounts_read_only, "weight_shared_dir '/weights' is on no claim mounted "
                                   "read-write"),
        (generator_writable, "Deployment/protege-generator: mount claim protege-weights "
                             "read-only at --weights-dir"),
        (generator_without_weights_dir, "Deployment/protege-generator: no --weights-dir, but the "
                                        "learner pushes with weight_transport 'shared'"),
        (generator_in_another_directory, "--weights-dir /weights is /other of claim "
                                         "protege-weights, but the learner writes to / of claim "
                                         "protege-weights"),
        (generator_on_another_claim, "--weights-dir /weights is / of claim protege-models"),
        (claim_read_write_once, "PersistentVolumeClaim/protege-weights: the shared weights "
                                "directory needs ReadWriteMany"),
        (claim_on_unknown_class, "storage class 'fast-nfs' is not in k8s/cluster"),
    ],
)
def test_a_broken_shared_weights_directory_fails(rendered, breaks, expected, tmp_path, capsys):
    objects = copy.deepcopy(rendered["gpu-shared-weights"])
    breaks(objects)
    found = errors(rendered, "gpu-shared-weights", objects, tmp_path=tmp_path, capsys=capsys)
    assert any(expected in e for e in found), found


def test_only_the_jobset_leader_writes_weights(rendered):
    jobset = find(rendered["multinode-jobset"], "JobSet", "protege-learner")
    leader, workers = (rj["template"]["spec"]["template"]["spec"]["containers"][0]
                       for rj in jobset["spec"]["replicatedJobs"])
    assert set(LEARNER_FLAGS) <= set(leader["args"])
    assert {"name": "weights", "mountPath": "/weights"} in leader["volumeMounts"]
    assert not set(LEARNER_FLAGS) & set(workers["args"])
    assert all(m["name"] != "weights" for m in workers["volumeMounts"])


def test_the_flags_on_a_worker_but_not_on_rank_0_fail(rendered, tmp_path, capsys):
    """What the component's index-based JobSet patch would do if replicatedJob 0 stopped being
    the leader."""
    objects = copy.deepcopy(rendered["multinode-jobset"])
    jobs = find(objects, "JobSet", "protege-learner")["spec"]["replicatedJobs"]
    leader, workers = (rj["template"]["spec"]["template"]["spec"] for rj in jobs)
    leader["containers"][0]["args"] = [a for a in leader["containers"][0]["args"]
                                       if a not in LEARNER_FLAGS]
    drop_mount(leader)
    workers["containers"][0]["args"] += LEARNER_FLAGS
    workers["containers"][0]["volumeMounts"].append({"name": "weights", "mountPath": "/weights"})
    workers["volumes"].append({"name": "weights",
                               "persistentVolumeClaim": {"claimName": "protege-weights"}})
    found = errors(rendered, "multinode-jobset", objects, tmp_path=tmp_path, capsys=capsys)
    assert any("JobSet/protege-learner/workers has weight_transport 'shared', but "
               "JobSet/protege-learner/leader, node rank 0 and the only rank that pushes "
               "weights, has 'grpc'" in e for e in found), found


def test_every_trainjob_rank_mounts_the_weights(rendered):
    (world,) = check_manifests.worlds.build(rendered["multinode-trainjob"],
                                            list(yaml.safe_load_all(rendered["cluster"].read_text())))
    for role in world.roles:
        node = role["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "weights", "mountPath": "/weights"} in node["volumeMounts"]
        assert set(LEARNER_FLAGS) <= set(node["args"])
