#!/usr/bin/env bash
# Everything in this project that needs a CUDA GPU, in one pass sized for a short loan of one:
#   tests        tests/test_cuda.py: CUDA vs CPU answers, bf16/fp16 training, exact resume,
#                checkpoints across devices, sampling, torch.compile, DDP over NCCL (~1 min on an H200)
#   throughput   scripts/bench_gpu.py throughput + profile: against the reference recipe on the same GPU (~2 min)
#   ptb-small    configs/ptb-word-small.yaml, 13 epochs, then test ppl (76 s on an H200 with CUDA graphs)
#   ptb-medium   configs/ptb-word-medium.yaml for MEDIUM_TIME training seconds, then test ppl
#                (all 39 epochs took 236 s on an H200 with CUDA graphs)
# usage: [PARTS="tests throughput"] bash scripts/gpu_check.sh [DATA_DIR] [OUT_DIR]
#   DATA_DIR holds ptb/ (default data, where scripts/download_data.py ptb puts it); OUT_DIR gets
#   the logs (default runs/gpu-check).
#   Limits (seconds): TEST_TIME (240), BENCH_SECONDS (10 per throughput run), MEDIUM_TIME (300).
set -u
DATA=${1:-data}
OUT=${2:-runs/gpu-check}
PARTS=${PARTS:-tests throughput ptb-small ptb-medium}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RNNLM_CACHE="${RNNLM_CACHE:-$OUT/cache}"
start=$SECONDS
stamp() { echo "== [$((SECONDS - start)) s] $*"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv
python3 -c "import torch, sys; print('python', sys.version.split()[0], '· torch', torch.__version__, '· CUDA', torch.version.cuda, '· cuDNN', torch.backends.cudnn.version(), '·', torch.cuda.get_device_name(0))"

if want tests; then
    stamp "tests/test_cuda.py"
    timeout "${TEST_TIME:-240}" python3 -m pytest -q -p no:cacheprovider -rs --durations=6 tests/test_cuda.py \
        >"$OUT/pytest.txt" 2>&1
    echo "pytest exit code $?"; tail -n 40 "$OUT/pytest.txt"
fi
if want throughput; then
    stamp "throughput and profile"
    timeout 240 python3 scripts/bench_gpu.py throughput profile --data "$DATA" --out "$OUT/bench" \
        --seconds "${BENCH_SECONDS:-10}" 2>&1 | head -n 45
fi
if want ptb-small; then
    stamp "ptb-word-small"
    timeout 600 python3 scripts/bench_gpu.py ptb-small --data "$DATA" --out "$OUT/bench" 2>&1 | tail -n 20
fi
if want ptb-medium; then
    stamp "ptb-word-medium (at most ${MEDIUM_TIME:-300} s of training)"
    timeout $(( ${MEDIUM_TIME:-300} + 120 )) python3 scripts/bench_gpu.py ptb-medium --data "$DATA" \
        --out "$OUT/bench" --medium-time "${MEDIUM_TIME:-300}" 2>&1 | tail -n 20
fi
stamp "done"
