#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one short run (README, Devices). On a machine with a GPU and a CUDA build of
# PyTorch (plus numpy, scipy, matplotlib, tqdm, safetensors, pytest), from the repository root:
#
#     bash bench/gpu_check.sh [python]        # about 5-8 minutes on one H200 (estimate: not yet run)
#
# 1. the tests marked `gpu` (cuda training = cpu training, float32 compensated statistics on the GPU, streamed
#    training delivered to the GPU) and the device, statistics and solve tests;
# 2. E3 --quick end to end with --DEVICE=cuda (synthetic activations: no data files needed);
# 3. bench/bench_scale.py on the GPU: tokens/s of SGD and PAM at n 2304, d 16384, K 64 on 262,144 tokens, the
#    fraction of the GPU's matmul rate, PAM's epoch / SGD's (target <= 1.5), and a streamed epoch from 2 GiB of shards.
# The log goes to ${OUT:-results/gpu_check}/gpu_check.log.
set -o pipefail
PY=${1:-python3}
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
    nvidia-smi -L
    "$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0))"
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
    "$PY" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_device.py tests/test_stats_dtype.py tests/test_pam.py
    "$PY" exp_e3_LLM_SGD_PAM_ablations.py --quick --DEVICE=cuda --out "$OUT/e3_quick"
    "$PY" bench/bench_scale.py --device cuda --tokens 262144 --nprocs 1 --gib 2 --latents 4096 --k 64
} 2>&1 | tee "$OUT/gpu_check.log"
