#!/usr/bin/env bash
# The GPU checks of mmjax in one command, for a lent NVIDIA H200 (README.md, "Device runs"):
#
#   make device-wheels                  # here: .whl/ = scripts/device/wheels.txt
#   bash scripts/device/bench.sh        # there, from the repo root, with .whl carried
#   bash scripts/device/bench.sh --smoke    # here: the same parts, tiny, on CPU
#
# Parts, in this order (the two targets first; each bounded by `timeout`; a failing part
# does not stop the rest):
#   mfu_loop  `mmjax train` of configs/clip_b16.py (bf16, scanned blocks, no remat) at batch
#             256 on built-in shapes at 224 px, 60 steps: the last logged window's mfu,
#             tflops_per_device, steps_per_s, images_per_s (the first holds the compilation)
#   serve     benchmarks/serve_load.py: batching on vs off at 32 clients for 20 s, with 0
#             and 8 front ends, then the 30 s stress run (configs/demo.py's model, untrained)
#   mfu_step  scripts/device/step_mfu.py: the same train step on one batch kept on the
#             device (no input pipeline), per batch size in MFU_BATCHES (default 256)
#   decode    benchmarks/decode.py --only mmjax: GPT-2 small's shape, random weights (no
#             download), KV cache vs recompute, batch 1 and 16, 128 new tokens
# Each part's JSON lines go to $OUT/<part>.jsonl ($OUT: the device tool's folder, else
# ./device_out); $OUT/summary.jsonl has the machine, then each part's exit code and time;
# $OUT/bench.log everything. Estimates on an H200 (not measured yet): setup 30 s, mfu_loop
# 150 s, serve 250 s, mfu_step 90 s, decode 60 s, ~9.5 min together; the caps allow more,
# so BUDGET_S (default 540 s) shortens or skips the last parts rather than let the device
# tool's 600 s limit cut the whole command off. The CPU smoke run takes ~4 min on 2 cores.
#
# The interpreter is $PYTHON (default python3: on the device, the image's Python 3.12 with
# its own jax 0.11.2 + CUDA plugin, flax, optax, orbax: NOT pyproject.toml's pins,
# jax<0.11). What the image lacks travels as wheels and is installed into that
# interpreter (not --target + PYTHONPATH: serve_load.py starts `mmjax serve` with
# PYTHONPATH set to the repo alone, so only an installed package reaches that process).
set -uo pipefail

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    *) echo "bench.sh: unknown argument $arg (expected --smoke)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/device_out}"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/mmjax-bench.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/bench.log"
: >"$LOG"
rm -f "$OUT"/{mfu_loop,serve,mfu_step,decode}.jsonl
START=$SECONDS
BUDGET_S="${BUDGET_S:-540}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MMJAX_CACHE="$WORK/cache" JAX_COMPILATION_CACHE_DIR="$WORK/jax-cache"
export TF_CPP_MIN_LOG_LEVEL=1

say() { echo "bench.sh: $*" | tee -a "$LOG"; }

if ((SMOKE)); then
  export JAX_PLATFORMS=cpu
  MFU_ARGS=(--config.batch_size=8 --config.total_steps=4 --config.log_every=2
            --config.data.image_size=64 --config.model.image.variant=Ti/16
            --config.model.text.variant=Ti)
  MFU_BATCHES="${MFU_BATCHES:-8}" STEP_ARGS=(--warmup 1 --steps 2)
  DECODE_ARGS=(--models gpt2 --batch 1 --new 4 --repeats 1 --recompute-steps 1)
  SERVE_ARGS=(--workers 0,2 --clients 4 --seconds 3 --stress-clients 8 --stress-seconds 3)
  CAP_MFU_LOOP=300 CAP_MFU_STEP=200 CAP_SERVE=300 CAP_DECODE=200
else
  MFU_ARGS=(--config.batch_size=256 --config.total_steps=60 --config.log_every=20
            --config.data.train_size=1024 --config.optim.warmup_steps=20)
  MFU_BATCHES="${MFU_BATCHES:-256}" STEP_ARGS=(--warmup 5 --steps 30)
  DECODE_ARGS=(--models gpt2 --batch 1,16 --new 128 --repeats 3)
  SERVE_ARGS=(--workers 0,8 --clients 32 --seconds 20 --stress-seconds 30)
  CAP_MFU_LOOP=200 CAP_MFU_STEP=150 CAP_SERVE=330 CAP_DECODE=120
fi
MFU_CONFIG=configs/clip_b16.py:smoke   # its built-in shapes data; sizes from MFU_ARGS

# ---------------------------------------------------------------- setup
if ((!SMOKE)) && [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      .whl/*.whl >>"$LOG" 2>&1; then
    say "installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into $PY"
  else
    say "pip install of .whl/ into $PY failed (see $LOG); trying --target /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >>"$LOG" 2>&1 || say "pip install --target failed too"
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  fi
fi
if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>&1 | tee -a "$LOG"; fi
"$PY" - "$SMOKE" >"$OUT/summary.jsonl" 2>>"$LOG" <<'EOF'
import json, platform, sys
import jax
devices = jax.devices()
print(json.dumps({"part": "setup", "python": sys.version.split()[0], "jax": jax.__version__,
                  "devices": [str(d) for d in devices], "device_kind": devices[0].device_kind,
                  "host": platform.node()}))
sys.exit(4 if sys.argv[1] == "0" and devices[0].platform != "gpu" else 0)
EOF
rc=$?
cat "$OUT/summary.jsonl"
if ((rc == 4)); then
  say "jax sees no GPU: $(grep -o '"devices": [^]]*]' "$OUT/summary.jsonl")"
  exit 3
elif ((rc)); then
  say "jax did not start (exit $rc): $(grep -E 'Error' "$LOG" | tail -1)"
  exit 3
fi
# Every import the parts make, so that a missing package is named once, up front.
if ! "$PY" -c 'import mmjax.cli, mmjax.deploy.serve.app, mmjax.deploy.serve.frontend, \
    tensorboardX, uvicorn, httptools' >>"$LOG" 2>&1; then
  say "import failed: $(grep -E '^[A-Za-z]*(Error|Exception)' "$LOG" | tail -1)"
fi

# ---------------------------------------------------------------- parts
# part NAME CAP_S CMD...: runs CMD under `timeout`, its output appended to bench.log and
# its JSON lines to $OUT/NAME.jsonl; records the exit code in summary.jsonl.
part() {
  local name=$1 cap=$2 left rc t0=$SECONDS
  shift 2
  left=$((BUDGET_S - (SECONDS - START)))
  ((cap > left)) && cap=$left
  if ((cap < 30)); then
    say "$name: skipped, ${left}s of the ${BUDGET_S}s budget left"
    echo "{\"part\": \"$name\", \"rc\": null, \"skipped\": true}" >>"$OUT/summary.jsonl"
    return
  fi
  say "$name: start (at most ${cap}s): $*"
  echo "=== $name: $*" >>"$LOG"
  timeout -k 10 "$cap" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  cat "$WORK/$name.log" >>"$LOG"
  grep -E '^\{' "$WORK/$name.log" | tee -a "$OUT/$name.jsonl"
  if ((rc)); then
    local why=""
    ((rc == 124 || rc == 137)) && why=" (timed out after ${cap}s)"
    say "$name: exit $rc$why; its last lines:"
    grep -E 'ModuleNotFoundError|ImportError' "$WORK/$name.log" | tail -1 |
      sed 's/^/bench.sh: import failed: /'
    grep -vE '^\{' "$WORK/$name.log" | tail -8
  fi
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" \
    >>"$OUT/summary.jsonl"
  say "$name: done in $((SECONDS - t0))s"
}

part mfu_loop "$CAP_MFU_LOOP" "$PY" -m mmjax.cli train --config "$MFU_CONFIG" \
  --workdir "$WORK/clip" --no-progress "${MFU_ARGS[@]}" --config.checkpoint_every=0
# The last logged window of that run (the first one holds the compilation).
"$PY" - "$WORK/clip/metrics.jsonl" 2>&1 <<'EOF' | tee -a "$OUT/mfu_loop.jsonl" "$LOG"
import json, pathlib, sys
path = pathlib.Path(sys.argv[1])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
rows = [r for r in rows if "steps_per_s" in r]
keys = ("step", "mfu", "tflops_per_device", "steps_per_s", "images_per_s", "loss")
print(json.dumps({"part": "mfu_loop", "windows": len(rows),
                  **({k: rows[-1][k] for k in keys if k in rows[-1]} if rows else {})}))
EOF
# Two processes share the GPU here (the load generator and the server): no preallocation.
XLA_PYTHON_CLIENT_PREALLOCATE=false part serve "$CAP_SERVE" "$PY" benchmarks/serve_load.py \
  "${SERVE_ARGS[@]}"
part mfu_step "$CAP_MFU_STEP" "$PY" scripts/device/step_mfu.py --config "$MFU_CONFIG" \
  --batches "$MFU_BATCHES" "${STEP_ARGS[@]}" "${MFU_ARGS[@]}"
part decode "$CAP_DECODE" "$PY" benchmarks/decode.py \
  --only mmjax "${DECODE_ARGS[@]}"

failed=$(grep -c '"rc": [1-9]' "$OUT/summary.jsonl")
say "all parts done in $((SECONDS - START))s, $failed failed; results in $OUT"
exit $((failed > 0))
