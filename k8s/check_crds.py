"""Validate custom resources against the CRD schemas vendored in k8s/schemas/, offline.

    python k8s/check_crds.py RENDERED.yaml [SCHEMA_DIR]

kubernetes-validate knows only Kubernetes' own kinds. For every object whose API group a vendored
CRD defines (JobSet, TrainJob, ClusterTrainingRuntime, Kueue's ClusterQueue, LocalQueue and
ResourceFlavor), this turns that CRD version's openAPIV3Schema into a JSON Schema and validates the
object with `jsonschema`, as strictly as an API server with strict field validation: unknown fields
are errors (except under x-kubernetes-preserve-unknown-fields), and so are wrong types, values
outside an enum, pattern or bound, missing required fields, duplicate keys in list-maps and sets,
a namespace on a cluster-scoped kind (or none on a namespaced one) and an API version the CRD does
not serve. metadata is checked as an ObjectMeta (known fields, a DNS-subdomain name, string labels
and annotations).

Not checked offline: the CRDs' CEL rules (x-kubernetes-validations; counted in the output) and
what the controllers' admission webhooks add (JobSet's and Trainer's defaulting and validation).

Prints `SCHEMA <kind> <group>/<version>` for each kind validated and `ERROR <kind>/<name>: <path>:
<message>` for each problem; exits 1 on any error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator, ValidationError, validators

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
# Errors shown per object; the first ones name the problem, the rest are usually its echoes.
MAX_ERRORS = 20
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# metav1.ObjectMeta as a manifest may write it: the CRDs say only `type: object`.
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS_SUBDOMAIN},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        "generateName": {"type": "string"},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        **{k: {} for k in ("uid", "resourceVersion", "generation", "creationTimestamp",
                           "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields",
                           "selfLink")},
    },
}
EMBEDDED_RESOURCE_FIELDS = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                            "metadata": {"type": "object"}}


@dataclass(frozen=True)
class CRDVersion:
    """One served version of a vendored CRD, its schema already converted to JSON Schema."""

    group: str
    version: str
    kind: str
    namespaced: bool
    schema: dict[str, Any]
    cel_rules: int
    source: str


def to_json_schema(node: Any, counts: dict[str, int]) -> Any:
    """An OpenAPI v3 (structural CRD) schema as a strict Draft 4 JSON Schema.

    Differences handled: `nullable`, x-kubernetes-int-or-string, x-kubernetes-embedded-resource,
    x-kubernetes-preserve-unknown-fields (everything else gets additionalProperties: false, as
    strict field validation does) and list types. CEL rules cannot run here; they are counted.
    """
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    counts["cel"] += len(node.get("x-kubernetes-validations", []))
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    for key in ("items", "not"):
        if key in out:
            out[key] = to_json_schema(out[key], counts)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(out["additionalProperties"], counts)
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [to_json_schema(s, counts) for s in out[key]]
    properties = {k: to_json_schema(v, counts) for k, v in node.get("properties", {}).items()}
    if node.get("x-kubernetes-embedded-resource"):
        properties = {**EMBEDDED_RESOURCE_FIELDS, **properties}
    if properties:
        out["properties"] = properties
    open_object = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
    if node.get("type") == "object" and not open_object:
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if node.get("x-kubernetes-list-type") == "map":
        out["listMapKeys"] = node.get("x-kubernetes-list-map-keys", [])
    return out


def unique_list_map_keys(validator: Any, keys: list[str], items: Any, schema: Any
                         ) -> Iterator[ValidationError]:
    """x-kubernetes-list-type: map: no two items may share their key fields (e.g. two env vars
    with one name, two replicatedJobs with one name); the API server refuses such a list."""
    if not isinstance(items, list):
        return
    seen: dict[tuple[Any, ...], int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        key = tuple(item.get(k) for k in keys)
        if key in seen:
            yield ValidationError(f"items {seen[key]} and {i} have the same key "
                                  f"{dict(zip(keys, key, strict=True))}")
        seen[key] = i


StrictValidator = validators.extend(Draft4Validator, {"listMapKeys": unique_list_map_keys})


def load_crds(schema_dir: Path = SCHEMA_DIR) -> dict[tuple[str, str], dict[str, CRDVersion]]:
    """{(group, kind): {version: CRDVersion}} for every vendored CRD file (*.json)."""
    found: dict[tuple[str, str], dict[str, CRDVersion]] = {}
    for path in sorted(schema_dir.glob("*.json")):
        crd = json.loads(path.read_text())
        spec = crd["spec"]
        kind = spec["names"]["kind"]
        for v in spec["versions"]:
            if not v.get("served", True):
                continue
            counts = {"cel": 0}
            schema = to_json_schema(v["schema"]["openAPIV3Schema"], counts)
            schema.setdefault("properties", {})["metadata"] = OBJECT_META
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind",
                                         "metadata"})
            found.setdefault((spec["group"], kind), {})[v["name"]] = CRDVersion(
                group=spec["group"], version=v["name"], kind=kind,
                namespaced=spec["scope"] == "Namespaced", schema=schema,
                cel_rules=counts["cel"], source=path.name)
    return found


def json_path(error: ValidationError) -> str:
    parts = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return parts.lstrip(".") or "(object)"


def check_object(obj: dict[str, Any], crd: CRDVersion) -> list[str]:
    """Problems of one object against its CRD version's schema and scope."""
    problems = []
    namespace = (obj.get("metadata") or {}).get("namespace")
    if crd.namespaced and not namespace:
        problems.append("metadata.namespace: missing, and the kind is namespaced")
    if not crd.namespaced and namespace:
        problems.append(f"metadata.namespace: {namespace!r} set on a cluster-scoped kind")
    errors = sorted(StrictValidator(crd.schema).iter_errors(obj), key=lambda e: list(e.path))
    for e in errors[:MAX_ERRORS]:
        problems.append(f"{json_path(e)}: {e.message[:300]}")
    if len(errors) > MAX_ERRORS:
        problems.append(f"... and {len(errors) - MAX_ERRORS} more")
    return problems


def check_file(path: Path, schema_dir: Path = SCHEMA_DIR) -> int:
    crds = load_crds(schema_dir)
    groups = {group for group, _ in crds}
    checked: dict[str, CRDVersion] = {}
    failed = False
    for obj in (o for o in yaml.safe_load_all(path.read_text()) if o):
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        if group not in groups:
            continue
        where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        versions = crds.get((group, obj.get("kind")))
        if versions is None:
            print(f"ERROR {where}: no vendored CRD defines kind {obj.get('kind')} in {group}")
            failed = True
            continue
        crd = versions.get(version)
        if crd is None:
            print(f"ERROR {where}: {group} serves {obj['kind']} as {sorted(versions)}, "
                  f"not {version}")
            failed = True
            continue
        checked[crd.kind] = crd
        for problem in check_object(obj, crd):
            print(f"ERROR {where}: {problem}")
            failed = True
    for kind, crd in sorted(checked.items()):
        print(f"SCHEMA {kind} {crd.group}/{crd.version} ({crd.source}; {crd.cel_rules} CEL rules "
              "not evaluated offline)")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__)
        return 2
    return check_file(Path(argv[0]), Path(argv[1]) if len(argv) == 2 else SCHEMA_DIR)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
