#!/usr/bin/env bash
# The one entry point of every klstudy container (docker/compose.yaml, docker/kuberay/).
#
#   entrypoint.sh head   [ray start args...]       Ray head: GCS, dashboard + Jobs API
#   entrypoint.sh worker [ray start args...]       Ray worker node joining $KLSTUDY_RAY_HEAD
#   entrypoint.sh mlflow [mlflow server args...]   MLflow tracking server, artifacts proxied
#   entrypoint.sh driver SPEC [klstudy run args...] on a Ray node: runs the study in SPEC, or
#                                                  resumes it when $KLSTUDY_STUDY_DIR holds it
#   entrypoint.sh submit SPEC [klstudy submit args...] from anywhere: the same study as a Ray
#                                                  job through $KLSTUDY_DASHBOARD_URL
#   entrypoint.sh health head|mlflow               exit 0 when that local service answers
#   entrypoint.sh COMMAND [ARGS...]                anything else runs as given (bash, klstudy ...)
#
# Every setting comes from the environment; the defaults suit a container. The test suite runs
# this same script outside Docker with loopback addresses (tests/deploy/).
#
#   KLSTUDY_BIND_HOST        address the dashboard and MLflow listen on      (0.0.0.0)
#   KLSTUDY_NODE_IP          --node-ip-address of a Ray node                 (Ray picks)
#   KLSTUDY_RAY_PORT         GCS port of the head                            (6379)
#   KLSTUDY_DASHBOARD_PORT   dashboard and Jobs API port of the head         (8265)
#   KLSTUDY_RAY_HEAD         HOST:PORT a worker joins                        (ray-head:6379)
#   KLSTUDY_NUM_CPUS, KLSTUDY_NUM_GPUS, KLSTUDY_OBJECT_STORE_BYTES, KLSTUDY_RAY_TEMP_DIR
#                            --num-cpus, --num-gpus, --object-store-memory, --temp-dir (Ray's)
#   KLSTUDY_MLFLOW_PORT      (5000)   KLSTUDY_MLFLOW_WORKERS (1)
#   KLSTUDY_MLFLOW_BACKEND_STORE_URI, KLSTUDY_MLFLOW_ARTIFACTS_DESTINATION      (required)
#   KLSTUDY_MLFLOW_ALLOWED_HOSTS  Host headers the server accepts (mlflow:5000,localhost:*,...)
#   KLSTUDY_STUDY_DIR        the study directory, on storage every node shares (required)
#   KLSTUDY_DASHBOARD_URL    where submit sends the job                      (http://ray-head:8265)
#   KLSTUDY_OPTUNA_STORAGE   an RDB URL that replaces the spec's pruning.storage (optional)
#   MLFLOW_TRACKING_URI      the study's --tracking-uri (optional)
#   RAY_ADDRESS              the cluster the driver joins (set by Ray Jobs; else embedded Ray)
#   PGPASSWORD               read by libpq: keeps the password out of every URL above
set -euo pipefail

die() {
    echo "error: entrypoint.sh: $1" >&2
    exit 2
}

ray_node_args() {  # options shared by the head and the workers, into the array NODE_ARGS
    NODE_ARGS=(--block --disable-usage-stats)
    if [[ -n ${KLSTUDY_NODE_IP:-} ]]; then NODE_ARGS+=("--node-ip-address=$KLSTUDY_NODE_IP"); fi
    if [[ -n ${KLSTUDY_NUM_CPUS:-} ]]; then NODE_ARGS+=("--num-cpus=$KLSTUDY_NUM_CPUS"); fi
    if [[ -n ${KLSTUDY_NUM_GPUS:-} ]]; then NODE_ARGS+=("--num-gpus=$KLSTUDY_NUM_GPUS"); fi
    if [[ -n ${KLSTUDY_OBJECT_STORE_BYTES:-} ]]; then
        NODE_ARGS+=("--object-store-memory=$KLSTUDY_OBJECT_STORE_BYTES")
    fi
    if [[ -n ${KLSTUDY_RAY_TEMP_DIR:-} ]]; then NODE_ARGS+=("--temp-dir=$KLSTUDY_RAY_TEMP_DIR"); fi
}

run_head() {
    ray_node_args
    exec ray start --head "${NODE_ARGS[@]}" \
        "--port=${KLSTUDY_RAY_PORT:-6379}" \
        --include-dashboard=true \
        "--dashboard-host=${KLSTUDY_BIND_HOST:-0.0.0.0}" \
        "--dashboard-port=${KLSTUDY_DASHBOARD_PORT:-8265}" \
        "$@"
}

run_worker() {
    ray_node_args
    exec ray start "${NODE_ARGS[@]}" "--address=${KLSTUDY_RAY_HEAD:-ray-head:6379}" "$@"
}

run_mlflow() {
    local backend=${KLSTUDY_MLFLOW_BACKEND_STORE_URI:-}
    local artifacts=${KLSTUDY_MLFLOW_ARTIFACTS_DESTINATION:-}
    [[ -n $backend ]] || die "mlflow: KLSTUDY_MLFLOW_BACKEND_STORE_URI is not set, got ''"
    [[ -n $artifacts ]] || die "mlflow: KLSTUDY_MLFLOW_ARTIFACTS_DESTINATION is not set, got ''"
    exec mlflow server \
        --host "${KLSTUDY_BIND_HOST:-0.0.0.0}" \
        --port "${KLSTUDY_MLFLOW_PORT:-5000}" \
        --workers "${KLSTUDY_MLFLOW_WORKERS:-1}" \
        --backend-store-uri "$backend" \
        --serve-artifacts --artifacts-destination "$artifacts" \
        --allowed-hosts "${KLSTUDY_MLFLOW_ALLOWED_HOSTS:-mlflow:5000,localhost:*,127.0.0.1:*}" \
        "$@"
}

study_status() {  # prints the status recorded in $1/study.json
    python -c 'import json, sys; print(json.load(open(sys.argv[1]))["status"])' "$1/study.json"
}

with_storage() {  # prints the path of a copy of spec $1 whose pruning.storage is $2
    local copy
    copy=$(mktemp --suffix=.yaml)
    python - "$1" "$2" "$copy" <<'EOF'
import sys

import yaml

spec_path, storage, copy_path = sys.argv[1:]
with open(spec_path) as f:
    spec = yaml.safe_load(f)
spec.setdefault("pruning", {})["storage"] = storage
with open(copy_path, "w") as f:
    yaml.safe_dump(spec, f, sort_keys=False)
EOF
    echo "$copy"
}

study_args() {  # klstudy arguments of role $1 (driver: run, submit) for spec $2, into ARGS
    [[ -n $2 ]] || die "$1: no spec given, got ''"
    [[ -f $2 ]] || die "$1: spec file not found, got '$2'"
    local spec=$2
    if [[ -n ${KLSTUDY_OPTUNA_STORAGE:-} ]]; then
        spec=$(with_storage "$spec" "$KLSTUDY_OPTUNA_STORAGE")
    fi
    if [[ $1 == submit ]]; then
        ARGS=(submit "$spec" --address "${KLSTUDY_DASHBOARD_URL:-http://ray-head:8265}")
    else
        ARGS=(run "$spec")
    fi
    ARGS+=(--study-dir "$KLSTUDY_STUDY_DIR")
    if [[ -n ${MLFLOW_TRACKING_URI:-} ]]; then ARGS+=(--tracking-uri "$MLFLOW_TRACKING_URI"); fi
}

require_study_dir() {
    [[ -n ${KLSTUDY_STUDY_DIR:-} ]] || die "$1: KLSTUDY_STUDY_DIR is not set, got ''"
}

run_driver() {
    require_study_dir driver
    local spec=${1:-}
    if [[ $# -gt 0 ]]; then shift; fi
    local dir=$KLSTUDY_STUDY_DIR
    if [[ -f $dir/study.json ]]; then  # a restarted driver (compose restart, RayJob retry)
        local status
        status=$(study_status "$dir")
        if [[ $status == finished ]]; then
            echo "entrypoint.sh: study in $dir already finished; nothing to do"
            exit 0
        fi
        echo "entrypoint.sh: study in $dir is '$status': resuming it"
        exec klstudy resume "$dir"
    fi
    study_args driver "$spec"
    exec klstudy "${ARGS[@]}" "$@"
}

run_submit() {
    require_study_dir submit
    local spec=${1:-}
    if [[ $# -gt 0 ]]; then shift; fi
    study_args submit "$spec"
    exec klstudy "${ARGS[@]}" "$@"
}

run_health() {
    local url
    case ${1:-} in
        head) url="http://127.0.0.1:${KLSTUDY_DASHBOARD_PORT:-8265}/api/gcs_healthz" ;;
        mlflow) url="http://127.0.0.1:${KLSTUDY_MLFLOW_PORT:-5000}/health" ;;
        *) die "health: unknown service (head, mlflow), got '${1:-}'" ;;
    esac
    exec python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$url"
}

role=${1:-}
if [[ $# -gt 0 ]]; then shift; fi
case $role in
    head) run_head "$@" ;;
    worker) run_worker "$@" ;;
    mlflow) run_mlflow "$@" ;;
    driver) run_driver "$@" ;;
    submit) run_submit "$@" ;;
    health) run_health "$@" ;;
    "") die "no role given (head, worker, mlflow, driver, submit, health, or a command), got ''" ;;
    *) exec "$role" "$@" ;;
esac
