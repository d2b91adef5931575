#!/usr/bin/env bash
# One GPU run of both benchmarks over the settings of the GPU speed targets, plus a profile: about 9 minutes, hard stop at
# TOTAL_S (560 s).
#
# Prepare once, on a machine with PyPI access, in the repository root (.whl/ is git-ignored). The device
# image has jax 0.11.2 (CUDA), flax, optax, orbax, absl-py, pillow, numpy; it lacks ml_collections and
# tensorboardX, which travel as pure-Python wheels (absl-py too, pinned, so the versions match CI):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#       -d .whl ml_collections==1.1.0 absl-py==2.5.1 tensorboardX==2.6.5
#
# (their own needs, PyYAML, six, numpy, packaging, protobuf, are in the image). Then, with the device tool:
#   run(command="bash experiments/run_gpu_bench.sh", carry=[".whl"], timeout_s=600)
# Elsewhere: OUT=/some/dir bash experiments/run_gpu_bench.sh
# Check the script itself on a CPU (tiny models, ~3 minutes): SMOKE=1 OUT=/tmp/b bash experiments/run_gpu_bench.sh
# Rerun some stages only: STAGES=sample,256 bash experiments/run_gpu_bench.sh
# (default train,sample,256,levers,fp32,profile,remat: the order of importance, which is also the run order).
#
# Writes $OUT/{train_cifar10.json, sample_cifar10.json, train_256.json, levers_{sample,train}_{fv,fv_attn}.json,
# fp32_train_cifar10.json, profile_cifar10.json, remat_train_256.json, gpu.txt, log.txt,
# summary.md}; prints the tables. Every row names its switches in the table's `settings` column, so
# `python3 experiments/bench_train.py --summarize $OUT/*.json` prints them again as one table. Each stage has its
# own time limit and saves its JSON after every setting, so a stage cut short keeps what it measured; time the
# stages leave unused goes to the last one (remat).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ddpm_gpu_bench}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
TOTAL_S=${TOTAL_S:-560}
STAGES=${STAGES:-train,sample,256,levers,fp32,profile,remat}
# The attention lever: cuDNN fused attention (GPU, bfloat16 only); the CPU smoke run checks the stage with the
# portable XLA path of jax.nn.dot_product_attention instead.
if [ "${SMOKE:-0}" = 1 ]; then
  SMOKE_FLAG=--smoke CIFAR_BATCH=8 SAMPLE_BATCH=8 SAMPLE_STEPS=5 STEPS=4 BATCH_256=8 MAX_CAP=16
  ATTN=${ATTN:-dot_product}
else
  SMOKE_FLAG= CIFAR_BATCH=128 SAMPLE_BATCH=1024 SAMPLE_STEPS=20 STEPS=50 BATCH_256=64 MAX_CAP=4096
  ATTN=${ATTN:-cudnn}
fi
SCRIPT_START=$SECONDS

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi

{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1;
  "$PYTHON" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())'; } 2>&1 | tee "$OUT/gpu.txt"

# The benchmarks must not need TensorFlow or TFDS (absent on the device).
"$PYTHON" -c '
import sys
import ddpm_jax.train, ddpm_jax.samplers, ddpm_jax.evaluation.sample
bad = sorted(m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules)
assert not bad, f"importing ddpm_jax.train/samplers/evaluation.sample imported {bad}"
print("imports ok: no tensorflow / tensorflow_datasets")' 2>&1 | tee -a "$LOG" || exit 1

stage() {  # stage NAME SECONDS ARGS...: one benchmark process under a time limit (skipped if not in STAGES)
  local name=$1 limit=$2
  shift 2
  case ",$STAGES," in *",${name%%_*},"*) ;; *) echo "=== $name not in STAGES=$STAGES" | tee -a "$LOG"; return;; esac
  local remaining=$((TOTAL_S - (SECONDS - SCRIPT_START)))
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  if [ "$limit" -lt 20 ]; then
    echo "=== $name skipped: ${remaining}s of TOTAL_S=${TOTAL_S}s left" | tee -a "$LOG"
    return
  fi
  echo "=== $name (limit ${limit}s, at ${SECONDS}s)" | tee -a "$LOG"
  timeout -k 10 "$limit" "$PYTHON" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name exit ${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$LOG"
}

# 1. CIFAR-10 training at batch 128 (target >= 6,000 img/s): bfloat16, 1 and 10 steps per dispatch.
stage train_cifar10 110 experiments/bench_train.py $SMOKE_FLAG --config=configs/cifar10.py \
    --dtypes=bfloat16 --batch_sizes=$CIFAR_BATCH --steps_per_dispatch=1,10 --steps=$STEPS \
    --out="$OUT/train_cifar10.json"

# 2. CIFAR-10 sampling at batch 1024 (target >= 50,000 img-steps/s): 20 reverse steps per call, 5 calls.
stage sample_cifar10 60 experiments/bench_sample.py $SMOKE_FLAG --config=configs/cifar10.py \
    --dtypes=bfloat16,float32 --batch_size=$SAMPLE_BATCH --num_steps=$SAMPLE_STEPS --repeats=5 \
    --out="$OUT/sample_cifar10.json"

# 3. The 256x256 model (CelebA-HQ / LSUN U-Net, 113.7M params): bfloat16 at batch 64, then the largest batch
#    (a probe starts only if it should end within the stage's budget, judged by the last setting's wall time).
stage_256() {  # stage_256 NAME LIMIT_S OUT_JSON EXTRA_ARGS...
  local name=$1 limit=$2 out=$3
  shift 3
  if [ "$limit" -le 45 ]; then
    echo "=== $name skipped: only ${limit}s left for it" | tee -a "$LOG"
    return
  fi
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 stage "$name" "$limit" experiments/bench_train.py $SMOKE_FLAG \
      --config=configs/celebahq256.py --dtypes=bfloat16 --batch_sizes=$BATCH_256 --steps_per_dispatch=1 \
      --steps=$STEPS --pipelined_steps=20 --find_max_batch --max_batch_budget_s=$((limit - 15)) \
      --max_batch_resolution=8 --max_batch_cap=$MAX_CAP --out="$out" "$@"
}
stage_256 256_train 100 "$OUT/train_256.json"

# 4. Levers on bfloat16 (PERF_NOTES levers 11 and 5), each added to the one before so every increment shows:
#    fast_variance first (portable), then also attention=$ATTN (cuDNN: the one that may fail to compile).
levers() {  # levers NAME_SUFFIX LIMIT_S EXTRA_SET_ARGS...: one sampling and one training process
  local suffix=$1 limit=$2
  shift 2
  stage levers_sample_$suffix "$limit" experiments/bench_sample.py $SMOKE_FLAG --config=configs/cifar10.py "$@" \
      --dtypes=bfloat16 --batch_size=$SAMPLE_BATCH --num_steps=$SAMPLE_STEPS --repeats=5 \
      --out="$OUT/levers_sample_$suffix.json"
  stage levers_train_$suffix $((limit + 10)) experiments/bench_train.py $SMOKE_FLAG --config=configs/cifar10.py "$@" \
      --dtypes=bfloat16 --batch_sizes=$CIFAR_BATCH --steps_per_dispatch=1 --steps=$STEPS \
      --out="$OUT/levers_train_$suffix.json"
}
levers fv 35 --set model.fast_variance=True
levers fv_attn 35 --set model.fast_variance=True --set model.attention="'$ATTN'"
# PERF_NOTES lever C10 on the GPU: the official repeat-then-conv upsampling against the default 'subpixel' (sampling).
stage levers_sample_repeat 35 experiments/bench_sample.py $SMOKE_FLAG --config=configs/cifar10.py \
    --set model.upsample="'repeat'" --dtypes=bfloat16 --batch_size=$SAMPLE_BATCH --num_steps=$SAMPLE_STEPS \
    --repeats=5 --out="$OUT/levers_sample_repeat.json"

# 5. float32 training (the reference's fp32 column; lever 1 is bfloat16 against this row).
stage fp32_train_cifar10 45 experiments/bench_train.py $SMOKE_FLAG --config=configs/cifar10.py \
    --dtypes=float32 --batch_sizes=$CIFAR_BATCH --steps_per_dispatch=1 --steps=$STEPS \
    --out="$OUT/fp32_train_cifar10.json"

# 6. Where the device time goes: per-category profile of one bfloat16 train step (batch 128) and one sampling
#    step (batch 1024), default switches.
#    CUDA graphs off (XLA_FLAGS) so every kernel keeps its HLO instruction in the trace: kernel times are what
#    count here, not launch gaps. Traces (tens of MB) stay outside $OUT.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" stage profile_cifar10 60 experiments/profile_step.py \
    $SMOKE_FLAG --config=configs/cifar10.py --what=train,sample --dtype=bfloat16 --out="$OUT/profile_cifar10.json" \
    --trace_dir=/tmp/ddpm_profile_traces

# 7. Rematerialisation for the 256x256 model (lever 8): what is left of TOTAL_S.
stage_256 remat_train_256 $((TOTAL_S - (SECONDS - SCRIPT_START) - 5)) "$OUT/remat_train_256.json" \
    --set model.remat=True

echo
echo "=== all stages done in $((SECONDS - SCRIPT_START))s"
bench_files=
for name in train_cifar10 levers_train_fv levers_train_fv_attn fp32_train_cifar10 sample_cifar10 levers_sample_fv \
    levers_sample_fv_attn train_256 remat_train_256; do
  [ -f "$OUT/$name.json" ] && bench_files="$bench_files $OUT/$name.json"
done
{
  "$PYTHON" experiments/bench_train.py --summarize $bench_files
  [ -f "$OUT/profile_cifar10.json" ] && "$PYTHON" experiments/profile_step.py --summarize "$OUT/profile_cifar10.json"
} 2>&1 | tee "$OUT/summary.md"
