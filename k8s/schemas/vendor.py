"""Vendor a CustomResourceDefinition's schemas for offline validation (k8s/check_crds.py).

    python k8s/schemas/vendor.py UPSTREAM_CRD.yaml k8s/schemas/<group>_<plural>.json

Reads an upstream CRD file (the YAML a project ships, e.g. JobSet's
config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml at a release tag), drops every schema
`description` (about two thirds of the bytes, and nothing a validator reads) and writes the rest as
compact JSON: the same CRD, field for field. Prints the sha256 of the upstream file, which
k8s/schemas/README.md records next to the tag and commit, so anyone can re-create a vendored file
from upstream and compare it byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

SUBSCHEMA_KEYS = ("items", "additionalProperties", "not")
SCHEMA_LIST_KEYS = ("anyOf", "allOf", "oneOf")


def strip_descriptions(schema: Any) -> None:
    """Remove `description` from a schema and its subschemas, in place; a *property* that happens
    to be named "description" is a field, so `properties` maps are walked by value only."""
    if not isinstance(schema, dict):
        return
    schema.pop("description", None)
    for key in SUBSCHEMA_KEYS:
        strip_descriptions(schema.get(key))
    for key in SCHEMA_LIST_KEYS:
        for sub in schema.get(key, []):
            strip_descriptions(sub)
    for sub in schema.get("properties", {}).values():
        strip_descriptions(sub)


def vendor(upstream: Path, out: Path) -> str:
    """Write the stripped CRD of `upstream` to `out`; returns the upstream file's sha256."""
    text = upstream.read_bytes()
    docs = [d for d in yaml.safe_load_all(text) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        raise SystemExit(f"{upstream}: expected one CustomResourceDefinition, found {len(crds)}")
    crd = crds[0]
    for version in crd["spec"]["versions"]:
        strip_descriptions(version.get("schema", {}).get("openAPIV3Schema"))
    out.write_text(json.dumps(crd, separators=(",", ":")) + "\n")
    return hashlib.sha256(text).hexdigest()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    print(f"{vendor(Path(argv[0]), Path(argv[1]))}  {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
