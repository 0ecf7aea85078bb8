#!/usr/bin/env bash
# Everything in this project that needs a CUDA GPU, in one pass sized for a short loan of one:
#   1. tests/test_cuda.py: CUDA vs CPU answers, bf16/fp16 training, exact resume, checkpoints
#      across devices, sampling, torch.compile, DDP over NCCL (skipped on machines without CUDA);
#   2. scripts/bench_gpu.py: throughput against the reference recipe on the same GPU, then
#      configs/ptb-word-small.yaml and configs/ptb-word-medium.yaml (time-limited) with test ppl.
# usage: bash scripts/gpu_check.sh [DATA_DIR] [OUT_DIR]
#   DATA_DIR holds ptb/ (default ../shared/data); OUT_DIR gets the logs (default runs/gpu-check).
#   Time limits per part (seconds): TEST_TIME (240), BENCH_SECONDS (12 per throughput run),
#   MEDIUM_TIME (training seconds for ptb-medium, 180; 0 skips it).
set -u
DATA=${1:-../shared/data}
OUT=${2:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RNNLM_CACHE="${RNNLM_CACHE:-$OUT/cache}"
start=$SECONDS
stamp() { echo "== [$((SECONDS - start)) s] $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv
python3 -c "import torch, sys; print('python', sys.version.split()[0], '· torch', torch.__version__, '· CUDA', torch.version.cuda, '· cuDNN', torch.backends.cudnn.version(), '·', torch.cuda.get_device_name(0))"

stamp "tests/test_cuda.py"
timeout "${TEST_TIME:-240}" python3 -m pytest -q -p no:cacheprovider -rs --durations=6 tests/test_cuda.py \
    >"$OUT/pytest.txt" 2>&1
echo "pytest exit code $?"; tail -n 40 "$OUT/pytest.txt"

stamp "throughput"
timeout 200 python3 scripts/bench_gpu.py throughput --data "$DATA" --out "$OUT/bench" \
    --seconds "${BENCH_SECONDS:-12}" 2>&1 | tail -n 20

stamp "ptb-word-small"
timeout 200 python3 scripts/bench_gpu.py ptb-small --data "$DATA" --out "$OUT/bench" 2>&1 | tail -n 20

if [ "${MEDIUM_TIME:-180}" != 0 ]; then
    stamp "ptb-word-medium (at most ${MEDIUM_TIME:-180} s of training)"
    timeout $(( ${MEDIUM_TIME:-180} + 90 )) python3 scripts/bench_gpu.py ptb-medium --data "$DATA" \
        --out "$OUT/bench" --medium-time "${MEDIUM_TIME:-180}" 2>&1 | tail -n 20
fi
stamp "done"
