#!/usr/bin/env bash
# Install this checkout of mmjax, with its [tpu] extra (jax[tpu]) and gcsfs (gs:// shards),
# on every worker, and copy configs/ beside it: a wheel is built here, so every worker runs
# the same code. With BUCKET set, the bucket is also mounted (Cloud Storage FUSE) at
# /mnt/gcs/$BUCKET on every worker: the run's --workdir lives there, so checkpoints, metrics
# and logs outlive the VMs.
#
#   TPU_NAME=mm ZONE=us-central2-b [BUCKET=my-bucket] scripts/tpu/setup.sh [--dry-run]
source "$(dirname "$0")/common.sh"
parse_flags "$@"
need TPU_NAME ZONE
tpu_flags
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VERSION=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -n 1)
WHEEL="mmjax-$VERSION-py3-none-any.whl"

run python3 -m pip wheel --no-deps --wheel-dir "$ROOT/dist" "$ROOT"
run gcloud compute tpus tpu-vm scp "$ROOT/dist/$WHEEL" "$TPU_NAME:" "${TPU_FLAGS[@]}" \
  --worker=all
run gcloud compute tpus tpu-vm scp --recurse "$ROOT/configs" "$TPU_NAME:" "${TPU_FLAGS[@]}" \
  --worker=all
on_workers "python3 -m pip install --upgrade pip && \
python3 -m pip install \"\$HOME/$WHEEL[tpu]\" gcsfs"
if [[ -n "${BUCKET:-}" ]]; then
  MOUNT="/mnt/gcs/$BUCKET"
  KEYRING=/usr/share/keyrings/cloud.google.asc
  APT="deb [signed-by=$KEYRING] https://packages.cloud.google.com/apt"
  APT+=" gcsfuse-\$(lsb_release -cs) main"
  STEPS="set -e"
  STEPS+="; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  STEPS+=" | sudo tee $KEYRING > /dev/null"
  STEPS+="; echo \"$APT\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
  STEPS+="; sudo apt-get update -q && sudo apt-get install -y -q gcsfuse"
  STEPS+="; sudo mkdir -p $MOUNT && sudo chown \$(id -u):\$(id -g) $MOUNT"
  STEPS+="; mountpoint -q $MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=100000"
  STEPS+=" $BUCKET $MOUNT"
  on_workers "$STEPS"
fi
