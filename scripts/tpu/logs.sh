#!/usr/bin/env bash
# Follow the training log of one worker (WORKER, default 0: the one that writes metrics).
#
#   TPU_NAME=mm ZONE=us-central2-b [WORKER=3] scripts/tpu/logs.sh [--dry-run]
source "$(dirname "$0")/common.sh"
parse_flags "$@"
need TPU_NAME ZONE
tpu_flags
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU_FLAGS[@]}" --worker="${WORKER:-0}" \
  --command='tail -n 200 -F $HOME/mmjax-train.log'
