"""Offline checks of rendered Kubernetes manifests that schema validation cannot make.

kubernetes-validate checks every object against the API schemas. It cannot see how objects
refer to each other (a Service selector that matches no pod, a volume naming a missing ConfigMap),
the rules this deployment sets itself (non-root, probes, one learner; least privilege: a default
deny and exactly the network flows the services need, each pod with only its own credentials as
files, one TLS identity per component; data safety, rollout and image-pinning rules), CRD kinds
such as ServiceMonitor and cert-manager's, or whether the service configs and the dashboard match
the code.
k8s/validate.sh runs these checks:

    python k8s/check_manifests.py manifests RENDERED.yaml [OVERLAY [CLUSTER.yaml]]
        # one `kubectl kustomize` output; OVERLAY (e.g. overlays/local) selects the per-overlay
        # rules; CLUSTER.yaml is the rendered k8s/cluster (its priority and storage classes)
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

REPO = Path(__file__).resolve().parent.parent
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# Kinds without a namespace. A namespaced object with no namespace lands in kubectl's current one.
CLUSTER_SCOPED = (
    "Namespace", "PriorityClass", "StorageClass", "PersistentVolume", "ClusterRole",
    "ClusterRoleBinding", "CustomResourceDefinition", "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration", "ValidatingAdmissionPolicy", "IngressClass", "RuntimeClass",
    "CSIDriver", "VolumeSnapshotClass", "ClusterIssuer",
)
# CRD kinds the Kubernetes schemas do not know; each has a check here. Keep in sync with
# CRD_KINDS in k8s/validate.sh.
CRD_KINDS = ("ServiceMonitor", "Certificate", "Issuer")
SERVICES = ("generator", "reference", "reward", "learner")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
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
    """One rendered overlay, indexed by kind."""

    def __init__(self, path: Path):
        self.objects = [o for o in yaml.safe_load_all(path.read_text()) if o]
        self.by_kind: dict[str, dict[str, dict[str, Any]]] = {}
        for o in self.objects:
            self.by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o

    def kind(self, kind: str) -> dict[str, dict[str, Any]]:
        return self.by_kind.get(kind, {})

    def workloads(self) -> list[dict[str, Any]]:
        return [o for k in WORKLOAD_KINDS for o in self.kind(k).values()]

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
    for c in pod["containers"]:
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
    for c in w["spec"]["template"]["spec"]["containers"]:
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            for name in ("cpu", "memory"):
                r.check(name in res.get(part, {}), f"{kn(w)}/{c['name']}: no {part}.{name}")
        for probe in PROBES:
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
    for c in pod["containers"]:
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
    learner = m.kind("StatefulSet").get("protege-learner")
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
    for svc in m.kind("Service").values():
        pods = m.pods_matching(svc["spec"].get("selector", {}))
        r.check(bool(pods), f"{kn(svc)}: selector matches no pod template")
        ports = container_ports(pods)
        for p in svc["spec"]["ports"]:
            r.check(
                p.get("targetPort", p["port"]) in ports,
                f"{kn(svc)}: targetPort {p.get('targetPort')} is not a port of its pods",
            )


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
                if destination:
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
                p["port"] in (port, names.get(port)) for p in rule["ports"])
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
            for port in sorted({p for c in dst["spec"]["template"]["spec"]["containers"]
                                for p in (x["containerPort"] for x in c.get("ports", []))}):
                allowed = (policy_allows(policies, "egress", src, dst, port)
                           and policy_allows(policies, "ingress", dst, src, port))
                wanted = (component(src), component(dst), port) in ALLOWED_FLOWS
                if allowed != wanted:
                    r.error(f"NetworkPolicies {'allow' if allowed else 'block'} {kn(src)} -> "
                            f"{kn(dst)}:{port}; the flows between the services must be exactly "
                            f"{sorted(ALLOWED_FLOWS)}")


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
        for c in w["spec"]["template"]["spec"]["containers"]:
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
    secrets = m.kind("Secret")
    if secrets and overlay not in PLACEHOLDER_SECRET_OVERLAYS:
        r.error(f"ships Secrets {sorted(secrets)}: only {PLACEHOLDER_SECRET_OVERLAYS} may "
                "(INSECURE placeholders); elsewhere `kubectl apply -k` would overwrite real ones")
    for s in secrets.values():
        values = {**s.get("stringData", {}), **s.get("data", {})}
        r.check(all("INSECURE" in str(v) or k == "tokens.yaml" for k, v in values.items()),
                f"{kn(s)}: a Secret in git must be a placeholder (every token says INSECURE)")
    check_placeholder_tokens(secrets, r)


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
    learner = m.kind("StatefulSet").get("protege-learner")
    if learner is None:
        return
    retention = learner["spec"].get("persistentVolumeClaimRetentionPolicy", {})
    r.check(retention.get("whenDeleted") == "Retain",
            f"{kn(learner)}: persistentVolumeClaimRetentionPolicy.whenDeleted must be Retain")
    classes = cluster.kind("StorageClass") if cluster else {}
    priorities = cluster.kind("PriorityClass") if cluster else {}
    for t in learner["spec"].get("volumeClaimTemplates", []):
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
    learner = m.kind("StatefulSet").get("protege-learner")
    for c in learner["spec"]["template"]["spec"]["containers"] if learner else []:
        res = c.get("resources", {})
        for name in ("cpu", "memory"):
            req, lim = res.get("requests", {}).get(name), res.get("limits", {}).get(name)
            r.check(req is not None and lim is not None and quantity(req) == quantity(lim),
                    f"{kn(learner)}/{c['name']}: requests.{name} {req} != limits.{name} {lim}; "
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


# -------------------------------------------------------------------------------- supply chain


DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def check_images(m: Manifests, overlay: str, r: Report) -> None:
    for w in m.workloads():
        for c in w["spec"]["template"]["spec"]["containers"]:
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


def check_service_config(m: Manifests, w: dict[str, Any], r: Report) -> str | None:
    """Check one workload's service config as the service would load it; returns the service."""
    c = w["spec"]["template"]["spec"]["containers"][0]
    command, args = c.get("command", []), c.get("args", [])
    module = command[-1] if command[:2] == ["python", "-m"] and len(command) == 3 else ""
    service = module.rsplit(".", 1)[-1]
    if not module.startswith("protege.services.") or service not in SERVICES:
        r.error(f"{kn(w)}: command {command} is not `python -m protege.services.<service>`")
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
        check_probes(w, data, r)
        check_tls_identities(w, data, r)
        files = projected_files(w)
        for key, value in data.items():
            r.check(not str(value).startswith("/etc/protege/") or value in files,
                    f"{kn(w)}: {key} names {value}, which no volume projects into the pod")
    return service


def projected_files(w: dict[str, Any]) -> set[str]:
    """Every file path a ConfigMap or Secret item puts into the pod's containers."""
    pod = w["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    found = set()
    for c in pod["containers"]:
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
        if "grpc" not in probe:
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
    m, r = Manifests(path), Report()
    cluster = Manifests(cluster_path) if cluster_path else None
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
