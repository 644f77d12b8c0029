#!/usr/bin/env bash
# Delete the TPU VM slice and its queued resource (the gs:// workdir stays).
#
#   TPU_NAME=mm ZONE=us-central2-b scripts/tpu/delete.sh [--dry-run]
source "$(dirname "$0")/common.sh"
parse_flags "$@"
need TPU_NAME ZONE
tpu_flags
run gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" "${TPU_FLAGS[@]}" --force \
  --quiet
