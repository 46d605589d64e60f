#!/usr/bin/env bash
# Every GPU check of the speed and training issues, in one call on a GPU machine (about 9 minutes on an H100 before
# the varlen and Trainer rows were added; with them it has not been timed as a whole):
#   bash benchmarks/gpu_checks.sh            # logs, profiles and JSON go to $OUT (default: gpu_out/)
# 1. tiny preset, float32, on CUDA: the Trainer with compiled blocks (and as CUDA graphs) must train like eager;
#    packed rows through the varlen kernel (eager, compiled, CUDA graphs) must match the dense mask; the captured
#    (and compiled) decode step must give the plain path's tokens;
# 2. InternVL3-1B size: prefill (+ profile), decode b1/b8 (plain, CUDA graph, CUDA graph + compile), training
#    step: eager, packed, selective checkpointing, blocks compiled, blocks compiled as CUDA graphs, packed through
#    the varlen kernel as CUDA graphs, the Trainer's own step (+ profiles);
# 3. InternVL3-8B size: prefill (+ profile), decode b1/b8.
# Each beside transformers on the same random weights (benchmarks/bench_gpu.py); results: docs/benchmarks.md.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
step() {  # step SECONDS LOG ARGS...: one benchmark process, killed after SECONDS, its output kept in LOG
  local limit=$1 log=$2; shift 2
  echo "== $*" | tee "$log"
  timeout "$limit" python3 "$@" 2>&1 | tee -a "$log"
  echo "== exit ${PIPESTATUS[0]}" | tee -a "$log"
}
step 150 "$OUT/train_compile.txt" benchmarks/check_train_compile.py --device cuda --options blocks,graphs
step 100 "$OUT/varlen.txt" benchmarks/check_varlen.py
step 45 "$OUT/tiny_cuda.txt" benchmarks/bench_inference.py --preset tiny --device cuda --dtype float32 \
  --new-tokens 16 --batches 1,3 --compile-step --require-same-tokens
step 360 "$OUT/1b.txt" benchmarks/bench_gpu.py --preset internvl3-1b --compile-step \
  --train-variants packed,flex,selective,compiled,compiled_graphs,compiled_graphs_varlen,trainer_graphs \
  --profile "$OUT/prefill_1b.txt" --profile-train "$OUT/train_1b" --out "$OUT/1b.json"
step 240 "$OUT/8b.txt" benchmarks/bench_gpu.py --preset internvl3-8b --no-train --compile-step \
  --profile "$OUT/prefill_8b.txt" --out "$OUT/8b.json"
