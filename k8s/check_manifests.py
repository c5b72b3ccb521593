"""Offline checks of rendered Kubernetes manifests that schema validation cannot make.

kubernetes-validate checks every object against the API schemas (k8s/check_crds.py the custom
resources of the multi-node learner against theirs). It cannot see how objects
refer to each other (a Service selector that matches no pod, a volume naming a missing ConfigMap),
the rules this deployment sets itself (non-root, probes, one learner; least privilege: a default
deny and exactly the network flows the services need, each pod with only its own credentials as
files, one TLS identity per component; data safety, rollout and image-pinning rules), CRD kinds
such as ServiceMonitor and cert-manager's, or whether the service configs and the dashboard match
the code. A multi-node learner's JobSet or TrainJob is checked through the pods it will create
(k8s/worlds.py), like a Deployment, plus what only a torch.distributed world needs (start-up order,
whole-world restarts, rank 0 alone behind the Services, shared checkpoints, its Kueue quota).
With `weight_transport: shared` (k8s/components/shared-weights), the learner's weight_shared_dir and
every generator's --weights-dir must be one directory of one ReadWriteMany claim, the generators'
mounts read-only.
k8s/validate.sh runs these checks:

    python k8s/check_manifests.py manifests RENDERED.yaml [OVERLAY [CLUSTER.yaml]]
        # one `kubectl kustomize` output; OVERLAY (e.g. overlays/local) selects the per-overlay
        # rules; CLUSTER.yaml is the rendered k8s/cluster and its parts k8s/cluster/*/ (priority
        # and storage classes, Kueue's ClusterQueue, Trainer's ClusterTrainingRuntime)
    python k8s/check_manifests.py cluster RENDERED_CLUSTER.yaml   # k8s/cluster
    python k8s/check_manifests.py dashboard k8s/dashboards/protege-job.json
    python k8s/check_manifests.py job k8s/examples/job.yaml
    python k8s/check_manifests.py prometheus k8s/prometheus/prometheus.yml STATIC_COPY.yml

Each prints one line per problem ("ERROR ...") or note ("NOTE ...") and exits 1 on any error.
Checks against the code (config fields, metric names, JobSpec) run when the protege package imports;
a service that is not written yet is a NOTE, not an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import worlds  # noqa: E402  (k8s/worlds.py: the pods of a JobSet or TrainJob learner world)

REPO = Path(__file__).resolve().parent.parent
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# Kinds without a namespace. A namespaced object with no namespace lands in kubectl's current one.
CLUSTER_SCOPED = (
    "Namespace", "PriorityClass", "StorageClass", "PersistentVolume", "ClusterRole",
    "ClusterRoleBinding", "CustomResourceDefinition", "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration", "ValidatingAdmissionPolicy", "IngressClass", "RuntimeClass",
    "CSIDriver", "VolumeSnapshotClass", "ClusterIssuer", "ClusterTrainingRuntime", "ClusterQueue",
    "ResourceFlavor",
)
# CRD kinds the Kubernetes schemas do not know; each has a check here, and the multi-node learner's
# kinds also a schema in k8s/schemas (k8s/check_crds.py). Keep in sync with CRD_KINDS in
# k8s/validate.sh.
CRD_KINDS = ("ServiceMonitor", "Certificate", "Issuer", "JobSet", "TrainJob", "LocalQueue",
             "ClusterQueue", "ResourceFlavor", "ClusterTrainingRuntime")
SERVICES = ("generator", "reference", "reward", "learner")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# The exec probe of a learner world whose ranks share one pod template (TrainJob): passes on ranks
# above 0, asks grpc.health.v1 on rank 0 (k8s/components/learner-world/learner_world.py).
WORLD_HEALTH_PROBE = ["python", "/etc/protege/learner_world.py", "health"]
# The only overlay that may ship Secrets (INSECURE placeholders for a throwaway cluster): every
# other overlay, and any overlay built on the base, leaves real Secrets alone.
PLACEHOLDER_SECRET_OVERLAYS = ("overlays/local",)
# Production overlays: every image pinned by digest.
DIGEST_PINNED_OVERLAYS = ("overlays/gpu-full",)
# The "not released yet" digest in a pinned overlay: a NOTE, or an ERROR with PROTEGE_RELEASE=1.
UNRELEASED_DIGEST = "sha256:" + "0" * 64
# The label that admits a pod to the learner's Jobs port (and lets it reach the learner); such pods
# are the users', not part of these manifests.
JOBS_CLIENT_LABEL = "protege.io/jobs-client"
# The only network flows the policies may allow between the deployment's own pods.
ALLOWED_FLOWS = {
    ("learner", "generator", 50051),
    ("learner", "reference", 50051),
    ("learner", "reward", 50051),
}
# gloo and NCCL connect between a world's pods on ports they pick from the ephemeral range (Linux:
# 32768-60999); the NetworkPolicy model checks one of them.
EPHEMERAL_PORT = 40000
# The learner's client certificate's identity; the mTLS servers accept no other, on any method.
LEARNER_CLIENT_IDENTITY = "protege-learner-client"
GRPC_SERVICES = {"generator": "Generator", "reference": "Reference", "reward": "Reward"}
# What each component's tokens file may grant (the learner's Jobs API: users and operators).
TOKEN_SCOPES = {
    "generator": {"generate", "weights"},
    "reference": {"reference"},
    "reward": {"reward"},
    "learner": {"jobs", "admin"},
}


class Report:
    """Collects errors and notes, prints them, and gives the exit status."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.notes: list[str] = []

    def error(self, message: str) -> None:
        self.errors.append(message)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.error(message)

    def finish(self) -> int:
        for n in dict.fromkeys(self.notes):
            print(f"NOTE {n}")
        for e in self.errors:
            print(f"ERROR {e}")
        return 1 if self.errors else 0


def kn(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A Service's plain label map: an empty one selects nothing (the Service has no endpoints)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (NetworkPolicy, PDB, spread constraints): `{}` selects every pod."""
    selector = selector or {}
    if not all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }.get(op)
        if not ok:
            return False
    return True


def selector_labels(selector: dict[str, Any] | None) -> set[str]:
    """The label keys a LabelSelector mentions."""
    selector = selector or {}
    return set(selector.get("matchLabels") or {}) | {
        e["key"] for e in selector.get("matchExpressions") or []
    }


QUANTITY_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "m": 10**-3,
}


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity ("500m", "2Gi", 4) as a number."""
    text = str(value)
    for suffix, factor in QUANTITY_SUFFIXES.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# ------------------------------------------------------------------------------------ manifests


class Manifests:
    """One rendered overlay, indexed by kind. A multi-node learner's JobSet or TrainJob counts as
    workloads too, one per pod role (k8s/worlds.py); a TrainJob's pods need its runtime, from
    `cluster` (the rendered k8s/cluster and its parts)."""

    def __init__(self, path: Path, cluster: Manifests | None = None):
        self.objects = [o for o in yaml.safe_load_all(path.read_text()) if o]
        self.by_kind: dict[str, dict[str, dict[str, Any]]] = {}
        for o in self.objects:
            self.by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
        self.worlds = worlds.build(self.objects, cluster.objects if cluster else [])

    def kind(self, kind: str) -> dict[str, dict[str, Any]]:
        return self.by_kind.get(kind, {})

    def workloads(self) -> list[dict[str, Any]]:
        """Deployments, StatefulSets and the pod roles of learner worlds."""
        return [*(o for k in WORKLOAD_KINDS for o in self.kind(k).values()),
                *(role for w in self.worlds for role in w.roles)]

    def pods_matching(self, selector: dict[str, str]) -> list[dict[str, Any]]:
        """Workloads whose pod template carries every label of `selector` (a Service's map)."""
        return [w for w in self.workloads() if matches(selector, pod_labels(w))]

    def pods_selected(self, selector: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Workloads whose pod template a LabelSelector selects (`{}`: all of them)."""
        return [w for w in self.workloads() if selects(selector, pod_labels(w))]

    def namespace(self) -> str | None:
        found = {o["metadata"].get("namespace") for o in self.objects} - {None}
        return found.pop() if len(found) == 1 else None


def pod_labels(w: dict[str, Any]) -> dict[str, str]:
    return w["spec"]["template"]["metadata"].get("labels", {})


def all_containers(w: dict[str, Any]) -> list[dict[str, Any]]:
    """Init containers and containers: both run with the pod's rights and count for its QoS."""
    pod = w["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def serves(w: dict[str, Any], c: dict[str, Any]) -> bool:
    """Whether a container serves (and so needs probes and a scrape annotation): all of them do,
    except those of a learner world's ranks above 0 that open no port."""
    return "world" not in w or bool(c.get("ports"))


def rank0(w: dict[str, Any]) -> bool:
    """Whether a workload is not a world's role of ranks above 0."""
    return "world" not in w or w["world"]["rank0"]


def component(w: dict[str, Any]) -> str:
    return pod_labels(w).get("app.kubernetes.io/component", "")


def check_namespaces(m: Manifests, r: Report) -> None:
    namespaces = {
        o["metadata"].get("namespace") for o in m.objects if o["kind"] not in CLUSTER_SCOPED
    }
    r.check(
        len(namespaces) == 1 and None not in namespaces,
        f"namespaced objects need one explicit namespace, got {sorted(map(str, namespaces))}",
    )


def check_security(w: dict[str, Any], r: Report) -> None:
    pod = w["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    r.check(
        psc.get("runAsNonRoot") is True, f"{kn(w)}: pod securityContext.runAsNonRoot must be true"
    )
    r.check(
        psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        f"{kn(w)}: pod seccompProfile must be RuntimeDefault",
    )
    r.check(
        pod.get("automountServiceAccountToken") is False,
        f"{kn(w)}: automountServiceAccountToken must be false",
    )
    for c in all_containers(w):
        sc = c.get("securityContext", {})
        r.check(
            sc.get("allowPrivilegeEscalation") is False,
            f"{kn(w)}/{c['name']}: allowPrivilegeEscalation must be false",
        )
        r.check(
            "ALL" in sc.get("capabilities", {}).get("drop", []),
            f"{kn(w)}/{c['name']}: capabilities must drop ALL",
        )
        if sc.get("readOnlyRootFilesystem"):
            mounts = {v["mountPath"] for v in c.get("volumeMounts", [])}
            r.check("/tmp" in mounts, f"{kn(w)}/{c['name']}: read-only root needs a /tmp volume")


def check_resources_and_probes(w: dict[str, Any], r: Report) -> None:
    """Every container sized; every container that serves a port probed (a world's ranks above 0
    serve nothing: torchrun and NCCL's watchdog fail such a pod, and the world restarts)."""
    for c in all_containers(w):
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for name in ("cpu", "memory"):
                r.check(name in res.get(part, {}), f"{kn(w)}/{c['name']}: no {part}.{name}")
    for c in w["spec"]["template"]["spec"]["containers"]:
        for probe in PROBES if serves(w, c) else ():
            r.check(probe in c, f"{kn(w)}/{c['name']}: no {probe}")


def check_secret_ref(
    m: Manifests, r: Report, where: str, name: str, key: str | None, optional: bool
) -> None:
    secret = m.kind("Secret").get(name)
    if secret is None:
        if optional:
            r.note(f"optional Secret {name} is not in this output; it is used only once created")
        elif name.startswith("protege-"):
            r.note(
                f"Secret {name} is not in this output: create it before applying (k8s/README.md)"
            )
        else:
            r.error(f"{where}: Secret {name} does not exist")
        return
    keys = set(secret.get("data", {})) | set(secret.get("stringData", {}))
    r.check(key is None or key in keys or optional, f"{where}: Secret {name} has no key {key}")


def check_configmap_ref(
    m: Manifests, r: Report, where: str, name: str, keys: Iterable[str]
) -> None:
    cm = m.kind("ConfigMap").get(name)
    if cm is None:
        r.error(f"{where}: ConfigMap {name} does not exist")
        return
    for key in keys:
        r.check(key in cm.get("data", {}), f"{where}: ConfigMap {name} has no key {key}")


def check_volumes(m: Manifests, w: dict[str, Any], r: Report) -> None:
    pod = w["spec"]["template"]["spec"]
    claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
    names = {v["name"] for v in pod.get("volumes", [])} | claims
    for v in pod.get("volumes", []):
        sources = [v] + [s for s in v.get("projected", {}).get("sources", [])]
        for s in sources:
            if "configMap" in s:
                cm = s["configMap"]
                check_configmap_ref(
                    m, r, kn(w), cm["name"], [i["key"] for i in cm.get("items", [])]
                )
            if "secret" in s:
                sec = s["secret"]
                name = sec.get("secretName", sec.get("name"))
                for item in sec.get("items", [None]):
                    check_secret_ref(
                        m, r, kn(w), name, item and item["key"], sec.get("optional", False)
                    )
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            r.check(
                claim in m.kind("PersistentVolumeClaim"), f"{kn(w)}: PVC {claim} does not exist"
            )
    for c in all_containers(w):
        for mount in c.get("volumeMounts", []):
            r.check(
                mount["name"] in names,
                f"{kn(w)}/{c['name']}: mounts unknown volume {mount['name']}",
            )
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                check_secret_ref(
                    m,
                    r,
                    f"{kn(w)} env {env['name']}",
                    ref["name"],
                    ref["key"],
                    ref.get("optional", False),
                )


def check_metrics_annotations(w: dict[str, Any], r: Report) -> None:
    ann = w["spec"]["template"]["metadata"].get("annotations", {})
    ports = {
        p["containerPort"]: p.get("name")
        for c in w["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    }
    if not any(serves(w, c) for c in w["spec"]["template"]["spec"]["containers"]):
        r.check("prometheus.io/scrape" not in ann,
                f"{kn(w)}: prometheus.io/scrape on a pod that serves no port")
        return
    r.check(
        ann.get("prometheus.io/scrape") == "true", f"{kn(w)}: no prometheus.io/scrape annotation"
    )
    port = ann.get("prometheus.io/port", "")
    r.check(
        port.isdigit() and ports.get(int(port)) == "metrics",
        f"{kn(w)}: prometheus.io/port {port!r} is not the container's `metrics` port",
    )
    r.check(
        ann.get("prometheus.io/path") == "/metrics", f"{kn(w)}: prometheus.io/path is not /metrics"
    )


def check_workloads(m: Manifests, r: Report) -> None:
    accounts = m.kind("ServiceAccount")
    for w in m.workloads():
        check_security(w, r)
        check_resources_and_probes(w, r)
        check_volumes(m, w, r)
        check_metrics_annotations(w, r)
        sa = w["spec"]["template"]["spec"].get("serviceAccountName")
        r.check(sa in accounts, f"{kn(w)}: ServiceAccount {sa} does not exist")
        if w["kind"] == "StatefulSet":
            svc = m.kind("Service").get(w["spec"].get("serviceName", ""))
            r.check(
                svc is not None and svc["spec"].get("clusterIP") == "None",
                f"{kn(w)}: serviceName must name a headless Service",
            )
    check_single_writer(m, r)


def check_single_writer(m: Manifests, r: Report) -> None:
    """One process writes the job store (SQLite): the StatefulSet with one replica, or one learner
    world, whose node rank 0 is a single pod."""
    learner = m.kind("StatefulSet").get("protege-learner")
    learner_worlds = [w for w in m.worlds if w.roles and component(w.roles[0]) == "learner"]
    if learner_worlds:
        r.check(learner is None and len(learner_worlds) == 1,
                "one learner only: a StatefulSet/protege-learner and a learner world, or two "
                "worlds, would both write the job store")
        for w in learner_worlds:
            leaders = [role for role in w.roles if role["world"]["rank0"]]
            r.check(len(leaders) == 1 and leaders[0]["world"]["pods"] == 1,
                    f"{w.kind}/{w.name}: node rank 0 must be exactly one pod (the Jobs API and the "
                    "job store's only writer)")
        return
    r.check(
        learner is not None and learner["spec"].get("replicas") == 1,
        "StatefulSet/protege-learner must exist with replicas: 1 (SQLite is single-writer)",
    )


def container_ports(workloads: list[dict[str, Any]]) -> set[Any]:
    return {
        x
        for w in workloads
        for c in w["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
        for x in (p["containerPort"], p.get("name"))
    }


def check_services(m: Manifests, r: Report) -> None:
    """Each Service selects pods, each of which serves its ports; a learner world's Services
    select node rank 0 only (the other ranks serve nothing)."""
    for svc in m.kind("Service").values():
        pods = m.pods_matching(svc["spec"].get("selector", {}))
        r.check(bool(pods), f"{kn(svc)}: selector matches no pod template")
        for p in svc["spec"]["ports"]:
            for w in pods:
                r.check(
                    p.get("targetPort", p["port"]) in container_ports([w]),
                    f"{kn(svc)}: targetPort {p.get('targetPort')} is not a port of {kn(w)}",
                )
        for w in pods:
            r.check(rank0(w), f"{kn(svc)}: selects {kn(w)}, ranks above 0 of a learner world, "
                    "which serve nothing; select node rank 0 only")


def check_selectors(m: Manifests, r: Report) -> None:
    for pdb in m.kind("PodDisruptionBudget").values():
        r.check(
            bool(m.pods_selected(pdb["spec"].get("selector"))),
            f"{kn(pdb)}: selector matches no pod template",
        )


# ------------------------------------------------------------------------------- network policy


def for_clients(selector: dict[str, Any] | None) -> bool:
    """Whether a selector picks the users' jobs clients, which are not in these manifests."""
    return JOBS_CLIENT_LABEL in selector_labels(selector)


def check_policy_shape(m: Manifests, np: dict[str, Any], r: Report) -> None:
    """Selectors that exist, peers that are pinned, ports that are the destination's."""
    spec = np["spec"]
    pods = m.pods_selected(spec.get("podSelector"))
    r.check(bool(pods) or for_clients(spec.get("podSelector")),
            f"{kn(np)}: podSelector matches no pod template")
    for direction, key in (("ingress", "from"), ("egress", "to")):
        for rule in spec.get(direction, []):
            peers = rule.get(key)
            r.check(bool(peers), f"{kn(np)}: an {direction} rule without `{key}` admits every "
                    "address; name the peers")
            in_namespace = []
            for peer in peers or []:
                in_namespace += check_peer(m, np, direction, peer, r)
            # A port is the destination pod's: the selected pods' on ingress, the peers' on egress.
            destination = pods if direction == "ingress" else in_namespace
            ports = container_ports(destination)
            for p in rule.get("ports", []):
                if destination and "endPort" in p:
                    numbers = [x for x in ports if isinstance(x, int)]
                    r.check(any(p["port"] <= x <= p["endPort"] for x in numbers),
                            f"{kn(np)}: {direction} ports {p['port']}-{p['endPort']} hold no port "
                            "of those pods")
                elif destination:
                    r.check(p["port"] in ports,
                            f"{kn(np)}: {direction} port {p['port']} is not a port of those pods")


def check_peer(
    m: Manifests, np: dict[str, Any], direction: str, peer: dict[str, Any], r: Report
) -> list[dict[str, Any]]:
    """One from/to peer; returns the workloads here it selects."""
    if "ipBlock" in peer:
        r.check(peer["ipBlock"].get("cidr") not in ("0.0.0.0/0", "::/0"),
                f"{kn(np)}: {direction} peer ipBlock {peer['ipBlock'].get('cidr')} is the internet")
        return []
    if "namespaceSelector" in peer:
        # Another namespace (Prometheus, kube-dns): pinned to one namespace by name, and to pods.
        names = (peer["namespaceSelector"].get("matchLabels") or {})
        r.check("kubernetes.io/metadata.name" in names,
                f"{kn(np)}: {direction} peer's namespaceSelector must name one namespace "
                "(matchLabels kubernetes.io/metadata.name), not every namespace with a label")
        r.check(bool(selector_labels(peer.get("podSelector"))),
                f"{kn(np)}: {direction} peer in namespace {names} must also select pods "
                "(podSelector), not the whole namespace")
        return []
    selector = peer.get("podSelector")
    r.check(bool(selector_labels(selector)), f"{kn(np)}: {direction} peer `podSelector: {{}}` is "
            "every pod in the namespace, whoever runs it; select the pods by label")
    selected = m.pods_selected(selector)
    r.check(bool(selected) or for_clients(selector),
            f"{kn(np)}: {direction} peer {selector} matches no pod template")
    return selected


def policy_allows(
    policies: list[dict[str, Any]], direction: str, pod: dict[str, Any], peer: dict[str, Any],
    port: int,
) -> bool:
    """NetworkPolicy semantics for traffic between two pods of this namespace, seen from `pod`:
    allowed when no policy of that direction selects `pod`, or when a rule of one that does admits
    `peer` on `port`."""
    kind, key = ("Ingress", "from") if direction == "ingress" else ("Egress", "to")
    applying = [np for np in policies if kind in np["spec"].get("policyTypes", ["Ingress"])
                and selects(np["spec"].get("podSelector"), pod_labels(pod))]
    if not applying:
        return True
    names = {p["containerPort"]: p.get("name") for c in
             (peer if direction == "egress" else pod)["spec"]["template"]["spec"]["containers"]
             for p in c.get("ports", [])}
    for np in applying:
        for rule in np["spec"].get(direction, []):
            port_ok = not rule.get("ports") or any(
                p["port"] <= port <= p["endPort"] if "endPort" in p
                else p["port"] in (port, names.get(port)) for p in rule["ports"])
            peer_ok = any("namespaceSelector" not in x and "ipBlock" not in x
                          and selects(x.get("podSelector"), pod_labels(peer))
                          for x in rule.get(key) or [])
            if port_ok and peer_ok:
                return True
    return False


def check_network_policies(m: Manifests, r: Report) -> None:
    policies = list(m.kind("NetworkPolicy").values())
    for np in policies:
        check_policy_shape(m, np, r)
    deny = [np for np in policies
            if np["spec"].get("podSelector") in ({}, None)
            and {"Ingress", "Egress"} <= set(np["spec"].get("policyTypes", []))
            and not np["spec"].get("ingress") and not np["spec"].get("egress")]
    r.check(bool(deny), "no default-deny NetworkPolicy (podSelector: {}, policyTypes [Ingress, "
            "Egress], no rules): pods not named by a policy would be open both ways")
    # Between our own pods, exactly the flows the deployment needs: both ends must allow each.
    workloads = m.workloads()
    for src in workloads:
        for dst in workloads:
            ports = {p for c in dst["spec"]["template"]["spec"]["containers"]
                     for p in (x["containerPort"] for x in c.get("ports", []))}
            if same_world(src, dst):
                ports.add(EPHEMERAL_PORT)
            for port in sorted(ports):
                allowed = (policy_allows(policies, "egress", src, dst, port)
                           and policy_allows(policies, "ingress", dst, src, port))
                wanted = ((component(src), component(dst), port) in ALLOWED_FLOWS
                          or same_world(src, dst))
                if allowed != wanted:
                    r.error(f"NetworkPolicies {'allow' if allowed else 'block'} {kn(src)} -> "
                            f"{kn(dst)}:{port}; the flows between the services must be exactly "
                            f"{sorted(ALLOWED_FLOWS)}, plus any TCP port within a learner world")


def same_world(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two workloads are pods of one learner world (rendezvous, gloo, NCCL: any port)."""
    return "world" in a and "world" in b and a["world"]["world"] is b["world"]["world"]


# --------------------------------------------------------------------------------- credentials


def mounted_secrets(w: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(Secret name, volume source) for every Secret the pod mounts, directly or projected."""
    found = []
    for v in w["spec"]["template"]["spec"].get("volumes", []):
        for s in [v, *v.get("projected", {}).get("sources", [])]:
            if "secret" in s:
                found.append((s["secret"].get("secretName", s["secret"].get("name")), s["secret"]))
    return found


def check_credentials(m: Manifests, overlay: str, r: Report) -> None:
    """Each pod holds only its own credentials, as files; Secrets ship only as placeholders."""
    for w in m.workloads():
        own = f"protege-{component(w)}-"
        for name, _ in mounted_secrets(w):
            r.check(name.startswith(own), f"{kn(w)}: mounts Secret {name}; a pod mounts only its "
                    f"own component's Secrets ({own}*), so one compromised pod leaks nothing else")
        for c in all_containers(w):
            for env in c.get("env", []):
                r.check("secretKeyRef" not in env.get("valueFrom", {}),
                        f"{kn(w)}/{c['name']}: env {env['name']} comes from a Secret; mount "
                        "credentials as files (environment variables leak into crash dumps, "
                        "/proc and child processes)")
            for e in c.get("envFrom", []):
                r.check("secretRef" not in e, f"{kn(w)}/{c['name']}: envFrom a Secret")
            volumes = {v["name"]: v for v in w["spec"]["template"]["spec"].get("volumes", [])}
            for mount in c.get("volumeMounts", []):
                v = volumes.get(mount["name"], {})
                r.check(not (mount.get("subPath") and ("secret" in v or "projected" in v)),
                        f"{kn(w)}/{c['name']}: subPath mount of {mount['name']}: the kubelet never "
                        "updates subPath mounts, so renewed certificates and rotated tokens "
                        "would not arrive")
        if follower_template(w):
            check_follower_credentials(w, r)
    secrets = m.kind("Secret")
    if secrets and overlay not in PLACEHOLDER_SECRET_OVERLAYS:
        r.error(f"ships Secrets {sorted(secrets)}: only {PLACEHOLDER_SECRET_OVERLAYS} may "
                "(INSECURE placeholders); elsewhere `kubectl apply -k` would overwrite real ones")
    for s in secrets.values():
        values = {**s.get("stringData", {}), **s.get("data", {})}
        r.check(all("INSECURE" in str(v) or k == "tokens.yaml" for k, v in values.items()),
                f"{kn(s)}: a Secret in git must be a placeholder (every token says INSECURE)")
    check_placeholder_tokens(secrets, r)


def follower_template(w: dict[str, Any]) -> bool:
    """Whether `w` is a world's ranks above 0 with a pod template of their own (a JobSet's
    workers), not rank 0's (every rank of a TrainJob's one replicatedJob shares rank 0's)."""
    if rank0(w):
        return False
    leader = next(x for x in w["world"]["world"].roles if x["world"]["rank0"])
    return w["world"]["replicated_job"] != leader["world"]["replicated_job"]


def check_follower_credentials(w: dict[str, Any], r: Report) -> None:
    """Ranks above 0 call no service and serve no Jobs API: where their template is their own, they
    hold none of the learner's tokens (k8s/README.md, "Multi-node learner")."""
    for name, _ in mounted_secrets(w):
        r.error(f"{kn(w)}: mounts Secret {name}, but ranks above 0 use no credentials; mount "
                "the learner's Secrets on rank 0 only")
    for c in all_containers(w):
        flags = [a for a in c.get("args", []) if a.split("=", 1)[0].endswith("-token-file")]
        r.check(not flags, f"{kn(w)}/{c['name']}: passes {flags}, but ranks above 0 call no "
                "service; give the token files to rank 0 only")
        r.check("PROTEGE_TOKENS_FILE" not in env_of(c), f"{kn(w)}/{c['name']}: sets "
                "PROTEGE_TOKENS_FILE, but ranks above 0 serve no Jobs API")


def check_placeholder_tokens(secrets: dict[str, dict[str, Any]], r: Report) -> None:
    """The placeholder Secrets work together: each server's tokens file holds hashes (never a
    plaintext token), grants only its component's scopes, and accepts the learner's token for it."""
    client = secrets.get("protege-learner-client", {}).get("stringData", {})
    for comp, scopes in TOKEN_SCOPES.items():
        secret = secrets.get(f"protege-{comp}-auth")
        if secret is None:
            continue
        entries = yaml.safe_load(secret.get("stringData", {}).get("tokens.yaml", "")) or {}
        for key, granted in entries.items():
            granted = {granted} if isinstance(granted, str) else set(granted)
            r.check(re.fullmatch(r"sha256\$[0-9a-f]+\$[0-9a-f]{64}", str(key)) is not None,
                    f"{kn(secret)}: tokens.yaml entries must be hashes (`protege token hash`)")
            r.check(granted <= scopes, f"{kn(secret)}: grants {sorted(granted - scopes)}; "
                    f"{comp} needs at most {sorted(scopes)}")
        token = client.get(f"{comp}-token")
        if token is not None:
            r.check(any(token_matches(str(k), token) for k in entries),
                    f"{kn(secret)}: no entry accepts the learner's {comp}-token")


def token_matches(hashed: str, token: str) -> bool:
    """Whether `hashed` ('sha256$<salt hex>$<digest hex>') is the hash of `token`."""
    parts = hashed.split("$")
    if len(parts) != 3:
        return False
    return hashlib.sha256(bytes.fromhex(parts[1]) + token.encode()).hexdigest() == parts[2]


# ------------------------------------------------------------------------------------------ TLS


def check_tls_identities(w: dict[str, Any], data: dict[str, Any], r: Report) -> None:
    """An mTLS server must accept only the learner's client certificate, on every method, not any
    certificate of the CA (every component's own certificate is signed by it too)."""
    service = GRPC_SERVICES.get(component(w))
    if data.get("tls_client_ca") and service:
        want = {f"/protege.v1.{service}/": [LEARNER_CLIENT_IDENTITY]}
        r.check(data.get("tls_client_identities") == want,
                f"{kn(w)}: mTLS needs tls_client_identities {json.dumps(want)}; without it any "
                "certificate the CA signed (a generator's, a reward service's) may call it")
    if data.get("client_tls_cert"):
        r.check(str(data["client_tls_cert"]).startswith("/etc/protege/tls/client/"),
                f"{kn(w)}: the learner's client certificate must be its own (protege-learner-"
                "client-tls at /etc/protege/tls/client), not its server certificate")


def check_certificates(m: Manifests, r: Report) -> None:
    """cert-manager Certificates and Issuers (CRD kinds): each Secret mounted, names that match."""
    namespace = m.namespace() or "protege"
    mounted = {name: w for w in m.workloads() for name, _ in mounted_secrets(w)}
    issuers = m.kind("Issuer")
    ca_secrets = {i["spec"].get("ca", {}).get("secretName") for i in issuers.values()}
    for cert in m.kind("Certificate").values():
        spec = cert.get("spec", {})
        r.check(cert["apiVersion"] == "cert-manager.io/v1", f"{kn(cert)}: apiVersion")
        ref = spec.get("issuerRef", {})
        r.check(ref.get("kind") == "ClusterIssuer" or ref.get("name") in issuers,
                f"{kn(cert)}: issuerRef {ref.get('name')} is not an Issuer here")
        secret, usages = spec.get("secretName"), set(spec.get("usages", []))
        if secret in ca_secrets:
            r.check(spec.get("isCA") is True, f"{kn(cert)}: a CA Issuer's Secret needs isCA: true")
            continue
        r.check(secret in mounted, f"{kn(cert)}: Secret {secret} is mounted by no workload")
        if secret == "protege-learner-client-tls":
            r.check(usages == {"client auth", "digital signature"},
                    f"{kn(cert)}: the learner's client certificate is for client auth only")
            names = {spec.get("commonName"), *spec.get("dnsNames", [])}
            r.check(LEARNER_CLIENT_IDENTITY in names,
                    f"{kn(cert)}: must carry the identity {LEARNER_CLIENT_IDENTITY}")
        elif secret in mounted:
            comp = component(mounted[secret])
            r.check("server auth" in usages and "client auth" not in usages,
                    f"{kn(cert)}: a server certificate is for server auth only, so it cannot "
                    "stand in for the learner's client identity")
            dialed = {f"{s}.{namespace}.svc.cluster.local" for s, svc in m.kind("Service").items()
                      if svc["spec"].get("selector", {}).get("app.kubernetes.io/component") == comp}
            missing = sorted(dialed - set(spec.get("dnsNames", [])))
            r.check(not missing, f"{kn(cert)}: dnsNames lack {missing}, the names clients dial")
    for issuer in issuers.values():
        kinds = set(issuer.get("spec", {})) & {"selfSigned", "ca", "acme", "vault", "venafi"}
        r.check(len(kinds) == 1, f"{kn(issuer)}: needs exactly one issuer type, got {kinds}")


# -------------------------------------------------------------------------------- data safety


def check_data_safety(m: Manifests, cluster: Manifests | None, r: Report) -> None:
    """No Namespace in an overlay; the learner's volume on a Retain class; priority classes."""
    r.check(not m.kind("Namespace"), "the Namespace belongs in k8s/cluster, not in an overlay: "
            "`kubectl delete -k` would delete it and every claim in it")
    classes = cluster.kind("StorageClass") if cluster else {}
    priorities = cluster.kind("PriorityClass") if cluster else {}
    learner = m.kind("StatefulSet").get("protege-learner")
    if learner is not None:
        retention = learner["spec"].get("persistentVolumeClaimRetentionPolicy", {})
        r.check(retention.get("whenDeleted") == "Retain",
                f"{kn(learner)}: persistentVolumeClaimRetentionPolicy.whenDeleted must be Retain")
    for t in learner["spec"].get("volumeClaimTemplates", []) if learner else []:
        name = t["spec"].get("storageClassName")
        sc = classes.get(name)
        r.check(cluster is None or (sc is not None and sc.get("reclaimPolicy") == "Retain"
                                    and sc.get("volumeBindingMode") == "WaitForFirstConsumer"),
                f"{kn(learner)}: claim {t['metadata']['name']} uses storage class {name!r}; it "
                "must be a k8s/cluster class with reclaimPolicy Retain and WaitForFirstConsumer")
    for w in m.workloads():
        name = w["spec"]["template"]["spec"].get("priorityClassName")
        r.check(name is not None and (cluster is None or name in priorities),
                f"{kn(w)}: priorityClassName {name!r} is not a PriorityClass of k8s/cluster")
    check_world_claims(m, cluster, r)


def check_world_claims(m: Manifests, cluster: Manifests | None, r: Report) -> None:
    """A learner world's claims: one that pods on several nodes mount read-write must be
    ReadWriteMany (an RWO volume attaches on one node only), and the world's state (/data) must
    sit on a Retain + WaitForFirstConsumer class of k8s/cluster."""
    users: dict[str, dict[int, tuple[dict[str, Any], bool, str]]] = {}
    for w in (role for world in m.worlds for role in world.roles):
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"].get("volumes", [])}
        for c in all_containers(w):
            for mount in c.get("volumeMounts", []):
                claim = volumes.get(mount["name"], {}).get("persistentVolumeClaim")
                if claim is None:
                    continue
                read_only = bool(mount.get("readOnly") or claim.get("readOnly"))
                seen = users.setdefault(claim["claimName"], {}).get(id(w))
                read_only = read_only and (seen is None or seen[1])
                users[claim["claimName"]][id(w)] = (w, read_only, mount["mountPath"])
    classes = cluster.kind("StorageClass") if cluster else {}
    for name, by_role in users.items():
        pvc = m.kind("PersistentVolumeClaim").get(name, {"spec": {}})
        modes = set(pvc["spec"].get("accessModes", []))
        pods = sum(w["world"]["pods"] for w, _, _ in by_role.values())
        writes = not all(read_only for _, read_only, _ in by_role.values())
        shared = "ReadWriteMany" in modes or (not writes and "ReadOnlyMany" in modes)
        r.check(pods == 1 or shared,
                f"PersistentVolumeClaim/{name}: {pods} pods of a learner world mount it"
                f"{' read-write' if writes else ''}, which needs "
                f"{'ReadWriteMany' if writes else 'ReadOnlyMany'}, not {sorted(modes)}: an RWO "
                "volume attaches on one node only (give node rank 0 a template of its own for it)")
        if not any(p == "/data" or p.startswith("/data/") for _, _, p in by_role.values()):
            continue
        sc = classes.get(pvc["spec"].get("storageClassName"))
        r.check(cluster is None or (sc is not None and sc.get("reclaimPolicy") == "Retain"
                                    and sc.get("volumeBindingMode") == "WaitForFirstConsumer"),
                f"PersistentVolumeClaim/{name}: the learner world's state uses storage class "
                f"{pvc['spec'].get('storageClassName')!r}; it must be a k8s/cluster class with "
                "reclaimPolicy Retain and WaitForFirstConsumer")


def check_cluster(path: Path) -> int:
    """k8s/cluster: the namespace, the priority classes and the Retain storage class."""
    m, r = Manifests(path), Report()
    r.check(all(o["kind"] in CLUSTER_SCOPED for o in m.objects),
            "k8s/cluster holds cluster-scoped objects only")
    r.check(all(o["metadata"].get("namespace") is None for o in m.objects),
            "cluster-scoped objects take no namespace")
    for ns in m.kind("Namespace").values():
        labels = ns["metadata"].get("labels", {})
        r.check(labels.get("pod-security.kubernetes.io/enforce") == "restricted",
                f"{kn(ns)}: must enforce the restricted Pod Security Standard")
    r.check(any(sc.get("reclaimPolicy") == "Retain"
                and sc.get("volumeBindingMode") == "WaitForFirstConsumer"
                for sc in m.kind("StorageClass").values()),
            "no StorageClass with reclaimPolicy Retain and volumeBindingMode WaitForFirstConsumer")
    for pc in m.kind("PriorityClass").values():
        r.check(not pc.get("globalDefault"), f"{kn(pc)}: must not be the cluster's global default")
        r.check(pc.get("value", 0) < 1_000_000_000,
                f"{kn(pc)}: values from 1e9 up are the system's")
    return r.finish()


# ----------------------------------------------------------------------------------- rollouts


def gpu_count(w: dict[str, Any]) -> float:
    return sum(quantity(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in w["spec"]["template"]["spec"]["containers"])


def check_rollouts(m: Manifests, r: Report) -> None:
    for w in m.workloads():
        pod = w["spec"]["template"]["spec"]
        check_ephemeral_storage(w, r)
        if w["kind"] != "Deployment":
            continue
        rolling = w["spec"].get("strategy", {}).get("rollingUpdate", {})
        if gpu_count(w):
            r.check(str(rolling.get("maxSurge")) in ("0", "0%") and rolling.get("maxUnavailable"),
                    f"{kn(w)}: a GPU Deployment needs maxSurge: 0 and maxUnavailable >= 1; a surge "
                    "pod needs one more free GPU than the cluster has, and the rollout stalls")
        spread = [c for c in pod.get("topologySpreadConstraints", [])
                  if c.get("topologyKey") == "kubernetes.io/hostname"
                  and selects(c.get("labelSelector"), pod_labels(w))
                  and selector_labels(c.get("labelSelector"))]
        r.check(bool(spread), f"{kn(w)}: no topologySpreadConstraints over kubernetes.io/hostname "
                "selecting its own pods")
        r.check(all(c.get("whenUnsatisfiable") == "ScheduleAnyway" for c in spread),
                f"{kn(w)}: the spread must be soft (ScheduleAnyway), or a small cluster cannot "
                "schedule every replica")
    learners = [w for w in m.workloads() if component(w) == "learner"]
    for w, c in ((lw, c) for lw in learners for c in all_containers(lw)):
        res = c.get("resources", {})
        for name in ("cpu", "memory"):
            req, lim = res.get("requests", {}).get(name), res.get("limits", {}).get(name)
            r.check(req is not None and lim is not None and quantity(req) == quantity(lim),
                    f"{kn(w)}/{c['name']}: requests.{name} {req} != limits.{name} {lim}; "
                    "the learner must be Guaranteed QoS")


def check_ephemeral_storage(w: dict[str, Any], r: Report) -> None:
    """Requests so the scheduler counts disk; limits that leave room for the emptyDirs on disk."""
    pod = w["spec"]["template"]["spec"]
    on_disk = sum(quantity(v["emptyDir"].get("sizeLimit", 0)) for v in pod.get("volumes", [])
                  if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory")
    for c in pod["containers"]:
        res = c.get("resources", {})
        req = res.get("requests", {}).get("ephemeral-storage")
        lim = res.get("limits", {}).get("ephemeral-storage")
        r.check(req is not None and lim is not None,
                f"{kn(w)}/{c['name']}: needs requests and limits of ephemeral-storage")
        if lim is not None:
            r.check(quantity(lim) > on_disk,
                    f"{kn(w)}/{c['name']}: limits.ephemeral-storage {lim} must exceed the disk "
                    f"emptyDirs' sizeLimits ({on_disk / 2**30:g}Gi), or the kubelet evicts the pod "
                    "before they fill")


# ------------------------------------------------------------------------------- learner worlds

# The torchrun settings a learner world's pods must give (as PET_* variables or flags).
TORCHRUN_SETTINGS = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR",
                     "PET_MASTER_PORT")
# JobSet's per-Job annotations: right as node rank and world size only with one pod per Job.
PER_JOB_FIELDS = ("jobset.sigs.k8s.io/global-replicas", "jobset.sigs.k8s.io/job-global-index")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def check_worlds(m: Manifests, cluster: Manifests | None, r: Report) -> None:
    """What a learner world needs beyond what every workload needs (k8s/README.md, "Multi-node
    learner"): it exists as pods, starts in order without dependsOn, restarts as a whole, its ranks
    find rank 0, its sizes agree, and its gang fits its Kueue queue."""
    for world in m.worlds:
        where = f"{world.kind}/{world.name}"
        if not world.roles:
            ref = world.source.get("spec", {}).get("runtimeRef", {})
            r.error(f"{where}: runtimeRef {ref.get('kind', 'ClusterTrainingRuntime')}/"
                    f"{ref.get('name')} is not in k8s/cluster/trainer, or has no replicatedJob "
                    f"`{worlds.TRAINER_NODE}`; its pods cannot be checked")
            continue
        check_world_restarts(world, where, r)
        check_world_network(m, world, where, r)
        for role in world.roles:
            check_world_pod(world, role, r)
        check_world_order(m, world, r)
        check_world_state(m, world, r)
        if world.kind == "TrainJob":
            check_trainjob(world, where, r)
        check_world_queue(m, cluster, world, where, r)


def check_world_restarts(world: worlds.World, where: str, r: Report) -> None:
    """A lost pod restarts the whole world, never two rank 0s at once; start-up is not ordered by
    JobSet, which deadlocks under gang scheduling."""
    spec = world.jobset_spec
    for name, job in world.job_specs.items():
        rj = next(x for x in spec.get("replicatedJobs", []) if x["name"] == name)
        r.check(not rj.get("dependsOn"), f"{where}: replicatedJob {name} uses dependsOn, which "
                "deadlocks under gang scheduling (the scheduler waits for every pod, JobSet for "
                "the dependency); order start-up with init containers (learner_world.py wait)")
        r.check(job.get("backoffLimit") == 0, f"{where}: replicatedJob {name} needs backoffLimit "
                "0: a rank restarted alone cannot rejoin the world; let the JobSet restart it all")
        pod = job.get("template", {}).get("spec", {})
        r.check(pod.get("restartPolicy") == "Never",
                f"{where}: replicatedJob {name}: restartPolicy must be Never (podFailurePolicy)")
    r.check((spec.get("startupPolicy") or {}).get("startupPolicyOrder") != "InOrder",
            f"{where}: startupPolicy InOrder deadlocks under gang scheduling like dependsOn")
    policy = spec.get("failurePolicy") or {}
    r.check(policy.get("restartStrategy") == "BlockingRecreate" and "maxRestarts" in policy,
            f"{where}: failurePolicy needs restartStrategy BlockingRecreate (every old pod gone "
            "before the new world starts: never two writers of the job store) and maxRestarts")


def check_world_network(m: Manifests, world: worlds.World, where: str, r: Report) -> None:
    """Pods find each other by DNS name through the JobSet's headless Service."""
    network = world.jobset_spec.get("network") or {}
    r.check(network.get("enableDNSHostnames") is not False,
            f"{where}: network.enableDNSHostnames must not be false (rank 0's address)")
    r.check(network.get("publishNotReadyAddresses") is not False,
            f"{where}: network.publishNotReadyAddresses must not be false: rank 0 becomes ready "
            "only after the other ranks reached it by name")
    svc = m.kind("Service").get(world.subdomain)
    r.check(svc is None, f"{where}: a Service named {world.subdomain} exists, and JobSet would use "
            "it as the world's headless Service instead of creating one, so the pods' DNS names "
            "(rank 0's address) would not resolve; rename the JobSet/TrainJob or its subdomain")


def check_world_pod(world: worlds.World, role: dict[str, Any], r: Report) -> None:
    """torchrun's settings complete and consistent with the pod's size."""
    c = role["spec"]["template"]["spec"]["containers"][0]
    env = env_of(c)
    launch = torchrun_launch(c.get("command", []), c.get("args", []))
    options = launch[2] if launch else {}
    for name in TORCHRUN_SETTINGS:
        flag = "--" + name.removeprefix("PET_").lower().replace("_", "-")
        r.check(name in env or flag in options,
                f"{kn(role)}: torchrun gets no {flag} (flag or {name})")
    for name, e in env.items():
        path = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
        per_job = [f for f in PER_JOB_FIELDS if f in path]
        for job_name, job in world.job_specs.items():
            r.check(not per_job or job.get("parallelism", 1) == 1,
                    f"{kn(role)}: {name} reads {per_job}, which counts Jobs, but replicatedJob "
                    f"{job_name} runs {job.get('parallelism')} pods per Job")
    gpus = quantity(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
    nproc = str(env.get("PET_NPROC_PER_NODE", {}).get("value", ""))
    r.check(not gpus or nproc == str(int(gpus)), f"{kn(role)}: PET_NPROC_PER_NODE {nproc!r} but "
            f"{gpus:g} GPUs: one rank per GPU")
    threads = str(env.get("OMP_NUM_THREADS", {}).get("value", ""))
    cpu = quantity(c.get("resources", {}).get("limits", {}).get("cpu", 0))
    r.check(not (threads.isdigit() and nproc.isdigit()) or int(threads) * int(nproc) <= cpu,
            f"{kn(role)}: OMP_NUM_THREADS {threads} x {nproc} ranks exceeds the {cpu:g} CPUs")
    if role["world"]["rank0"]:
        port = env.get("PET_MASTER_PORT", {}).get("value")
        r.check(port is None or int(port) in container_ports([role]),
                f"{kn(role)}: PET_MASTER_PORT {port} is not a containerPort of node rank 0")


def mount_at(w: dict[str, Any], c: dict[str, Any], path: str
             ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The mount that holds `path` in container `c` (the deepest one) and its volume, or None."""
    mounts = [x for x in c.get("volumeMounts", []) if path == x["mountPath"]
              or path.startswith(x["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return None
    mount = max(mounts, key=lambda x: len(x["mountPath"]))
    volumes = {v["name"]: v for v in w["spec"]["template"]["spec"].get("volumes", [])}
    return mount, volumes.get(mount["name"], {})


def claim_at(w: dict[str, Any], c: dict[str, Any], path: str) -> str | None:
    """The claim behind `path` in container `c` (the deepest mount that holds it), or None."""
    found = mount_at(w, c, path)
    return found[1].get("persistentVolumeClaim", {}).get("claimName") if found else None


def check_world_state(m: Manifests, world: worlds.World, r: Report) -> None:
    """Rank 0's job store on a claim; the checkpoints on one claim that every rank mounts: each
    rank writes its optimizer shard into every checkpoint and reads it back on resume
    (services/learner/distributed.py, torch.distributed.checkpoint)."""
    claims: set[str | None] = set()
    for role in world.roles:
        c = role["spec"]["template"]["spec"]["containers"][0]
        found = service_config(m, role)
        if found is None:
            continue  # check_service_config reports it
        data = found[1]
        db, checkpoints = str(data.get("db_path", "")), str(data.get("checkpoint_root", ""))
        claims.add(where := claim_at(role, c, checkpoints))
        r.check(where is not None, f"{kn(role)}: checkpoint_root {checkpoints} is on no claim; "
                "every rank writes its optimizer shard there: a volume all ranks share")
        if role["world"]["rank0"]:
            r.check(claim_at(role, c, os.path.dirname(db)) is not None,
                    f"{kn(role)}: db_path {db} is on no claim; the job store would not survive a "
                    "restart of the world")
    r.check(len(claims) <= 1, f"{world.kind}/{world.name}: the ranks keep checkpoint_root on "
            f"different claims {sorted(map(str, claims))}; one checkpoint is written by all ranks")


def check_world_order(m: Manifests, world: worlds.World, r: Report) -> None:
    """Every pod runs learner_world.py wait first: rank 0 names ready-only headless Services of the
    services, the other ranks find rank 0's address and port."""
    for role in world.roles:
        waits = [c for c in role["spec"]["template"]["spec"].get("initContainers", [])
                 if "/etc/protege/learner_world.py" in c.get("command", [])
                 and "wait" in c.get("command", [])]
        if not waits:
            r.error(f"{kn(role)}: no init container runs learner_world.py wait; the start-up "
                    "order of the world (without dependsOn) needs it in every pod")
            continue
        env = env_of(waits[0])
        if role["world"]["rank0"]:
            for name in waits[0].get("args", []):
                svc = m.kind("Service").get(name, {}).get("spec", {})
                r.check(svc.get("clusterIP") == "None" and not svc.get("publishNotReadyAddresses"),
                        f"{kn(role)}: waits for {name}, which is not a headless Service of ready "
                        "pods only (it would resolve before any pod is ready)")
        else:
            for name in ("PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"):
                r.check(name in env, f"{kn(role)}: init container {waits[0]['name']} has no "
                        f"{name}; it cannot tell its rank or find rank 0")


def check_trainjob(world: worlds.World, where: str, r: Report) -> None:
    """What Trainer's webhook refuses, checked before it does."""
    trainer = world.source.get("spec", {}).get("trainer") or {}
    names = {e["name"] for e in trainer.get("env", [])}
    reserved = sorted(names & set(worlds.TORCHRUN_RESERVED_ENV))
    r.check(not reserved, f"{where}: trainer.env sets {reserved}; Trainer's torch policy sets "
            "them and its webhook refuses a TrainJob that does")
    runtime = world.runtime or {}
    torch = (runtime.get("spec", {}).get("mlPolicy") or {}).get("torch")
    r.check(torch is not None, f"{where}: runtime {runtime.get('metadata', {}).get('name')} has "
            "no mlPolicy.torch, so no PET_* variables are set")
    pod = world.roles[0]["spec"]["template"]["spec"]
    names = {c["name"] for c in [*pod.get("initContainers", []), *pod["containers"]]}
    for target in ((torch or {}).get("envInjection") or {}).get("targets", []):
        missing = set(target.get("containerNames", [])) - names
        r.check(target.get("jobName") in world.job_specs and not missing,
                f"{where}: envInjection target {target.get('jobName')}/{sorted(missing)} is not "
                "in the runtime's template")
    r.check(worlds.TRAINER_NODE in {c["name"] for c in pod["containers"]},
            f"{where}: the runtime has no container `{worlds.TRAINER_NODE}`, where Trainer puts "
            "the image, command and PET_* variables")


def pod_requests(w: dict[str, Any]) -> dict[str, float]:
    """One pod's requests as Kueue counts them: the larger of the init containers' largest and the
    containers' sum, per resource."""
    pod = w["spec"]["template"]["spec"]
    total: dict[str, float] = {}
    for c in pod["containers"]:
        for k, v in c.get("resources", {}).get("requests", {}).items():
            total[k] = total.get(k, 0.0) + quantity(v)
    for c in pod.get("initContainers", []):
        for k, v in c.get("resources", {}).get("requests", {}).items():
            total[k] = max(total.get(k, 0.0), quantity(v))
    return total


def check_world_queue(m: Manifests, cluster: Manifests | None, world: worlds.World, where: str,
                      r: Report) -> None:
    """Kueue admits a world only when its ClusterQueue covers every resource its pods request and
    has quota for all of them at once; otherwise it waits forever."""
    queue = world.source["metadata"].get("labels", {}).get(QUEUE_LABEL)
    if queue is None:
        r.note(f"{where}: no {QUEUE_LABEL} label, so no gang scheduling by Kueue (add "
               "k8s/components/kueue, or gang-schedule it another way)")
        return
    local = m.kind("LocalQueue").get(queue)
    if local is None:
        r.error(f"{where}: {QUEUE_LABEL} {queue} names no LocalQueue in this overlay")
        return
    if cluster is None:
        return
    cq = cluster.kind("ClusterQueue").get(local["spec"].get("clusterQueue", ""))
    if cq is None:
        r.error(f"LocalQueue/{queue}: ClusterQueue {local['spec'].get('clusterQueue')} is not in "
                "k8s/cluster/multinode")
        return
    namespace = world.source["metadata"].get("namespace")
    labels = {"kubernetes.io/metadata.name": namespace}
    r.check(selects(cq["spec"].get("namespaceSelector"), labels),
            f"{kn(cq)}: namespaceSelector does not select namespace {namespace}")
    need: dict[str, float] = {}
    for role in world.roles:
        for k, v in pod_requests(role).items():
            need[k] = need.get(k, 0.0) + v * role["world"]["pods"]
    quota: dict[str, float] = {}
    for group in cq["spec"].get("resourceGroups", []):
        for flavor in group.get("flavors", []):
            r.check(flavor["name"] in cluster.kind("ResourceFlavor"),
                    f"{kn(cq)}: flavor {flavor['name']} is not a ResourceFlavor of "
                    "k8s/cluster/multinode")
            for res in flavor.get("resources", []):
                quota[res["name"]] = quota.get(res["name"], 0.0) + quantity(res["nominalQuota"])
    for k, v in sorted(need.items()):
        r.check(k in quota, f"{where}: its pods request {k}, which {kn(cq)} does not cover; Kueue "
                "would never admit it")
        r.check(k not in quota or v <= quota[k], f"{where}: its {world.pods} pods request {v:g} "
                f"{k} together, more than {kn(cq)}'s quota {quota.get(k, 0):g}; it would never be "
                "admitted")


# ----------------------------------------------------------------------------- shared weights


def check_shared_weights(m: Manifests, cluster: Manifests | None, r: Report) -> None:
    """weight_transport 'shared' (k8s/components/shared-weights): the learner writes each version
    into weight_shared_dir and names the files to the generators relative to their --weights-dir
    (LoadWeightsFromPath), so both must be the same directory of one ReadWriteMany claim, written
    by the learner (node rank 0 of a world: it alone pushes) and only read by the generators."""
    configs = [(w, *found) for w in m.workloads() if (found := service_config(m, w))]
    learners = [(w, data) for w, service, data in configs if service == "learner"]
    pusher = next(((w, data) for w, data in learners if rank0(w)), None)
    if pusher is None:
        return  # check_single_writer reports it
    transport = str(pusher[1].get("weight_transport", "grpc"))
    written = None  # where rank 0 writes: (claim, directory within the claim, read-only)
    claims = set()
    for w, data in learners:
        if data.get("weight_transport") != "shared":
            continue
        r.check(transport == "shared", f"{kn(w)} has weight_transport 'shared', but "
                f"{kn(pusher[0])}, node rank 0 and the only rank that pushes weights, has "
                f"{transport!r}: give rank 0 the flags and the mount "
                "(k8s/components/shared-weights)")
        directory = str(data.get("weight_shared_dir", ""))
        place = shared_place(w, directory)
        r.check(place is not None and not place[2], f"{kn(w)}: weight_shared_dir {directory!r} "
                "is on no claim mounted read-write; the learner writes every version there for "
                "the generators to read")
        if place is not None:
            claims.add(place[0])
            written = place if w is pusher[0] else written
    for claim in sorted(claims):
        check_weights_claim(m, cluster, claim, r)
    for w, service, data in configs:
        if service == "generator":
            check_generator_weights_dir(w, data, transport, written, r)


def check_generator_weights_dir(w: dict[str, Any], data: dict[str, Any], transport: str,
                                written: tuple[str, str, bool] | None, r: Report) -> None:
    """A generator reads the files the learner names under its --weights-dir: the directory the
    learner writes, read-only."""
    directory = str(data.get("weights_dir", ""))
    if transport != "shared":
        if directory:
            r.note(f"{kn(w)}: --weights-dir {directory} is set, but the learner pushes with "
                   f"weight_transport {transport!r}, so the volume goes unused")
        return
    if not directory:
        r.error(f"{kn(w)}: no --weights-dir, but the learner pushes with weight_transport "
                "'shared': every job fails at its start (the generator does not offer 'shared'); "
                "mount the learner's claim and pass --weights-dir (k8s/components/shared-weights)")
        return
    place = shared_place(w, directory)
    r.check(written is None or (place is not None and place[:2] == written[:2]),
            f"{kn(w)}: --weights-dir {directory} is {describe_place(place)}, but the learner "
            f"writes to {describe_place(written)}: the files it names would not be there")
    r.check(place is None or place[2], f"{kn(w)}: mount claim {place and place[0]} read-only at "
            "--weights-dir: a generator only reads it, and a writable mount would let one "
            "generator plant weights for the others")


def shared_place(w: dict[str, Any], path: str) -> tuple[str, str, bool] | None:
    """Where `path` of the workload's main container lies: (claim, the directory within the claim,
    whether the mount or the claim is read-only), or None when it is on no claim."""
    c = w["spec"]["template"]["spec"]["containers"][0]
    found = mount_at(w, c, path) if path.startswith("/") else None
    claim = found[1].get("persistentVolumeClaim") if found else None
    if found is None or claim is None:
        return None
    mount = found[0]
    inside = os.path.relpath(path, mount["mountPath"])
    within = os.path.normpath(os.path.join("/", mount.get("subPath", ""), inside))
    return claim["claimName"], within, bool(mount.get("readOnly") or claim.get("readOnly"))


def describe_place(place: tuple[str, str, bool] | None) -> str:
    return f"{place[1]} of claim {place[0]}" if place else "on no claim"


def check_weights_claim(m: Manifests, cluster: Manifests | None, name: str, r: Report) -> None:
    """The shared weights claim: ReadWriteMany (the learner writes it, generators on other nodes
    read it), on a storage class of k8s/cluster when it names one."""
    pvc = m.kind("PersistentVolumeClaim").get(name)
    if pvc is None:
        return  # check_volumes reports it
    modes = pvc["spec"].get("accessModes", [])
    r.check("ReadWriteMany" in modes, f"PersistentVolumeClaim/{name}: the shared weights "
            "directory needs ReadWriteMany (the learner writes it, generators on other nodes read "
            f"it), not {modes}")
    sc = pvc["spec"].get("storageClassName")
    r.check(cluster is None or not sc or sc in cluster.kind("StorageClass"),
            f"PersistentVolumeClaim/{name}: storage class {sc!r} is not in k8s/cluster (apply "
            "k8s/cluster/shared-weights for protege-shared)")


# -------------------------------------------------------------------------------- supply chain


DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def check_images(m: Manifests, overlay: str, r: Report) -> None:
    for w in m.workloads():
        for c in all_containers(w):
            image = c.get("image", "")
            if overlay in DIGEST_PINNED_OVERLAYS:
                r.check(bool(DIGEST.search(image)), f"{kn(w)}/{c['name']}: image {image} is not "
                        "pinned by digest (@sha256:...) in a production overlay")
                if image.endswith(UNRELEASED_DIGEST):
                    message = (f"{overlay}: {c['name']} image digest is the unreleased marker; the "
                               "release sets the real one (k8s/README.md, \"Supply chain\")")
                    if os.environ.get("PROTEGE_RELEASE") == "1":
                        r.error(message)
                    else:
                        r.note(message)
            else:
                tag = image.rsplit("/", 1)[-1].partition(":")[2]
                r.check(bool(tag) and tag != "latest" or "@sha256:" in image,
                        f"{kn(w)}/{c['name']}: image {image} needs a version tag or a digest")


def check_hpa(m: Manifests, r: Report) -> None:
    for hpa in m.kind("HorizontalPodAutoscaler").values():
        ref = hpa["spec"]["scaleTargetRef"]
        target = m.kind(ref["kind"]).get(ref["name"])
        if target is None:
            r.error(f"{kn(hpa)}: scale target {ref['kind']}/{ref['name']} does not exist")
            continue
        r.check(
            "replicas" not in target["spec"],
            f"{kn(hpa)}: {kn(target)} sets spec.replicas, which would fight the autoscaler",
        )
        for c in target["spec"]["template"]["spec"]["containers"]:
            r.check(
                "cpu" in c.get("resources", {}).get("requests", {}),
                f"{kn(hpa)}: {kn(target)}/{c['name']} has no CPU request to scale on",
            )
        check_hpa_budget(m, hpa, target, r)


def check_hpa_budget(m: Manifests, hpa: dict[str, Any], target: dict[str, Any], r: Report) -> None:
    """At the autoscaler's floor, a drain must leave a pod serving and still be able to proceed."""
    low = hpa["spec"].get("minReplicas", 1)
    for pdb in m.kind("PodDisruptionBudget").values():
        if not selects(pdb["spec"].get("selector"), pod_labels(target)):
            continue
        spec = pdb["spec"]
        if "maxUnavailable" in spec:
            left = low - int(quantity(str(spec["maxUnavailable"]).rstrip("%")))
            r.check(left >= 1 and "%" not in str(spec["maxUnavailable"]),
                    f"{kn(hpa)}: minReplicas {low} with {kn(pdb)} maxUnavailable "
                    f"{spec['maxUnavailable']} lets a drain evict every pod; keep minReplicas >= 2")
        else:
            need = spec.get("minAvailable", 0)
            r.check(isinstance(need, int) and 1 <= need < low,
                    f"{kn(hpa)}: minReplicas {low} with {kn(pdb)} minAvailable {need}: a drain "
                    "must leave one pod and still be able to evict one")


def check_service_monitors(m: Manifests, r: Report) -> None:
    for sm in m.kind("ServiceMonitor").values():
        r.check(sm["apiVersion"] == "monitoring.coreos.com/v1", f"{kn(sm)}: apiVersion")
        spec = sm.get("spec", {})
        selector = spec.get("selector", {}).get("matchLabels", {})
        services = [
            s
            for s in m.kind("Service").values()
            if matches(selector, s["metadata"].get("labels", {}))
        ]
        r.check(bool(services), f"{kn(sm)}: selector matches no Service")
        endpoints = spec.get("endpoints", [])
        r.check(bool(endpoints), f"{kn(sm)}: spec.endpoints is empty")
        for ep in endpoints:
            for s in services:
                r.check(
                    ep.get("port") in {p.get("name") for p in s["spec"]["ports"]},
                    f"{kn(sm)}: endpoint port {ep.get('port')!r} is not a named port of {kn(s)}",
                )
        unknown = set(spec) - {
            "selector",
            "endpoints",
            "podTargetLabels",
            "targetLabels",
            "namespaceSelector",
            "jobLabel",
            "sampleLimit",
        }
        r.check(not unknown, f"{kn(sm)}: unknown spec fields {sorted(unknown)}")


def check_dashboard_configmaps(m: Manifests, r: Report) -> None:
    for cm in m.kind("ConfigMap").values():
        if cm["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
            continue
        for key, text in cm.get("data", {}).items():
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                r.error(f"{kn(cm)}: {key} is not valid JSON: {e}")


def config_class(service: str) -> type | None:
    """The service's config dataclass (a ServerOptions subclass), or None if not written yet."""
    try:
        module = importlib.import_module(f"protege.services.{service}.config")
        serving = importlib.import_module("protege.serving")
    except ModuleNotFoundError:
        return None
    found = [
        v
        for v in vars(module).values()
        if isinstance(v, type)
        and dataclasses.is_dataclass(v)
        and issubclass(v, serving.ServerOptions)
        and v is not serving.ServerOptions
    ]
    return found[0] if found else None


def effective_config(cls: type | None, yaml_text: str, args: list[str], where: str, r: Report):
    """What the service would load: the YAML, then its command-line flags (protege.configs)."""
    data = yaml.safe_load(yaml_text) or {}
    if cls is None:
        return data
    configs = importlib.import_module("protege.configs")
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            namespace, unknown = configs.build_parser(cls, "").parse_known_args(args)
    except SystemExit:
        r.error(
            f"{where}: the service refuses its args: {stderr.getvalue().strip().splitlines()[-1]}"
        )
        return None
    if unknown:
        r.error(f"{where}: the service does not know the args {unknown}")
        return None
    flags = vars(namespace)
    flags.pop("config", None)
    return {**data, **flags}


# Refusals that depend on the machine the check runs on, not on the manifests.
HOST_DEPENDENT = ("is not available", "not installed", "No module named")


def check_config_values(cls: type, data: dict[str, Any], where: str, r: Report) -> None:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        r.error(f"{where}: {unknown} are not fields of {cls.__name__} (it would refuse to start)")
        return
    # This machine has no GPU: check a GPU config's values with the device set to cpu (a config may
    # refuse "cuda" where CUDA is missing, which says nothing about the manifest).
    on_host = dict(data)
    if str(data.get("device", "")).startswith("cuda"):
        on_host["device"] = "cpu"
    try:
        cls(**on_host)
    except Exception as e:  # noqa: BLE001 - any refusal is reported
        paths = [v for v in data.values() if isinstance(v, str) and v.startswith("/")]
        if any(p in str(e) for p in paths) or any(h in str(e) for h in HOST_DEPENDENT):
            r.note(f"{where}: {cls.__name__} checks what exists only in the cluster: {e}")
        else:
            r.error(f"{where}: {cls.__name__} refuses its config: {e}")


def projected_config(m: Manifests, w: dict[str, Any], key: str) -> str | None:
    """The text of ConfigMap key `key` as projected into the pod, if it is."""
    for v in w["spec"]["template"]["spec"].get("volumes", []):
        for s in [v, *v.get("projected", {}).get("sources", [])]:
            cm = m.kind("ConfigMap").get(s.get("configMap", {}).get("name", ""))
            if cm and key in cm.get("data", {}):
                return cm["data"][key]
    return None


def service_config(m: Manifests, w: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(service, the config it would load: YAML plus flags) of a workload, or None where
    check_service_config reports why it cannot tell."""
    c = w["spec"]["template"]["spec"]["containers"][0]
    command, args = c.get("command", []), c.get("args", [])
    module = command[-1] if command[:2] == ["python", "-m"] and len(command) == 3 else ""
    launch = torchrun_launch(command, args)
    if launch is not None:
        module, args = launch[0], launch[1]
    service = module.rsplit(".", 1)[-1]
    text = projected_config(m, w, f"{service}.yaml") if service in SERVICES else None
    if text is None:
        return None
    data = effective_config(config_class(service), text, args, kn(w), Report())
    return None if data is None else (service, data)


def check_service_config(m: Manifests, w: dict[str, Any], r: Report) -> str | None:
    """Check one workload's service config as the service would load it; returns the service."""
    c = w["spec"]["template"]["spec"]["containers"][0]
    command, args = c.get("command", []), c.get("args", [])
    module = command[-1] if command[:2] == ["python", "-m"] and len(command) == 3 else ""
    launch = torchrun_launch(command, args)
    if launch is not None:
        module, args, torchrun = launch
        r.check(module == "protege.services.learner" and "world" in w,
                f"{kn(w)}: only a learner world runs under torchrun, not {module}")
    service = module.rsplit(".", 1)[-1]
    if not module.startswith("protege.services.") or service not in SERVICES:
        r.error(f"{kn(w)}: command {command} is not `python -m protege.services.<service>` (or "
                "`python -m torch.distributed.run ... -m protege.services.learner` in a world)")
        return None
    path = args[args.index("--config") + 1] if "--config" in args[:-1] else ""
    r.check(path == f"/etc/protege/{service}.yaml", f"{kn(w)}: --config must be {service}.yaml")
    text = projected_config(m, w, f"{service}.yaml")
    if text is None:
        r.error(f"{kn(w)}: {service}.yaml is not projected from a ConfigMap")
        return service
    cls = config_class(service)
    data = effective_config(cls, text, args, kn(w), r)
    if data is None:
        return service
    r.check(
        data.get("port") == 50051 and data.get("metrics_port") == 9090,
        f"{kn(w)}: port must be 50051 and metrics_port 9090 (probes, Services, policies)",
    )
    if cls is None:
        r.note(f"protege.services.{service}.config not importable yet: {service}.yaml unchecked")
    else:
        check_config_values(cls, data, f"{kn(w)} ({service}.yaml + args)", r)
        check_grace(w, service, float(data.get("grace_s", 10.0)), r)
        if launch is not None:
            check_torchrun_grace(w, c, launch[2], float(data.get("grace_s", 10.0)), r)
        if serves(w, c):
            check_probes(w, data, r)
        check_tls_identities(w, data, r)
        files = projected_files(w)
        for key, value in data.items():
            r.check(not str(value).startswith("/etc/protege/") or value in files,
                    f"{kn(w)}: {key} names {value}, which no volume projects into the pod")
    check_projected_commands(w, r)
    return service


def torchrun_launch(command: list[str], args: list[str]
                    ) -> tuple[str, list[str], dict[str, str]] | None:
    """(module, the module's args, torchrun's options) of `python -m torch.distributed.run [options]
    -m <module> [args]`, or None for any other command."""
    if command[:3] != ["python", "-m", "torch.distributed.run"]:
        return None
    rest = [*command[3:], *args]
    at = next((i for i, a in enumerate(rest) if a in ("-m", "--module")), None)
    if at is None or at + 1 >= len(rest):
        return None
    options: dict[str, str] = {}
    for i, a in enumerate(rest[:at]):
        if a.startswith("--"):
            key, eq, value = a.partition("=")
            nxt = rest[i + 1] if i + 1 < at else ""
            options[key.replace("_", "-")] = value if eq else ("" if nxt.startswith("-") else nxt)
    return rest[at + 1], rest[at + 2:], options


def check_torchrun_grace(w: dict[str, Any], c: dict[str, Any], options: dict[str, str],
                         grace_s: float, r: Report) -> None:
    """On SIGTERM torchrun signals its ranks and SIGKILLs them after --shutdown-timeout (default 30
    s): rank 0 needs 2 x grace_s to finish its step and checkpoint, and the kubelet must not kill
    torchrun before that."""
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    raw = (options.get("--shutdown-timeout") or env.get("PET_SHUTDOWN_TIMEOUT")
           or env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or "30")
    timeout = float(raw)
    period = w["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    r.check(timeout >= 2 * grace_s, f"{kn(w)}: torchrun --shutdown-timeout {timeout:g} must be at "
            f"least 2 x grace_s ({2 * grace_s:g}), or torchrun kills rank 0 mid-checkpoint")
    r.check(period > timeout, f"{kn(w)}: terminationGracePeriodSeconds {period} must exceed "
            f"torchrun's --shutdown-timeout {timeout:g}")


def check_projected_commands(w: dict[str, Any], r: Report) -> None:
    """A script a container runs from /etc/protege (learner_world.py) must be projected into it."""
    pod = w["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in all_containers(w):
        files = container_files(c, volumes)
        probes = [c.get(p, {}).get("exec", {}).get("command", []) for p in PROBES]
        for word in {*c.get("command", []), *c.get("args", []), *sum(probes, [])}:
            r.check(not str(word).startswith("/etc/protege/") or word in files,
                    f"{kn(w)}/{c['name']}: runs {word}, which no volume projects into it")


def projected_files(w: dict[str, Any]) -> set[str]:
    """Every file path a ConfigMap or Secret item puts into the pod's containers."""
    pod = w["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {f for c in pod["containers"] for f in container_files(c, volumes)}


def container_files(c: dict[str, Any], volumes: dict[str, dict[str, Any]]) -> set[str]:
    """Every file path a ConfigMap or Secret item puts into one container."""
    found = set()
    for mount in c.get("volumeMounts", []):
        v = volumes.get(mount["name"], {})
        for s in [v, *v.get("projected", {}).get("sources", [])]:
            for source in (s.get("configMap"), s.get("secret")):
                for item in (source or {}).get("items", []):
                    found.add(f"{mount['mountPath'].rstrip('/')}/{item['path']}")
    return found


def check_probes(w: dict[str, Any], data: dict[str, Any], r: Report) -> None:
    """Every probe is a gRPC health probe on a port that answers health in plaintext: the gRPC
    port, or `health_port` when that one uses TLS (Kubernetes' gRPC probes cannot speak TLS). A TCP
    probe would say nothing about SERVING."""
    c = w["spec"]["template"]["spec"]["containers"][0]
    tls, health_port = bool(data.get("tls_cert")), data.get("health_port", -1)
    if tls and not (isinstance(health_port, int) and health_port > 0):
        r.error(f"{kn(w)}: TLS is on but health_port is not set; gRPC probes cannot speak TLS, so "
                "add --health-port and point the probes at it")
        return
    want = health_port if tls else data.get("port")
    where = " (health_port: the gRPC port uses TLS)" if tls else " (the gRPC port)"
    for name in PROBES:
        probe = c.get(name, {})
        if "world" in w and "exec" in probe:
            # A world whose ranks share one template: learner_world.py asks rank 0's health port.
            r.check(probe["exec"].get("command") == [*WORLD_HEALTH_PROBE, str(want)],
                    f"{kn(w)}/{c['name']}: {name} runs {probe['exec'].get('command')}; use a "
                    f"grpc probe, or {[*WORLD_HEALTH_PROBE, str(want)]} where all ranks share a "
                    "template")
        elif "grpc" not in probe:
            kind = next((k for k in ("tcpSocket", "httpGet", "exec") if k in probe), "no")
            r.error(f"{kn(w)}/{c['name']}: {name} is a {kind} probe; use a grpc probe on port "
                    f"{want}{where}, which checks SERVING")
        elif probe["grpc"].get("port") != want:
            r.error(f"{kn(w)}/{c['name']}: {name} probes port {probe['grpc'].get('port')}, but "
                    f"plaintext health is on {want}{where}")
    ports = {p["containerPort"] for p in c.get("ports", [])}
    r.check(not tls or health_port in ports,
            f"{kn(w)}/{c['name']}: health_port {health_port} is not a containerPort")


def check_grace(w: dict[str, Any], service: str, grace_s: float, r: Report) -> None:
    """The kubelet must not SIGKILL a pod that is still draining as its config allows.

    The learner waits grace_s for running steps (and checkpoints), then grace_s for open calls.
    """
    pod = w["spec"]["template"]["spec"]
    exec_cmd = pod["containers"][0].get("lifecycle", {}).get("preStop", {}).get("exec", {})
    command = exec_cmd.get("command", [])
    pause = float(command[1]) if command[:1] == ["sleep"] and len(command) == 2 else 0.0
    needed = pause + grace_s * (2 if service == "learner" else 1)
    period = pod.get("terminationGracePeriodSeconds", 30)
    r.check(
        period > needed,
        f"{kn(w)}: terminationGracePeriodSeconds {period} must exceed {needed:g} "
        f"(preStop pause + grace_s {grace_s:g}{' x2' if service == 'learner' else ''})",
    )


def check_service_configs(m: Manifests, r: Report) -> None:
    found = [check_service_config(m, w, r) for w in m.workloads()]
    missing = sorted(set(SERVICES) - set(found))
    r.check(not missing, f"no workload runs {missing}")


def check_manifests(path: Path, overlay: str = "", cluster_path: Path | None = None) -> int:
    cluster = Manifests(cluster_path) if cluster_path else None
    m, r = Manifests(path, cluster), Report()
    for check in (
        check_namespaces,
        check_workloads,
        check_services,
        check_selectors,
        check_network_policies,
        lambda m, r: check_credentials(m, overlay, r),
        check_certificates,
        lambda m, r: check_data_safety(m, cluster, r),
        check_rollouts,
        lambda m, r: check_images(m, overlay, r),
        check_hpa,
        check_service_monitors,
        check_dashboard_configmaps,
        check_service_configs,
        lambda m, r: check_worlds(m, cluster, r),
        lambda m, r: check_shared_weights(m, cluster, r),
    ):
        try:
            check(m, r)
        except (KeyError, TypeError, AttributeError) as e:
            # A malformed object; the schema validation run before this names it.
            name = getattr(check, "__name__", "check")
            r.error(f"{name}: malformed object ({type(e).__name__}: {e})")
    return r.finish()


# ------------------------------------------------------------------------------------ dashboard


def source_metric_names() -> set[str]:
    """Metric names written as string literals anywhere in the services and the SDK."""
    names: set[str] = set()
    for root in (REPO / "services", REPO / "clients" / "protege"):
        for f in root.rglob("*.py"):
            names.update(re.findall(r"[\"'](protege_[a-z0-9_]+)[\"']", f.read_text()))
    return names


def service_written(name: str) -> bool:
    """Whether services/<name>/ is runnable (has its __main__.py), so its metrics must exist."""
    return (REPO / "services" / name / "__main__.py").is_file()


def check_metric(name: str, known: set[str], r: Report) -> None:
    base = re.sub(r"_(total|bucket|sum|count|created)$", "", name)
    if name in known or base in known:
        return
    service = name.split("_")[1]
    if service in SERVICES and not service_written(service):
        r.note(
            f"dashboard uses {name}; services/{service} has no __main__.py yet, so it is unchecked"
        )
    else:
        r.error(f"dashboard uses {name}, which no Counter/Gauge/Histogram in the code defines")


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    return [t.get("expr", "") for p in dash.get("panels", []) for t in p.get("targets", [])]


def check_dashboard(path: Path) -> int:
    r = Report()
    dash = json.loads(path.read_text())
    r.check(isinstance(dash.get("schemaVersion"), int), "schemaVersion missing")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    r.check(
        variables.get("datasource", {}).get("type") == "datasource"
        and variables["datasource"].get("query") == "prometheus",
        "needs a Prometheus `datasource` variable",
    )
    r.check("job_id" in variables, "needs a `job_id` template variable")
    for p in dash.get("panels", []):
        if p.get("type") == "row":
            continue
        r.check(
            p.get("datasource", {}).get("uid") == "${datasource}",
            f"panel {p.get('title')!r} does not use the $datasource variable",
        )
        r.check(bool(p.get("targets")), f"panel {p.get('title')!r} has no query")
    known = source_metric_names()
    for expr in dashboard_exprs(dash):
        for name in sorted(set(re.findall(r"\bprotege_[a-z0-9_]+", expr))):
            check_metric(name, known, r)
    return r.finish()


# ---------------------------------------------------------------------------------- job, prometheus


def check_job(path: Path) -> int:
    """The example job parses as the SDK's JobSpec and passes the learner's static checks."""
    r = Report()
    try:
        from protege.spec import JobSpec
    except ImportError:
        r.note("protege.spec not importable: job spec unchecked")
        return r.finish()
    try:
        spec = JobSpec.from_yaml(path).to_proto()
    except Exception as e:  # noqa: BLE001
        r.error(f"{path}: {e}")
        return r.finish()
    try:
        learner = importlib.import_module("protege.services.learner.admission")
    except ModuleNotFoundError:
        r.note("protege.services.learner.admission not importable: learner checks skipped")
        return r.finish()
    try:
        learner.check_spec(learner.with_defaults(spec), ["/models", "/data/checkpoints"])
    except Exception as e:  # noqa: BLE001
        r.error(f"{path}: the learner would refuse it: {e}")
    return r.finish()


def check_prometheus(path: Path, static_copy: Path) -> int:
    """Check the SD blocks here; write a copy with static targets that promtool can check.

    Debian's promtool is built without Kubernetes service discovery, so it rejects
    kubernetes_sd_configs; everything else (relabel rules, regexes) it checks on the copy.
    """
    r = Report()
    config = yaml.safe_load(path.read_text())
    for job in config.get("scrape_configs", []):
        sds = job.pop("kubernetes_sd_configs", [])
        r.check(bool(sds), f"job {job.get('job_name')}: no kubernetes_sd_configs")
        for sd in sds:
            r.check(
                sd.get("role") in ("pod", "endpoints", "endpointslice", "service"),
                f"job {job.get('job_name')}: unknown kubernetes_sd role {sd.get('role')!r}",
            )
            r.check(
                isinstance(sd.get("namespaces", {}).get("names", []), list),
                f"job {job.get('job_name')}: namespaces.names must be a list",
            )
        job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    static_copy.write_text(yaml.safe_dump(config))
    return r.finish()


def main(argv: list[str]) -> int:
    commands = {
        "manifests": lambda path, overlay="", cluster=None: check_manifests(
            path, str(overlay), cluster),
        "cluster": check_cluster,
        "dashboard": check_dashboard,
        "job": check_job,
        "prometheus": check_prometheus,
    }
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    return commands[argv[0]](*map(Path, argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
