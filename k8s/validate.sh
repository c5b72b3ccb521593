#!/usr/bin/env bash
# Offline validation of everything under k8s/; needs no cluster and no Docker engine.
#
#   bash k8s/validate.sh            # what `make k8s-validate` runs
#
# k8s/cluster (the namespace, priority classes and storage class, applied once outside the overlays)
# and its optional parts k8s/cluster/*/ (Kueue's queue, Kubeflow Trainer's runtime, for the multi-node
# learner): rendered, schema-checked and checked by `k8s/check_manifests.py cluster`.
# For k8s/base and every overlay under k8s/overlays/:
#   1. render it with `kubectl kustomize`;
#   2. validate every object against the Kubernetes API schemas with `kubernetes-validate --strict`
#      (unknown fields are errors), for the oldest and the newest Kubernetes version we support.
#      CRD kinds (ServiceMonitor) have no bundled schema: kubernetes-validate only warns about them, so
#      any such warning fails here, except for the kinds k8s/check_manifests.py checks field by field;
#      the multi-node learner's kinds (JobSet, TrainJob, ClusterTrainingRuntime, Kueue's) are also
#      validated against the CRD schemas vendored in k8s/schemas, strictly (k8s/check_crds.py), and
#      the Jobs a JobSet or TrainJob will create against the Kubernetes schemas (k8s/worlds.py jobs);
#   3. run k8s/check_manifests.py: references, selectors, security rules, the NetworkPolicy model
#      (default deny; exactly the flows the services need), credentials, TLS identities, data safety,
#      rollout rules, image pins, the learner's single replica, the shared weights directory, and each
#      service config against the service's config dataclass.
# Then the Grafana dashboard (JSON, variables, metric names against the code), the example job (the SDK's
# JobSpec and the learner's checks), the example Prometheus config (promtool) and the models-loader pod.
#
# One PASS/FAIL/SKIP line per item; exits 1 if anything failed.
# Environment: VENV (default .venv: kubernetes-validate and the protege package, from `make setup`),
# K8S_VERSIONS (default "1.30.0 <newest version kubernetes-validate bundles>"), PROTEGE_RELEASE=1 (fail
# on the unreleased-digest marker of a production overlay instead of noting it).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

VENV=${VENV:-.venv}
# Keep in sync with CRD_KINDS in k8s/check_manifests.py.
CRD_KINDS="ServiceMonitor Certificate Issuer JobSet TrainJob LocalQueue ClusterQueue ResourceFlavor ClusterTrainingRuntime"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
failures=0
: >"$TMP/notes"

pass() { printf 'PASS %s\n' "$*"; }
fail() {
  printf 'FAIL %s\n' "$1"
  [ -n "${2:-}" ] && printf '%s\n' "$2" | sed 's/^/    /'
  failures=$((failures + 1))
}
skip() { printf 'SKIP %s\n' "$*"; }

# ----------------------------------------------------------------------------------------- tools

find_renderer() {
  if command -v kubectl >/dev/null; then
    RENDER=(kubectl kustomize)
  elif command -v kustomize >/dev/null; then
    RENDER=(kustomize build)
  elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "kubectl not found: installing Debian's kubernetes-client. It is kubectl 1.20, whose built-in" \
      "kustomize predates Components, so overlays using k8s/components will fail to render with it;" \
      "prefer a current kubectl."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null
    command -v kubectl >/dev/null && RENDER=(kubectl kustomize)
  fi
  [ -n "${RENDER[*]:-}" ]
}

find_tools() {
  if ! find_renderer; then
    fail "tools: no kubectl or kustomize (install kubectl >= 1.27)"
    return 1
  fi
  KV="$VENV/bin/kubernetes-validate"
  [ -x "$KV" ] || KV=$(command -v kubernetes-validate || true)
  if [ -z "$KV" ]; then
    fail "tools: kubernetes-validate not found in $VENV (run make setup; it is in the dev extra)"
    return 1
  fi
  PY="$VENV/bin/python"
  [ -x "$PY" ] || PY=$(command -v python3)
  if [ -z "${K8S_VERSIONS:-}" ]; then
    newest=$("$KV" --help | sed -n 's/.*Defaults to \([0-9][0-9.]*[0-9]\).*/\1/p')
    K8S_VERSIONS="1.30.0 ${newest:-1.30.0}"
  fi
  echo "renderer: ${RENDER[*]} ($(kubectl version --client 2>/dev/null | head -1 || true));" \
    "schemas: kubernetes-validate $("$KV" --version) for Kubernetes $K8S_VERSIONS"
}

# ------------------------------------------------------------------------------------- manifests

# kubernetes-validate on one file. Prints the problems; CRD-kind warnings go to $TMP/crds.
schema_check() {
  local file=$1 args=(--strict --quiet) log crd_pattern
  for v in $K8S_VERSIONS; do args+=(-k "$v"); done
  log=$("$KV" "${args[@]}" "$file" 2>&1)
  crd_pattern="Couldn't find schema for kind (${CRD_KINDS// /|}) "
  printf '%s\n' "$log" | grep -E "^WARN .*$crd_pattern" | sed -E "s/.*kind ([A-Za-z]+) .*/\1/" \
    | sort -u >"$TMP/crds"
  # Everything else it printed is a problem: ERROR/FATAL lines, and warnings about kinds or API
  # versions it does not know (a typo such as autoscaling/v2beta3 would otherwise pass unchecked).
  printf '%s\n' "$log" | grep -v -E "^WARN .*$crd_pattern" | grep -v '^$' || true
}

validate_kustomization() {
  local dir=$1 name=${1#k8s/} out problems checks count crds
  out="$TMP/$(printf '%s' "$name" | tr / _).yaml"
  if ! "${RENDER[@]}" "$dir" >"$out" 2>"$TMP/render.err"; then
    fail "$name: kustomize build failed" "$(tail -5 "$TMP/render.err")"
    return
  fi
  count=$(grep -c '^kind:' "$out")
  problems=$(schema_check "$out")
  crds=$(paste -sd, "$TMP/crds")
  crd_schema_check "$out" && problems=$(printf '%s\n%s' "$problems" "$CRD_PROBLEMS" | grep -v '^$')
  world_jobs_check "$out" && problems=$(printf '%s\n%s' "$problems" "$JOB_PROBLEMS" | grep -v '^$')
  checks=$("$PY" k8s/check_manifests.py manifests "$out" "$name" "$TMP/cluster.yaml" 2>&1)
  local rc=$?
  printf '%s\n' "$checks" | grep '^NOTE' >>"$TMP/notes"
  checks=$(printf '%s\n' "$checks" | grep -v '^NOTE' || true)
  if [ -n "$problems" ] || [ $rc -ne 0 ]; then
    fail "$name" "$(printf '%s\n%s' "$problems" "$checks" | grep -v '^$')"
  else
    [ -n "$crds" ] && crds="; CRD kinds by field checks: $crds"
    [ -n "$CRD_SCHEMAS" ] && crds="$crds; vendored CRD schemas --strict: $CRD_SCHEMAS"
    [ "$JOB_COUNT" -gt 0 ] && crds="$crds; the world's $JOB_COUNT Jobs as batch/v1 --strict"
    pass "$name: $count objects, schemas $K8S_VERSIONS --strict, reference checks$crds"
  fi
}

# k8s/cluster and each part k8s/cluster/*/, rendered into one $TMP/cluster.yaml: the overlays' checks
# look up priority classes, storage classes, the ClusterQueue and the ClusterTrainingRuntime there.
validate_cluster() {
  local out=$TMP/cluster.yaml part dir problems="" checks rc parts=""
  : >"$out"
  for dir in k8s/cluster k8s/cluster/*/; do
    dir=${dir%/}
    [ -f "$dir/kustomization.yaml" ] || continue
    part="$TMP/part-$(printf '%s' "${dir#k8s/}" | tr / _).yaml" # not $out: k8s/cluster itself
    if ! "${RENDER[@]}" "$dir" >"$part" 2>"$TMP/render.err"; then
      fail "${dir#k8s/}: kustomize build failed" "$(tail -5 "$TMP/render.err")"
      return
    fi
    problems=$(printf '%s\n%s' "$problems" "$(schema_check "$part")")
    crd_schema_check "$part" && problems=$(printf '%s\n%s' "$problems" "$CRD_PROBLEMS")
    parts="$parts ${dir#k8s/}${CRD_SCHEMAS:+ ($CRD_SCHEMAS)}"
    { cat "$part"; echo "---"; } >>"$out"
  done
  problems=$(printf '%s\n' "$problems" | grep -v '^$' || true)
  checks=$("$PY" k8s/check_manifests.py cluster "$out" 2>&1)
  rc=$?
  if [ -n "$problems" ] || [ $rc -ne 0 ]; then
    fail "cluster" "$(printf '%s\n%s' "$problems" "$checks" | grep -v '^$')"
  else
    pass "cluster:$parts: $(grep -c '^kind:' "$out") objects, schemas $K8S_VERSIONS --strict," \
      "vendored CRD schemas --strict, restricted namespace, Retain + WaitForFirstConsumer storage" \
      "classes"
  fi
}

# A learner world's Jobs, as its JobSet or Trainer will create them (k8s/worlds.py jobs), against the
# Kubernetes schemas: a CRD embeds the Job spec of the Kubernetes release it was built with, but the API
# server checks each Job against its own (Kubernetes 1.30 requires podFailurePolicy's `status`, JobSet's
# schema does not). Sets JOB_PROBLEMS and JOB_COUNT; returns 0 if it found problems.
world_jobs_check() {
  local jobs=$TMP/world-jobs.yaml
  JOB_COUNT=0
  if ! "$PY" k8s/worlds.py jobs "$1" "$TMP/cluster.yaml" >"$jobs" 2>"$TMP/jobs.err"; then
    JOB_PROBLEMS="k8s/worlds.py jobs failed: $(tail -3 "$TMP/jobs.err")"
    return 0
  fi
  JOB_COUNT=$(grep -c '^kind: Job$' "$jobs")
  JOB_PROBLEMS=""
  [ "$JOB_COUNT" -gt 0 ] && JOB_PROBLEMS=$(schema_check "$jobs" | sed "s#$jobs#the world's Jobs#")
  [ -n "$JOB_PROBLEMS" ]
}

# The custom resources of one rendered file against the CRD schemas in k8s/schemas (check_crds.py).
# Sets CRD_PROBLEMS (its ERROR lines) and CRD_SCHEMAS (the kinds it validated); returns 0 if it found
# problems.
crd_schema_check() {
  local log
  log=$("$PY" k8s/check_crds.py "$1" 2>&1)
  CRD_SCHEMAS=$(printf '%s\n' "$log" | sed -n 's/^SCHEMA \([A-Za-z]*\) .*/\1/p' | paste -sd, -)
  CRD_PROBLEMS=$(printf '%s\n' "$log" | grep -v '^SCHEMA ' | grep -v '^$' || true)
  [ -n "$CRD_PROBLEMS" ]
}

check_components_used() {
  local comp unused=""
  for comp in k8s/components/*/; do
    comp=${comp%/}
    grep -qs -- "components/${comp##*/}\$" k8s/overlays/*/kustomization.yaml || unused="$unused ${comp#k8s/}"
  done
  if [ -n "$unused" ]; then
    fail "components: not rendered by any overlay, so never validated:$unused"
  else
    pass "components: each is rendered by an overlay under k8s/overlays"
  fi
}

# ------------------------------------------------------------------------------------ the others

check_dashboards() {
  local f copy out
  for f in k8s/dashboards/*.json; do
    if ! out=$("$PY" -m json.tool "$f" 2>&1 >/dev/null); then
      fail "${f#k8s/}: not valid JSON" "$out"
      continue
    fi
    copy=k8s/components/grafana-dashboard/${f##*/}
    if [ -f "$copy" ] && ! cmp -s "$f" "$copy"; then
      fail "${f#k8s/}: differs from ${copy#k8s/} (copy it over: kustomize only reads inside the component)"
      continue
    fi
    out=$("$PY" k8s/check_manifests.py dashboard "$f" 2>&1)
    local rc=$?
    printf '%s\n' "$out" | grep '^NOTE' >>"$TMP/notes"
    if [ $rc -ne 0 ]; then
      fail "${f#k8s/}" "$(printf '%s\n' "$out" | grep -v '^NOTE')"
    else
      pass "${f#k8s/}: valid JSON, datasource and job_id variables, metric names found in the code"
    fi
  done
}

check_example_job() {
  local out rc
  out=$("$PY" k8s/check_manifests.py job k8s/examples/job.yaml 2>&1)
  rc=$?
  printf '%s\n' "$out" | grep '^NOTE' >>"$TMP/notes"
  if [ $rc -ne 0 ]; then
    fail "examples/job.yaml" "$(printf '%s\n' "$out" | grep -v '^NOTE')"
  else
    pass "examples/job.yaml: parses as the SDK's JobSpec and passes the learner's static checks"
  fi
}

check_example_pods() {
  local problems
  problems=$(schema_check k8s/examples/models-loader.yaml)
  if [ -n "$problems" ]; then
    fail "examples/models-loader.yaml" "$problems"
  else
    pass "examples/models-loader.yaml: schemas $K8S_VERSIONS --strict"
  fi
}

check_prometheus_config() {
  local static=$TMP/prometheus-static.yml out
  if ! out=$("$PY" k8s/check_manifests.py prometheus k8s/prometheus/prometheus.yml "$static" 2>&1); then
    fail "prometheus/prometheus.yml" "$out"
  elif ! command -v promtool >/dev/null; then
    skip "prometheus/prometheus.yml: promtool not installed (apt-get install prometheus); SD fields checked"
  elif ! out=$(promtool check config "$static" 2>&1); then
    fail "prometheus/prometheus.yml: promtool check config" "$out"
  else
    # Debian's promtool lacks Kubernetes service discovery, so it checks a copy with static targets.
    pass "prometheus/prometheus.yml: promtool check config (kubernetes_sd_configs checked by field)"
  fi
}

# ------------------------------------------------------------------------------------------- main

if find_tools; then
  validate_cluster
  validate_kustomization k8s/base
  for overlay in k8s/overlays/*/; do
    validate_kustomization "${overlay%/}"
  done
  check_components_used
  check_dashboards
  check_example_job
  check_example_pods
  check_prometheus_config
fi

if [ -s "$TMP/notes" ]; then
  echo "notes:"
  sort -u "$TMP/notes" | sed 's/^NOTE /    /'
fi
if [ "$failures" -ne 0 ]; then
  echo "k8s validation: $failures failed"
  exit 1
fi
echo "k8s validation: all passed"
