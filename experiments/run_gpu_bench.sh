#!/usr/bin/env bash
# One GPU run of both benchmarks over the settings of issue 6: about 7 minutes, hard stop at TOTAL_S (420 s).
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
# Check the script itself on a CPU (tiny models, ~2 minutes): SMOKE=1 OUT=/tmp/b bash experiments/run_gpu_bench.sh
# Rerun some stages only: STAGES=sample,256 bash experiments/run_gpu_bench.sh (default train,sample,attn,256,remat).
#
# Writes $OUT/{train_cifar10.json, sample_cifar10.json, train_256.json, attn_train_cifar10.json,
# attn_sample_cifar10.json, remat_train_256.json, gpu.txt, log.txt, summary.md}; prints the tables (python3
# experiments/bench_train.py --summarize $OUT/*.json prints the rows again; the attn_/remat_ files hold the
# rows of config.model.attention=$ATTN / config.model.remat=True, which the table's columns do not show).
# Each stage has its own time limit and saves its JSON after every setting, so a stage cut short keeps what
# it measured; time a stage leaves unused goes to the 256x256 stages at the end.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ddpm_gpu_bench}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
TOTAL_S=${TOTAL_S:-420}
STAGES=${STAGES:-train,sample,attn,256,remat}
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
import ddpm_jax.train, ddpm_jax.samplers, ddpm_jax.evaluate
bad = sorted(m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules)
assert not bad, f"importing ddpm_jax.train/samplers/evaluate imported {bad}"
print("imports ok: no tensorflow / tensorflow_datasets")' 2>&1 | tee -a "$LOG" || exit 1

stage() {  # stage NAME SECONDS ARGS...: one benchmark process under a time limit (skipped if not in STAGES)
  local name=$1 limit=$2
  shift 2
  case ",$STAGES," in *",${name%%_*},"*) ;; *) echo "=== $name not in STAGES=$STAGES" | tee -a "$LOG"; return;; esac
  echo "=== $name (limit ${limit}s, at ${SECONDS}s)" | tee -a "$LOG"
  timeout -k 10 "$limit" "$PYTHON" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name exit ${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$LOG"
}

# 1. CIFAR-10 training at batch 128 (target >= 6,000 img/s): bfloat16 / float32 x 1 / 10 steps per dispatch
#    (bfloat16 first: if the time limit cuts the stage, the likeliest winner is measured).
stage train_cifar10 150 experiments/bench_train.py $SMOKE_FLAG --config=configs/cifar10.py \
    --dtypes=bfloat16,float32 --batch_sizes=$CIFAR_BATCH --steps_per_dispatch=1,10 --steps=$STEPS \
    --out="$OUT/train_cifar10.json"

# 2. CIFAR-10 sampling at batch 1024 (target >= 50,000 img-steps/s): 20 reverse steps per call, 5 calls.
stage sample_cifar10 75 experiments/bench_sample.py $SMOKE_FLAG --config=configs/cifar10.py \
    --dtypes=bfloat16,float32 --batch_size=$SAMPLE_BATCH --num_steps=$SAMPLE_STEPS --repeats=5 \
    --out="$OUT/sample_cifar10.json"

# 3. The attention lever (PERF_NOTES lever 5): config.model.attention=$ATTN, bfloat16, against the einsum rows of
#    stages 1 and 2 (sampling first: the larger predicted gain).
stage attn_sample_cifar10 40 experiments/bench_sample.py $SMOKE_FLAG --config=configs/cifar10.py \
    --set model.attention="'$ATTN'" --dtypes=bfloat16 --batch_size=$SAMPLE_BATCH --num_steps=$SAMPLE_STEPS \
    --repeats=5 --out="$OUT/attn_sample_cifar10.json"
stage attn_train_cifar10 45 experiments/bench_train.py $SMOKE_FLAG --config=configs/cifar10.py \
    --set model.attention="'$ATTN'" --dtypes=bfloat16 --batch_sizes=$CIFAR_BATCH --steps_per_dispatch=1 \
    --steps=$STEPS --out="$OUT/attn_train_cifar10.json"

# 4. The 256x256 model (CelebA-HQ / LSUN U-Net, 113.7M params): bfloat16 at batch 64, then the largest batch,
#    without and then with rematerialisation (config.model.remat=True, PERF_NOTES lever 8). The plain stage gets
#    half of what is left of TOTAL_S when the remat stage follows, the remat stage the rest; a max-batch probe
#    starts only if it should end within the stage's budget (the estimate is the wall time of the last
#    setting, compile included).
stage_256() {  # stage_256 NAME SHARE_PERCENT OUT_JSON EXTRA_ARGS...
  local name=$1 share=$2 out=$3
  shift 3
  local remaining=$((TOTAL_S - (SECONDS - SCRIPT_START)))
  local limit=$((remaining * share / 100))
  if [ "$limit" -le 45 ]; then
    echo "=== $name skipped: only ${limit}s of ${remaining}s left for it" | tee -a "$LOG"
    return
  fi
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 stage "$name" "$limit" experiments/bench_train.py $SMOKE_FLAG \
      --config=configs/celebahq256.py --dtypes=bfloat16 --batch_sizes=$BATCH_256 --steps_per_dispatch=1 \
      --steps=$STEPS --pipelined_steps=20 --find_max_batch --max_batch_budget_s=$((limit - 15)) \
      --max_batch_resolution=8 --max_batch_cap=$MAX_CAP --out="$out" "$@"
}
case ",$STAGES," in *",remat,"*) SHARE_256=50;; *) SHARE_256=100;; esac
stage_256 256_train $SHARE_256 "$OUT/train_256.json"
stage_256 remat_train_256 100 "$OUT/remat_train_256.json" --set model.remat=True

echo
echo "=== all stages done in $((SECONDS - SCRIPT_START))s"
{
  echo "## default model (attention='einsum', remat=False)"
  "$PYTHON" experiments/bench_train.py --summarize "$OUT/train_cifar10.json" "$OUT/sample_cifar10.json" \
      "$OUT/train_256.json"
  echo
  echo "## config.model.attention='$ATTN' (compare with the bfloat16 rows above)"
  "$PYTHON" experiments/bench_train.py --summarize "$OUT/attn_train_cifar10.json" "$OUT/attn_sample_cifar10.json"
  echo
  echo "## config.model.remat=True (256x256; compare with train_256 above)"
  "$PYTHON" experiments/bench_train.py --summarize "$OUT/remat_train_256.json"
} 2>&1 | tee "$OUT/summary.md"
