"""Offline checks of rendered Kubernetes manifests that schema validation cannot make.

kubernetes-validate checks every object against the API schemas. It cannot see how objects
refer to each other (a Service selector that matches no pod, a volume naming a missing ConfigMap),
the rules this deployment sets itself (non-root, probes, one learner), CRD kinds such as
ServiceMonitor, or whether the service configs and the dashboard match the code.
k8s/validate.sh runs these checks:

    python k8s/check_manifests.py manifests RENDERED.yaml   # one `kubectl kustomize` output
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
import importlib
import io
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
CLUSTER_SCOPED = ("Namespace",)
# Secrets the deployment expects to be created with `kubectl create secret` (k8s/README.md).
EXTERNAL_SECRETS = ("protege-auth", "protege-tls")
# CRD kinds the Kubernetes schemas do not know; each has a check here.
CRD_KINDS = ("ServiceMonitor",)
SERVICES = ("generator", "reference", "reward", "learner")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


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
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


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
        """Workloads whose pod template carries every label of `selector`."""
        return [
            w
            for w in self.workloads()
            if matches(selector, w["spec"]["template"]["metadata"].get("labels", {}))
        ]


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
        elif name in EXTERNAL_SECRETS:
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
            bool(m.pods_matching(pdb["spec"]["selector"].get("matchLabels", {}))),
            f"{kn(pdb)}: selector matches no pod template",
        )
    for np in m.kind("NetworkPolicy").values():
        pods = m.pods_matching(np["spec"]["podSelector"].get("matchLabels", {}))
        r.check(bool(pods), f"{kn(np)}: podSelector matches no pod template")
        ports = container_ports(pods)
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                r.check(p["port"] in ports, f"{kn(np)}: port {p['port']} is not a port of its pods")
            for peer in rule.get("from", []):
                # Peers in this namespace must exist here; those elsewhere (Prometheus) cannot be.
                labels = peer.get("podSelector", {}).get("matchLabels", {})
                if labels and "namespaceSelector" not in peer:
                    r.check(
                        bool(m.pods_matching(labels)),
                        f"{kn(np)}: ingress peer {labels} matches no pod template",
                    )


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
    return service


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


def check_manifests(path: Path) -> int:
    m, r = Manifests(path), Report()
    for check in (
        check_namespaces,
        check_workloads,
        check_services,
        check_selectors,
        check_hpa,
        check_service_monitors,
        check_dashboard_configmaps,
        check_service_configs,
    ):
        try:
            check(m, r)
        except (KeyError, TypeError, AttributeError) as e:
            # A malformed object; the schema validation run before this names it.
            r.error(f"{check.__name__}: malformed object ({type(e).__name__}: {e})")
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
        "manifests": check_manifests,
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
