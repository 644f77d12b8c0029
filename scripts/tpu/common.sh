# Shared by the scripts in scripts/tpu/ (sourced, not run). Settings come from the
# environment; each script's own flags are parsed by `parse_flags`.
#
#   TPU_NAME          the TPU VM (and, with "-qr" appended, its queued resource)   required
#   ZONE              e.g. us-central2-b                                            required
#   PROJECT           the Google Cloud project; default: gcloud's configured one
#   ACCELERATOR_TYPE  create.sh: e.g. v4-32, v5litepod-16, v5p-64, v6e-16
#   RUNTIME_VERSION   create.sh: the TPU VM image, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite
#
# --dry-run (any script) prints the gcloud commands instead of running them.

set -euo pipefail

DRY_RUN=0
ARGS=()

parse_flags() {
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --) shift; ARGS+=("$@"); break ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

need() {   # need VAR...: each set and non-empty, else a one-line error naming it
  local var
  for var in "$@"; do
    [[ -n "${!var:-}" ]] || die "set $var (see scripts/tpu/common.sh)"
  done
}

# `run CMD ARGS...`: run it, or with --dry-run print it, shell-quoted, one line.
run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

# The gcloud flags every TPU command takes.
tpu_flags() {
  TPU_FLAGS=(--zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    TPU_FLAGS+=(--project="$PROJECT")
  fi
}

# `on_workers COMMAND`: run a shell command on every worker of the TPU VM at once.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU_FLAGS[@]}" --worker=all \
    --command="$1"
}

QUEUED_RESOURCE="${TPU_NAME:-}-qr"
