#!/bin/bash
# The lab on a lent accelerator in one call of at most 9 minutes (an H100/H200): a short
# overhead study first (at most 2 minutes), then every experiment with its analysis.
#
#   OUT=/tmp/out bash experiments/accelerator_run.sh
#   OUT=/tmp/out REDUCED=1 bash experiments/accelerator_run.sh    # the script's own check
#
# 1. Overhead study (experiments/harness_overhead.py --suite=accelerator): the trivial call's
#    floor, the post's MLP (d8 w1024 fp32 at batch 1, 8, 512; bf16 w8192 at 1, 512) through
#    the lab's timer, a bare flat-array loop and an nnx.State loop, with a profiler trace of
#    each: once with XLA's command buffers (CUDA graphs) on, once off
#    (XLA_FLAGS=--xla_gpu_enable_command_buffer=). Then decode attention in both cache layouts
#    and through cuDNN (experiments/attention_layouts.py), which chooses batching.workloads.decoder.DEFAULT_LAYOUT["gpu"].
# 2. The experiments, in order of value, each under its own time limit and all under one
#    deadline (DEADLINE_S, default 540 s from the start), so a slow one cannot starve the rest;
#    per-shape microbenchmarks are budgeted per run (roofline.microbenchmark_budget_s). Every
#    step shares one peaks cache, copied to $OUT/device_peaks.json at the end: a step cut by
#    its limit keeps its rows (flushed one by one) and can be analysed later anywhere with
#    `python -m experiments.reanalyze --workdir=<step> --peaks_file=$OUT/device_peaks.json`.
#
# Each workdir, less TensorBoard events, is packed into $OUT/<name>.tgz as its step ends;
# $OUT/steps.txt has one line per step (rc, wall, limit; "skipped" with why). Wheels missing on
# the machine (ml_collections, tensorboardX) travel in .whl/. On a CPU the script runs end to
# end; the parts that need a GPU print one line saying they were skipped. REDUCED=1 shrinks
# every part to seconds (tests/test_accelerator_run.py); STEPS="a b" runs only those steps.
set -u
OUT=${OUT:?set OUT to a folder for the results}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
START=$(date +%s)
DEADLINE_S=${DEADLINE_S:-540}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$ROOT
else
  export PYTHONPATH=$ROOT
fi
export PYTHONUNBUFFERED=1
W=${WORK:-/tmp/lab_runs}
PEAKS=${PEAKS_CACHE:-/tmp/lab_peaks}
mkdir -p "$W" "$PEAKS"
echo "commit ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" > "$OUT/env.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/env.txt"
import flax, jax, jaxlib, ml_collections, numpy, optax
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__,
      "optax", optax.__version__, "numpy", numpy.__version__)
print(jax.devices(), [d.device_kind for d in jax.devices()])
PY
PLATFORM=$(python3 -c 'import jax; print(jax.default_backend())' 2>/dev/null)
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv \
  >> "$OUT/env.txt" 2>&1 || echo "nvidia-smi: not here" >> "$OUT/env.txt"

if [[ -n "${REDUCED:-}" ]]; then
  OVERHEAD=(--cases=mlp_d8_w64 --rounds=1 --seconds=0.01 --min_calls=3 --trace)
  ATTENTION=(--batches=1 --cache_lens=64 --dtypes=float32)
  EVERY_STEP=(--config.sweep.batch_sizes='(1,2)' --config.timing.pass_s=0.05
    --config.timing.run_budget_s=0 --config.timing.min_runs=3 --config.output.plots=false
    --config.sweep.passes=1
    --config.model.width=64 --config.model.depth=2)
  STEPS=${STEPS:-mlp}
else
  OVERHEAD=(--suite=accelerator)
  ATTENTION=()
  # Every point gets its passes (sweep.passes); passes beyond them share 4 s per run, so
  # each step fits its limit (the runs' own budgets are set for a 2-core CPU's pace).
  EVERY_STEP=(--config.timing.run_budget_s=4)
fi

left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }

# limited NAME LIMIT_S CMD...: CMD under min(LIMIT_S, what is left of the deadline).
limited() {
  local name=$1 limit=$2; shift 2
  local rest; rest=$(( $(left) - 5 ))
  (( rest < limit )) && limit=$rest
  if (( limit < 10 )); then
    echo "$name skipped: deadline (${rest}s left)" | tee -a "$OUT/steps.txt"
    return 0
  fi
  local start; start=$(date +%s)
  timeout "$limit" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc wall=$(( $(date +%s) - start ))s limit=${limit}s" | tee -a "$OUT/steps.txt"
  grep -v "^{" "$W/$name.log" | tail -3
  cp "$W/$name.log" "$OUT/" 2>/dev/null
  return $rc
}

# --- 1. overhead study ---------------------------------------------------------------------
limited overhead_command_buffers_on 55 python3 -m experiments.harness_overhead "${OVERHEAD[@]}" \
  --json_out="$OUT/overhead_command_buffers_on.json"
if [[ "$PLATFORM" == "gpu" ]]; then
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" limited overhead_command_buffers_off \
    55 python3 -m experiments.harness_overhead "${OVERHEAD[@]}" \
    --json_out="$OUT/overhead_command_buffers_off.json"
else
  echo "overhead_command_buffers_off skipped: XLA command buffers are CUDA graphs, and this" \
    "platform is $PLATFORM" | tee -a "$OUT/steps.txt"
fi
limited attention_layouts 25 python3 -m experiments.attention_layouts "${ATTENTION[@]}" \
  --json_out="$OUT/attention_layouts.json"

# --- 2. experiments ------------------------------------------------------------------------
step() {  # step NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]] && return 0
  limited "$name" "$limit" python3 main.py --workdir="$W/$name" "$@" "${EVERY_STEP[@]}" \
    --config.output.progress_bar=false --config.roofline.peaks_cache_dir="$PEAKS"
  local rc=$?
  cp "$W/$name.log" "$W/$name/" 2>/dev/null
  tar -czf "$OUT/$name.tgz" -C "$W" --exclude='*.tfevents.*' --exclude='xla' "$name" 2>/dev/null
  return $rc
}

step mlp 45 --config=configs/mlp.py || { tail -40 "$W/mlp.log"; exit 1; }
step mlp_article 45 --config=experiments/mlp_article.py --config.profile.batch_sizes='(1,512)'
step moe_vs_dense 50 --config=experiments/moe_vs_dense.py --config.profile.batch_sizes='(1,512)'
step decode_batching 80 --config=experiments/decode_batching.py \
  --config.roofline.microbenchmark_budget_s=8
step mlp_widths_bf16 70 --config=experiments/mlp_widths.py:1024,4096,8192 \
  --config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16 \
  --config.sweep.batch_sizes='(1,2,4,8,16,32,64,128,256,512,1024,2048,4096)' \
  --config.roofline.microbenchmark_budget_s=8
step resnet_cpu_vs_gpu 100 --config=experiments/resnet_cpu_vs_gpu.py \
  --config.roofline.microbenchmark_budget_s=15
cp "$PEAKS/device_peaks.json" "$OUT/device_peaks.json" 2>/dev/null
python3 -m experiments.prediction_error "$W"/*/ 2>&1 | tee "$OUT/prediction_error.txt"
echo "total wall $(( $(date +%s) - START ))s of ${DEADLINE_S}s" | tee -a "$OUT/steps.txt"
