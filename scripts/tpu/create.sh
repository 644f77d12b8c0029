#!/usr/bin/env bash
# Ask for a TPU VM slice as a queued resource and wait until it is ACTIVE.
#
#   TPU_NAME=mm ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#     RUNTIME_VERSION=tpu-ubuntu2204-base scripts/tpu/create.sh [--spot] [--dry-run]
#
# --spot: preemptible capacity (cheaper; a preempted slice is deleted: create it again and
# rerun setup.sh and run.sh, and training resumes from the workdir's last checkpoint).
source "$(dirname "$0")/common.sh"
parse_flags "$@"
need TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION
tpu_flags
EXTRA=()
for arg in "${ARGS[@]+"${ARGS[@]}"}"; do
  case "$arg" in
    --spot) EXTRA+=(--spot) ;;
    *) die "unknown argument $arg (expected --spot or --dry-run)" ;;
  esac
done

run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" "${TPU_FLAGS[@]}" \
  --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
  --runtime-version="$RUNTIME_VERSION" "${EXTRA[@]+"${EXTRA[@]}"}"
if ((DRY_RUN)); then
  run gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${TPU_FLAGS[@]}" \
    --format='value(state.state)'
  exit 0
fi
while true; do
  state=$(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" "${TPU_FLAGS[@]}" \
    --format='value(state.state)')
  echo "$(date -u +%H:%M:%S) $QUEUED_RESOURCE: $state"
  case "$state" in
    ACTIVE) exit 0 ;;
    FAILED|SUSPENDED)
      die "$QUEUED_RESOURCE is $state (gcloud compute tpus queued-resources describe)" ;;
  esac
  sleep 30
done
