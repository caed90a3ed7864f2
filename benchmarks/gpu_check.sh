#!/usr/bin/env bash
# The GPU check of "Prefetch that pays" (issue 15), one script: the CUDA tests, then the trace replay
# (full DeepSeek-V2-Lite shapes, held-out Puffin routing, 16 warm-up + 48 timed tokens) for on-demand
# LRU, co-occurrence prefetch, each predictor under the part-1 scheduler, the same plus hybrid CPU
# execution (then hybrid LRU with the host's experts on the host thread and on a pool, --hybrid-run, and the
# pool's costs on the host CPU, benchmarks.host_pool), the scheduler driven by the true routing (oracle) and all experts resident, at 10 % and
# 25 % resident and --dense-ms 0 and 0.3, each row with the simulator's figures (h200_replay preset, SIM=… for another,
# with the run's measured link and host time per expert), then the predictor rows again with the predictors
# on the host CPU (--predictor-device cpu) and in a worker process (--predictor-device worker; once more with
# prediction-aware LRU in place of the schedule's learned eviction, --eviction predictor), and each
# predictor's serving cost on the GPU (predictor_cost --profile).
#
#   benchmarks/gpu_check.sh SLICE.npz OUT_DIR [PREDICTOR.safetensors ...]
#   SKIP_TESTS=1 benchmarks/gpu_check.sh ...      # the replay only
#   PARTS="tests hybrid" benchmarks/gpu_check.sh ...   # some parts only: tests replay hybrid cpu worker cost
#   SCHEDULE=scheduler_load benchmarks/gpu_check.sh ...   # the predictor rows under another part-1 schedule
#
# SLICE.npz: `python -m benchmarks.bench_replay --save-npz SLICE.npz --traces data/big/deepseek-v2-lite-puffin
# --save-tokens 64` (the held-out slice, small enough to carry). The first two parts took 204 s on
# one H200 with one predictor (docs/RESULTS.md, run 1); the whole script has not been timed yet: each part prints
# its seconds.
set -uo pipefail
slice=$1 out=$2
shift 2
mkdir -p "$out"
py=${PYTHON:-python3}
rc=0  # any part failing fails the script (after the others ran)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: torch sees no CUDA device here: this check runs on a GPU machine" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cpu threads', torch.get_num_threads())"
lscpu | grep -E "^(Model name|CPU\(s\)|Socket|Thread)" || true
parts=" ${PARTS:-tests replay hybrid cpu worker cost} "
for p in $parts; do
  [[ " tests replay hybrid cpu worker cost " == *" $p "* ]] || { echo "PARTS: unknown part '$p' (tests replay hybrid cpu worker cost)" >&2; exit 2; }
  [[ $# -eq 0 && " cpu worker cost " == *" $p "* && -n "${PARTS:-}" ]] && echo "PARTS: '$p' needs predictor files: skipped" >&2
done
[ -n "${SKIP_TESTS:-}" ] && parts=${parts/ tests / }
want() { [[ $parts == *" $1 "* ]] && echo "== $1 (at ${SECONDS} s)"; }
if want tests; then
  timeout 180 "$py" -m pytest -m gpu -q -p no:cacheprovider \
    tests/test_runtime.py tests/test_runtime_gate_batch.py tests/test_adapters.py tests/test_record.py \
    tests/test_host_run.py 2>&1 \
    | tee "$out/gpu_tests.log" | tail -25 || rc=1
fi
if want replay; then
  timeout 360 "$py" -m benchmarks.bench_replay --traces "$slice" --device cuda ${1:+--predictor "$@"} \
    --capacities 0.1 0.25 --dense-ms 0 0.3 --max-tokens 48 --warmup 16 \
    --methods lru cooc predictor hybrid oracle resident --sim "${SIM:-h200_replay}" --json "$out/replay.json" \
    --schedule "${SCHEDULE:-scheduler}" \
    2>&1 | grep -v -e TokenSpaceWarning -e check_token_space | tee "$out/replay.log" || rc=1
fi
# hybrid LRU with the host's experts on the host thread and on a pool in the stream's order (hybrid="pool"),
# in one run, each with the simulator's figure (the pool's: cpu_async)
if want hybrid; then
  timeout 150 "$py" -m benchmarks.bench_replay --traces "$slice" --device cuda --capacities 0.1 0.25 --dense-ms 0 \
    --max-tokens 48 --warmup 16 --methods lru hybrid resident --hybrid-run thread pool --sim "${SIM:-h200_replay}" \
    --json "$out/replay-hybrid-pool.json" 2>&1 | tee "$out/replay-hybrid-pool.log" || rc=1
  # the pool's round trip on this host's CPU, and the share of the host thread's time its work takes
  # (the simulator's cpu_handoff_ms and cpu_host_share), the pool on every core but the host thread's
  timeout 90 "$py" -m benchmarks.host_pool --runs 3 --jobs 1000 --threads "$(nproc)" 2>&1 | tee "$out/host-pool.log" || rc=1
fi
if [ $# -gt 0 ] && want cpu; then  # the predictors on the host CPU, the experts on the GPU (batch 1: the token_ahead step cost 4.5 ms there, 1 ms on one host core)
  timeout 150 "$py" -m benchmarks.bench_replay --traces "$slice" --device cuda --predictor "$@" --predictor-device cpu \
    --capacities 0.1 0.25 --dense-ms 0 --max-tokens 48 --warmup 16 --methods lru predictor oracle \
    --schedule "${SCHEDULE:-scheduler}" --json "$out/replay-predictor-cpu.json" 2>&1 | grep -v -e TokenSpaceWarning -e check_token_space \
    | tee "$out/replay-predictor-cpu.log" || rc=1
fi
if [ $# -gt 0 ] && want worker; then
  # the predictors in a worker process on another host core: off the host thread that drives the GPU
  timeout 150 "$py" -m benchmarks.bench_replay --traces "$slice" --device cuda --predictor "$@" --predictor-device worker \
    --capacities 0.1 0.25 --dense-ms 0 --max-tokens 48 --warmup 16 --methods lru predictor \
    --schedule "${SCHEDULE:-scheduler}" --json "$out/replay-predictor-worker.json" 2>&1 | grep -v -e TokenSpaceWarning -e check_token_space \
    | tee "$out/replay-predictor-worker.log" || rc=1
  # the same predictor rows with the eviction the runtime had before the learned one (prediction-aware LRU)
  timeout 120 "$py" -m benchmarks.bench_replay --traces "$slice" --device cuda --predictor "$@" --predictor-device worker \
    --capacities 0.1 0.25 --dense-ms 0 --max-tokens 48 --warmup 16 --methods predictor --eviction predictor \
    --schedule "${SCHEDULE:-scheduler}" --json "$out/replay-predictor-worker-lru-eviction.json" 2>&1 | grep -v -e TokenSpaceWarning -e check_token_space \
    | tee "$out/replay-predictor-worker-lru-eviction.log" || rc=1
fi
if [ $# -gt 0 ] && want cost; then  # each predictor's serving cost on the GPU, eager and through the captured graphs, profiled
  for p in "$@"; do
    timeout 90 "$py" -m benchmarks.predictor_cost --predictor "$p" --traces "$slice" --device cuda --tokens 16 --profile \
      2>&1 | grep -v -e TokenSpaceWarning -e check_token_space | tee -a "$out/predictor-cost.log" || rc=1
  done
fi
echo "== done (at ${SECONDS} s)"
exit $rc
