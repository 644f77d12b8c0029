#!/usr/bin/env bash
# Stop the training started by run.sh on every worker (the slice stays; run.sh resumes).
#
#   TPU_NAME=mm ZONE=us-central2-b scripts/tpu/stop.sh [--dry-run]
source "$(dirname "$0")/common.sh"
parse_flags "$@"
need TPU_NAME ZONE
tpu_flags
PID='$HOME/mmjax-train.pid'
on_workers "if [ -f $PID ]; then kill \$(cat $PID) || true; rm -f $PID; fi"
