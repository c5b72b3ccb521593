#!/usr/bin/env bash
# Security scan of what gets deployed: Checkov on every rendered overlay, on k8s/cluster (and its parts
# k8s/cluster/*/) and on the Dockerfile, with the accepted findings in k8s/security/waivers.yaml (each
# with its reason).
#
# Checkov knows Jobs, not JobSets or Kubeflow TrainJobs, so it would pass over the multi-node learner's
# pods: k8s/worlds.py adds each pod role of a JobSet or TrainJob to the rendered overlay as a batch/v1
# Job (a TrainJob's pods merged with their ClusterTrainingRuntime from k8s/cluster/trainer), named
# <name>-<role>, which Checkov then checks like any other workload.
#
#   make security-scan              # installs Checkov into .venv-scan from requirements/scan.txt first
#   bash k8s/security/scan.sh       # with Checkov already there
#
# Fails on any finding that is not waived, and on any waiver that no longer matches a finding.
# Offline: --skip-download keeps Checkov from asking Prisma Cloud for guidelines and severities, so
# every failed check counts as a finding whatever its severity. About 15 s.
# Environment: SCAN_VENV (default .venv-scan: Checkov, and PyYAML for the waivers).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1

SCAN_VENV=${SCAN_VENV:-.venv-scan}
CHECKOV="$SCAN_VENV/bin/checkov"
PY="$SCAN_VENV/bin/python"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if [ ! -x "$CHECKOV" ]; then
  echo "FAIL checkov not found in $SCAN_VENV (run make security-scan)"
  exit 1
fi
if command -v kubectl >/dev/null; then
  RENDER=(kubectl kustomize)
elif command -v kustomize >/dev/null; then
  RENDER=(kustomize build)
else
  echo "FAIL no kubectl or kustomize to render the overlays (install kubectl >= 1.27)"
  exit 1
fi

render() {
  local dir=$1 out=$2
  if ! "${RENDER[@]}" "$dir" >"$out" 2>"$TMP/render.err"; then
    echo "FAIL ${dir#k8s/}: kustomize build failed"
    sed 's/^/    /' "$TMP/render.err" | tail -5
    exit 1
  fi
}

files=(-f Dockerfile)
: >"$TMP/cluster-all.yaml"
for dir in k8s/cluster k8s/cluster/*/; do
  dir=${dir%/}
  [ -f "$dir/kustomization.yaml" ] || continue
  out="$TMP/$(printf '%s' "${dir#k8s/}" | tr / _).yaml"
  render "$dir" "$out"
  { cat "$out"; echo "---"; } >>"$TMP/cluster-all.yaml"
  files+=(-f "$out")
done
for dir in k8s/overlays/*/; do
  dir=${dir%/}
  out="$TMP/$(printf '%s' "${dir#k8s/}" | tr / _).yaml"
  render "$dir" "$out"
  # The learner world's pods as Jobs (nothing for overlays without a JobSet or TrainJob).
  if ! jobs=$("$PY" k8s/worlds.py jobs "$out" "$TMP/cluster-all.yaml"); then
    echo "FAIL ${dir#k8s/}: k8s/worlds.py jobs failed"
    exit 1
  fi
  [ -n "$jobs" ] && printf -- '---\n%s\n' "$jobs" >>"$out"
  files+=(-f "$out")
done

echo "checkov $("$CHECKOV" --version) on: Dockerfile $(ls -d k8s/cluster k8s/cluster/*/ k8s/overlays/*/ \
  | tr '\n' ' ')"
# Exit status 1 only means "some check failed"; the waivers decide. Anything else is Checkov failing.
"$CHECKOV" --framework kubernetes dockerfile "${files[@]}" --skip-download --quiet --compact \
  --output json >"$TMP/report.json" 2>"$TMP/checkov.err"
rc=$?
if [ $rc -gt 1 ] || ! [ -s "$TMP/report.json" ]; then
  echo "FAIL checkov exited $rc"
  tail -20 "$TMP/checkov.err" | sed 's/^/    /'
  exit 1
fi
"$PY" k8s/security/check_scan.py "$TMP/report.json" k8s/security/waivers.yaml
