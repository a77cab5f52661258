#!/usr/bin/env bash
# The GPU benchmarks in one call of the device tool (an H100 / H200 with the workplace's CUDA
# image: jax 0.11 + CUDA, torch + transformers). Carry .whl (flax 0.12.8, orbax-checkpoint,
# ml-collections, tensorboardX wheels: see bench/RESULTS.md) and run from the repo root:
#   bash bench/gpu.sh        (results and logs under $OUT, or ./gpu-out)
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax, orbax.checkpoint, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.txt"
timeout ${GEN_TIMEOUT:-270} python3 bench/generate.py --shape gpt2_small --dtype bfloat16 \
  --prompt 128 --new 128 --batches 1,8,32 --peer-device cuda --hf-python python3 \
  --variants plain,int8 --json "$OUT/generate_gpu.json" 2>&1 | tee "$OUT/generate.log" | grep -v "^  (peer"
timeout ${TRAIN_TIMEOUT:-200} python3 bench/train_throughput.py --shape gpt2_small \
  --dtype bfloat16 --styles gpt2 --peers none --steps 10 --json "$OUT/train_gpu.json" 2>&1 \
  | tee "$OUT/train.log" | tail -8
