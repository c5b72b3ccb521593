"""The pods of a multi-node learner world, as a JobSet or a Kubeflow Trainer TrainJob will run them.

k8s/check_manifests.py checks the pod templates of Deployments and StatefulSets, and Checkov knows
Jobs but neither JobSets nor TrainJobs. A JobSet keeps its pod templates in its replicatedJobs; a
TrainJob's pods are its ClusterTrainingRuntime's template merged with the TrainJob's `trainer`
section and `runtimePatches` by the Trainer controller. This module builds those pods: one
workload-shaped dict ({"kind", "metadata": {"name"}, "spec": {"template"}}) per pod *role* (pods
that share a template and a rank class: rank 0, or the ranks above it), carrying the labels,
environment and ports the controllers add, so that every check written for Deployments applies.
Each role also has a `world` entry: whether it is node rank 0, how many pods it has, and its World.

    python k8s/worlds.py jobs RENDERED.yaml [CLUSTER.yaml]
        prints one batch/v1 Job per role: k8s/validate.sh checks them against the Kubernetes
        schemas (a CRD embeds the Job spec of the Kubernetes its authors built against, the API
        server checks the Job against its own), k8s/security/scan.sh gives them to Checkov.
        CLUSTER.yaml holds the ClusterTrainingRuntimes (the rendered k8s/cluster/trainer)

The merge follows the Trainer controller (v2.3: pkg/runtime/framework/plugins/torch/torch.go, the
runtimePatches docs) closely enough for checking: named list items (containers, volumes, env,
volumeMounts) merge by name, other values replace. It is a model, not the controller.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
# Labels the JobSet and Job controllers put on every pod (jobset_controller.go,
# labelAndAnnotateObject; the Job controller's completion index label, Kubernetes >= 1.28).
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
# Kubeflow Trainer's torch policy (v2.3.0 pkg/constants/constants.go).
TRAINER_NODE = "node"  # the replicatedJob and the container that run the trainer
TRAINER_ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
TRAINER_MASTER_PORT = 29500  # constants.ContainerTrainerPort
TORCHRUN_RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                         "PET_MASTER_PORT")
COMPLETION_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@dataclass
class World:
    """One learner world: the JobSet (or the JobSet a TrainJob becomes) and its pod roles."""

    kind: str  # JobSet or TrainJob
    name: str  # the JobSet's name (a TrainJob's JobSet is named after the TrainJob)
    source: dict[str, Any]  # the JobSet or TrainJob object
    jobset_spec: dict[str, Any]  # the JobSet's spec (a TrainJob's: its runtime's template.spec)
    job_specs: dict[str, dict[str, Any]]  # replicatedJob name -> its Job spec
    roles: list[dict[str, Any]] = field(default_factory=list)
    runtime: dict[str, Any] | None = None  # a TrainJob's ClusterTrainingRuntime

    @property
    def subdomain(self) -> str:
        """The headless Service JobSet creates (or reuses, if one of that name exists)."""
        return (self.jobset_spec.get("network") or {}).get("subdomain") or self.name

    @property
    def pods(self) -> int:
        return sum(role["world"]["pods"] for role in self.roles)


def merge(base: Any, patch: Any) -> Any:
    """`patch` over `base`: maps merge key by key, lists of named maps merge item by name (new names
    are appended), anything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(
            isinstance(x, dict) and "name" in x for x in [*base, *patch]):
        out = [copy.deepcopy(x) for x in base]
        names = [x["name"] for x in out]
        for item in patch:
            if item["name"] in names:
                i = names.index(item["name"])
                out[i] = merge(out[i], item)
            else:
                out.append(copy.deepcopy(item))
                names.append(item["name"])
        return out
    return copy.deepcopy(patch)


def role(world: World, name: str, job: dict[str, Any], template: dict[str, Any], pods: int,
         rank0: bool, labels: dict[str, str]) -> dict[str, Any]:
    """A workload-shaped dict for `pods` pods sharing `template`, with the controllers' labels;
    `job` is the spec of the Jobs that run them (without its template)."""
    template = copy.deepcopy(template)
    template.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    return {
        "apiVersion": world.source["apiVersion"],
        "kind": world.kind,
        "metadata": {"name": f"{world.source['metadata']['name']}/{name}",
                     "namespace": world.source["metadata"].get("namespace")},
        "spec": {"template": template},
        "world": {"world": world, "rank0": rank0, "pods": pods, "replicated_job": name.split()[0],
                  "job": {k: copy.deepcopy(v) for k, v in job.items() if k != "template"}},
    }


# ---------------------------------------------------------------------------------------- JobSet


def jobset_world(js: dict[str, Any]) -> World:
    """A JobSet's roles: per replicatedJob, its first pod and (if it has more) the others. Node rank
    0 is the first pod of the coordinator's replicatedJob (the PET_MASTER_ADDR of the overlay)."""
    spec = js.get("spec", {})
    world = World("JobSet", js["metadata"]["name"], js, spec,
                  {rj["name"]: rj.get("template", {}).get("spec", {})
                   for rj in spec.get("replicatedJobs", [])})
    coordinator = (spec.get("coordinator") or {}).get("replicatedJob")
    for rj in spec.get("replicatedJobs", []):
        job = rj.get("template", {}).get("spec", {})
        per_job = int(job.get("parallelism", 1))
        total = int(rj.get("replicas", 1)) * per_job
        labels = {JOBSET_NAME_LABEL: world.name, REPLICATED_JOB_LABEL: rj["name"]}
        template = job.get("template", {})
        first = 1 if rj["name"] == coordinator else total
        world.roles.append(role(world, rj["name"] if first == total else f"{rj['name']} (rank 0)",
                                job, template, first, rj["name"] == coordinator,
                                {**labels, COMPLETION_INDEX_LABEL: "0"}))
        if first < total:
            index = "0" if per_job == 1 else "1"
            world.roles.append(role(world, f"{rj['name']} (others)", job, template,
                                    total - first, False,
                                    {**labels, COMPLETION_INDEX_LABEL: index}))
    return world


# -------------------------------------------------------------------------------------- TrainJob


def runtime_patch(tj: dict[str, Any], rj_name: str) -> list[dict[str, Any]]:
    """The TrainJob's runtimePatches for one replicatedJob's template, in order."""
    found = []
    for patch in tj.get("spec", {}).get("runtimePatches", []):
        spec = (patch.get("trainingRuntimeSpec") or {}).get("template", {}).get("spec", {})
        found += [rj.get("template", {}) for rj in spec.get("replicatedJobs", [])
                  if rj.get("name") == rj_name]
    return found


def trainer_job(tj: dict[str, Any], runtime: dict[str, Any], nodes: int) -> dict[str, Any]:
    """The Job spec (pod template included) of the `node` replicatedJob, as the Trainer controller
    renders it: the runtime's, the TrainJob's runtimePatches, its trainer section, numNodes pods."""
    rj = next(rj for rj in runtime["spec"]["template"]["spec"]["replicatedJobs"]
              if rj["name"] == TRAINER_NODE)
    job_template = copy.deepcopy(rj.get("template", {}))
    for patch in runtime_patch(tj, TRAINER_NODE):
        job_template = merge(job_template, patch)
    job = job_template.setdefault("spec", {})
    job.update(parallelism=nodes, completions=nodes)
    pod = job.setdefault("template", {})
    trainer = tj.get("spec", {}).get("trainer") or {}
    for c in pod.get("spec", {}).get("containers", []):
        if c["name"] == TRAINER_NODE:
            c.update({k: copy.deepcopy(trainer[k]) for k in ("image", "command", "args")
                      if k in trainer})
            if "resourcesPerNode" in trainer:
                c["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
            c["env"] = merge(c.get("env", []), [*trainer.get("env", []), *pet_env(tj, nodes)])
            c["ports"] = merge(c.get("ports", []), [{"name": "rendezvous",
                                                     "containerPort": TRAINER_MASTER_PORT}])
    targets = (runtime["spec"].get("mlPolicy", {}).get("torch") or {}).get("envInjection") or {}
    injected = {n for t in targets.get("targets", []) if t.get("jobName") == TRAINER_NODE
                for n in t.get("containerNames", [])}
    for c in pod.get("spec", {}).get("initContainers", []):
        if c["name"] in injected:
            c["env"] = merge(c.get("env", []), pet_env(tj, nodes))
    return job


def pet_env(tj: dict[str, Any], nodes: int) -> list[dict[str, Any]]:
    """The PET_* variables Trainer's torch policy sets (torch.go, EnforceMLPolicy)."""
    name = tj["metadata"]["name"]
    nproc = (tj.get("spec", {}).get("trainer") or {}).get("numProcPerNode", "auto")
    return [
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_FIELD}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-{TRAINER_NODE}-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(TRAINER_MASTER_PORT)},
    ]


def trainjob_world(tj: dict[str, Any], runtimes: dict[str, dict[str, Any]]) -> World:
    """A TrainJob's roles: the node pod of completion index 0 (rank 0) and the others. Without its
    runtime (not in CLUSTER.yaml) the world has no roles; check_manifests reports that."""
    ref = tj.get("spec", {}).get("runtimeRef", {})
    runtime = runtimes.get(ref.get("name", ""))
    world = World("TrainJob", tj["metadata"]["name"], tj, {}, {}, runtime=runtime)
    if runtime is None or ref.get("kind", "ClusterTrainingRuntime") != "ClusterTrainingRuntime":
        return world
    world.jobset_spec = runtime["spec"]["template"]["spec"]
    world.job_specs = {rj["name"]: rj.get("template", {}).get("spec", {})
                       for rj in world.jobset_spec.get("replicatedJobs", [])}
    if TRAINER_NODE not in world.job_specs:
        return world
    nodes = int((tj["spec"].get("trainer") or {}).get("numNodes")
                or runtime["spec"].get("mlPolicy", {}).get("numNodes", 1))
    job = trainer_job(tj, runtime, nodes)
    pod = job["template"]
    labels = {JOBSET_NAME_LABEL: world.name, REPLICATED_JOB_LABEL: TRAINER_NODE}
    world.roles.append(role(world, f"{TRAINER_NODE} (rank 0)", job, pod, 1, True,
                            {**labels, COMPLETION_INDEX_LABEL: "0"}))
    if nodes > 1:
        others = "rank 1" if nodes == 2 else f"ranks 1-{nodes - 1}"
        world.roles.append(role(world, f"{TRAINER_NODE} ({others})", job, pod, nodes - 1, False,
                                {**labels, COMPLETION_INDEX_LABEL: "1"}))
    return world


def build(objects: list[dict[str, Any]], cluster: list[dict[str, Any]]) -> list[World]:
    """Every world in `objects`; TrainJobs find their ClusterTrainingRuntime in `cluster`."""
    runtimes = {o["metadata"]["name"]: o for o in cluster
                if o.get("kind") == "ClusterTrainingRuntime"}
    worlds = [jobset_world(o) for o in objects if o.get("kind") == "JobSet"]
    worlds += [trainjob_world(o, runtimes) for o in objects if o.get("kind") == "TrainJob"]
    return worlds


def as_job(workload: dict[str, Any]) -> dict[str, Any]:
    """A role as the batch/v1 Job its controller creates (Indexed, JobSet's default), for the
    Kubernetes schemas and for Checkov; the name says where it came from."""
    name = workload["metadata"]["name"].replace("/", "-").replace(" ", "-")
    name = "".join(ch for ch in name.lower() if ch.isalnum() or ch == "-").strip("-")
    spec = {"completionMode": "Indexed", **workload["world"]["job"],
            "template": workload["spec"]["template"]}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": workload["metadata"]["namespace"]},
            "spec": spec}


def load(path: Path) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all(path.read_text()) if o]


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[0] != "jobs":
        print(__doc__)
        return 2
    cluster = load(Path(argv[2])) if len(argv) == 3 else []
    jobs = [as_job(r) for w in build(load(Path(argv[1])), cluster) for r in w.roles]
    if jobs:
        print(yaml.safe_dump_all(jobs, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
