"""Apply the waivers in k8s/security/waivers.yaml to a Checkov JSON report: what
`make security-scan` runs after Checkov (k8s/security/scan.sh).

    python k8s/security/check_scan.py REPORT.json k8s/security/waivers.yaml

Rendered files are named after what they render (overlays_gpu-full.yaml is overlays/gpu-full,
cluster.yaml is cluster); the Dockerfile is Dockerfile. Prints one line per finding (FAIL, or
WAIVED with the start of the waiver's reason) and per stale waiver, then a summary; exits 1 on any
unwaived finding, on a waiver that matched nothing, or on a malformed waiver.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def target_of(file_path: str) -> str:
    """'overlays/gpu-full' for '/../tmp/x/overlays_gpu-full.yaml'; 'Dockerfile' for a Dockerfile."""
    name = Path(file_path).name
    if name == "Dockerfile":
        return name
    return name.removesuffix(".yaml").replace("_", "/", 1)


def failed_checks(report: Any) -> list[dict[str, Any]]:
    """Every failed check of every framework in the report (one dict, or a list of them)."""
    frameworks = report if isinstance(report, list) else [report]
    return [f for fw in frameworks for f in fw.get("results", {}).get("failed_checks", [])]


def load_waivers(path: Path) -> list[dict[str, Any]]:
    waivers = (yaml.safe_load(path.read_text()) or {}).get("waivers", [])
    for w in waivers:
        missing = {"check", "targets", "reason"} - set(w)
        if missing or not str(w.get("reason", "")).strip():
            raise ValueError(f"waiver {w.get('check')!r}: needs check, targets and a reason")
    return waivers


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    report = json.loads(Path(argv[0]).read_text())
    try:
        waivers = load_waivers(Path(argv[1]))
    except ValueError as e:
        print(f"FAIL {argv[1]}: {e}")
        return 1
    used: set[tuple[str, str]] = set()
    unwaived = 0
    for f in failed_checks(report):
        target = target_of(f["file_path"])
        where = f"{f['check_id']} {target} {f['resource']}: {f['check_name']}"
        waiver = next((w for w in waivers
                       if w["check"] == f["check_id"] and target in w["targets"]), None)
        if waiver is None:
            unwaived += 1
            print(f"FAIL {where}")
        else:
            used.add((waiver["check"], target))
            print(f"WAIVED {where} ({' '.join(waiver['reason'].split()[:12])} ...)")
    stale = [(w["check"], t) for w in waivers for t in w["targets"] if (w["check"], t) not in used]
    for check, target in stale:
        print(f"FAIL stale waiver: {check} for {target} matches no finding; remove it")
    print(f"checkov: {unwaived} unwaived finding(s), {len(stale)} stale waiver(s), "
          f"{len(used)} waiver(s) in use")
    return 1 if unwaived or stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
