#!/bin/bash
# The lab's experiments on a lent accelerator, sized to fit a short lease (about 9 minutes).
#
#   OUT=/tmp/out bash experiments/accelerator_run.sh
#
# Runs, in order of value, each under its own time limit so a slow one cannot starve
# the rest: the main job (configs/mlp.py), mlp_article (with profiler traces of batch 1
# and 512), moe_vs_dense, decode_batching, an MLP width sweep in bfloat16 out to batch
# 4096 (past an H100/H200's critical batch), then resnet_cpu_vs_gpu. The first step
# stops the script if it fails (an environment problem shows at once). Each workdir,
# less TensorBoard events and the XLA cache, is packed into $OUT/<name>.tgz as soon
# as its step ends; a step cut by its limit keeps the points it measured (rows are
# flushed one by one) and its tarball says so in $OUT/steps.txt.
# Wheels missing on the machine (ml_collections, tensorboardX) travel in .whl/.
set -u
OUT=${OUT:?set OUT to a folder for the results}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT
fi
export PYTHONUNBUFFERED=1
W=/tmp/lab_runs
mkdir -p "$W"
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import flax, jax, jaxlib, ml_collections, numpy, optax
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "numpy", numpy.__version__)
print(jax.devices(), [d.device_kind for d in jax.devices()])
PY
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv \
  >> "$OUT/env.txt" 2>&1

step() {  # step NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]] && return 0
  [[ -n "${LIMIT:-}" ]] && limit=$LIMIT
  local start=$(date +%s)
  timeout "$limit" python3 main.py --workdir="$W/$name" "$@" --config.output.progress_bar=false \
    > "$W/$name.log" 2>&1
  local rc=$?
  local wall=$(( $(date +%s) - start ))
  echo "$name rc=$rc wall=${wall}s limit=${limit}s" | tee -a "$OUT/steps.txt"
  tail -5 "$W/$name.log"
  cp "$W/$name.log" "$W/$name/" 2>/dev/null
  tar -czf "$OUT/$name.tgz" -C "$W" --exclude='*.tfevents.*' --exclude='xla' "$name" 2>/dev/null
  return $rc
}

step mlp 90 --config=configs/mlp.py || { tail -40 "$W/mlp.log"; exit 1; }
step mlp_article 60 --config=experiments/mlp_article.py --config.profile.batch_sizes='(1,512)'
step moe_vs_dense 80 --config=experiments/moe_vs_dense.py --config.profile.batch_sizes='(1,512)'
step decode_batching 120 --config=experiments/decode_batching.py
step mlp_widths_bf16 90 --config=experiments/mlp_widths.py:1024,4096,8192 \
  --config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16 \
  --config.sweep.batch_sizes='(1,2,4,8,16,32,64,128,256,512,1024,2048,4096)'
step resnet_cpu_vs_gpu 150 --config=experiments/resnet_cpu_vs_gpu.py
python3 -m experiments.prediction_error "$W"/*/ 2>&1 | tee "$OUT/prediction_error.txt"
