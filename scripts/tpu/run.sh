#!/usr/bin/env bash
# Start the same `mmjax train` on every worker (one process per host, JAX joins them with
# distributed.auto); the workdir must be a gs:// path every worker can reach. Rerunning
# the same command after a stop or a preemption resumes from the last checkpoint.
#
#   TPU_NAME=mm ZONE=us-central2-b scripts/tpu/run.sh [--dry-run] -- \
#     --config configs/clip_b16.py --workdir gs://bucket/runs/clip_b16 \
#     --config.data.shards='gs://bucket/laion/{00000..41407}.tar'
#
# Output goes to ~/mmjax-train.log on each worker (scripts/tpu/logs.sh).
source "$(dirname "$0")/common.sh"
parse_flags "$@"
need TPU_NAME ZONE
tpu_flags
((${#ARGS[@]})) || die "give the mmjax train arguments after --, at least --config and --workdir"
printf -v TRAIN '%q ' "${ARGS[@]}"
on_workers "cd \$HOME && nohup python3 -m mmjax.cli train ${TRAIN}--config.distributed.auto=True \
--no-progress > \$HOME/mmjax-train.log 2>&1 & echo \$! > \$HOME/mmjax-train.pid"
