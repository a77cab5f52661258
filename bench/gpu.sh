#!/usr/bin/env bash
# The GPU benchmarks for one call of the device tool (an H100 / H200 with the workplace's CUDA
# image: jax 0.11 + CUDA, torch + transformers). Carry .whl (wheels of what the image lacks:
# flax, orbax-checkpoint, ml-collections, tensorboardX, tqdm; see bench/RESULTS.md) and run from
# the repo root:
#   bash bench/gpu.sh [SECTION ...]     results and logs under $OUT (or ./gpu-out)
# Sections, in the order of the issue-19 targets (default: llama gpt2 decode); each compiles
# once per row and times a few steps, under its own timeout:
#   llama     configs/llama_1b.py's shape, bf16, seq 2048, the largest batch lm.plan fits, remat
#             full and none, cuDNN vs XLA attention, against PyTorch + transformers (~5 min)
#   gpt2      GPT-2 small bf16: cuDNN vs XLA attention, each steering custom VJP off in turn
#   precision GPT-2 small step time in float32 (TF32) vs bfloat16 vs float16
#   decode    bench/generate.py at batch 1, 8, 32 against HF generate and the memory roof
#   decode-graphs  the same (lm only) with XLA's command buffers for the loop body (CUDA graphs:
#             no per-iteration kernel launches from the host)
#   trace     a profiler trace of GPT-2 small (python -m lm.trace prints its breakdown)
#   bert      bench/bert.py: BERT-large phase 1 (seq 128, NVLAMB, one microbatch) bf16 at 64
#             sequences per GPU, sequences/s and MFU beside NVIDIA's 580 seq/s per A100, against
#             BertForPreTraining (AdamW; MLM head on all positions, and on the 20 masked ones)
#             (~4 min; BERT_BATCH, BERT_REMAT=none|dots|full, BERT_TIMEOUT)
#   encoder   bench/encoder_latency.py: BERT-large QA (span head) at batch 1, seq 128, p50 / p99
#             in bf16 (weights bf16, and fp32 cast per call) and fp32 (TF32) against
#             BertForQuestionAnswering fp16 / bf16 / fp32 (TF32), then configs/finetune.py:classify
#             with a BERT-base body: train step fp16 (loss-scaled) vs fp32, batch 32 x 128
#             (~4 min; ENCODER_RUNS, ENCODER_TIMEOUT)
#   int8      bench/int8.py --speed-only: prefill 8 x 128 and decode steps at batch 1 / 8 of a
#             4 x 768 gpt2-style model: calibrated int8 (int8 x int8 -> int32) and weight-only
#             int8 against bf16 (~2 min; INT8_TIMEOUT)
# CPU dry run of the same commands, tiny shapes: SHAPE_OVERRIDE=cpu bash bench/gpu.sh gpt2
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.90
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
$py -c "import jax, flax, optax, orbax.checkpoint; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.txt"
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
gpu=$(nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
dt=bfloat16; [ "$gpu" = 1 ] || dt=float32  # a CPU dry run: XLA:CPU computes bf16 slowly
small=${SHAPE_OVERRIDE:-gpt2_small}; big=${SHAPE_OVERRIDE:-llama_1b}
train() {  # NAME TIMEOUT ARGS...: one bench/train_throughput.py run, JSON + log under $OUT
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" $py bench/train_throughput.py --steps ${STEPS:-8} --json "$OUT/$name.json" \
    --hf-python "$py" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^  (peer"
}
for section in ${@:-llama gpt2 decode}; do
  case $section in
    llama) train train_llama_1b ${LLAMA_TIMEOUT:-330} --shape "$big" --styles llama --dtype $dt \
             --layers scan --remat full,none --attention cudnn,xla --batch auto --peers hf ;;
    gpt2) train train_gpt2_small ${GPT2_TIMEOUT:-240} --shape "$small" --styles gpt2 --dtype $dt \
            --layers unrolled --attention auto,xla \
            --steering all,-dense,-materialize_grad,-softmax,none --peers hf ;;
    precision)
      for p in float32 bfloat16 float16; do
        train train_gpt2_small_$p ${PRECISION_TIMEOUT:-100} --shape "$small" --styles gpt2 \
          --dtype $p --layers unrolled --peers none
      done ;;
    decode) echo "== decode"
      timeout ${GEN_TIMEOUT:-270} $py bench/generate.py --shape "$small" --dtype $dt \
        --prompt 128 --new 128 --batches 1,8,32 --peer-device $([ "$gpu" = 1 ] && echo cuda || echo cpu) \
        --hf-python "$py" --variants plain,int8 --json "$OUT/generate_gpu.json" 2>&1 \
        | tee "$OUT/generate.log" | grep -v "^  (peer" ;;
    decode-graphs) echo "== decode with the while loop and conditionals in CUDA graphs"
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CONDITIONAL,WHILE" \
      timeout ${GEN_TIMEOUT:-200} $py bench/generate.py --shape "$small" --dtype $dt \
        --prompt 128 --new 128 --batches 1,8,32 --peer-device none --variants plain \
        --json "$OUT/generate_gpu_graphs.json" 2>&1 | tee "$OUT/generate_graphs.log" ;;
    trace) echo "== trace"
      w=$(mktemp -d)
      timeout ${TRACE_TIMEOUT:-150} $py -m lm.train --config configs/gpt2_small.py --workdir "$w" \
        --config.train.steps=6 --config.train.profile_steps=4:5 --config.train.progress=False \
        --config.train.sample_tokens=0 --config.precision.compute_dtype=$dt --config.mesh.data=1 \
        > "$OUT/trace_train.log" 2>&1
      $py -m lm.trace "$w" --top 15 2>&1 | tee "$OUT/trace.txt"
      cp -r "$w/tb/plugins" "$OUT/trace_plugins" 2>/dev/null ;;
    bert) echo "== bert"
      bsize=large; [ "$gpu" = 1 ] || bsize=base  # the CPU dry run: BERT-base at batch 8
      timeout ${BERT_TIMEOUT:-360} $py bench/bert.py --size $bsize --seq 128 \
        --batch ${BERT_BATCH:-$([ "$gpu" = 1 ] && echo 64 || echo 8)} --steps ${STEPS:-8} \
        ${BERT_REMAT:+--remat $BERT_REMAT} --peer-head all,masked --peer-python "$py" \
        --json "$OUT/bert.json" 2>&1 | tee "$OUT/bert.log" | grep -v "^  (peer" ;;
    encoder) echo "== encoder"
      emodel=large; [ "$gpu" = 1 ] || emodel=base  # the CPU dry run: BERT-base fp32, a tiny step
      timeout ${ENCODER_TIMEOUT:-360} $py bench/encoder_latency.py --models $emodel --seq-len 128 \
        --dtype $([ "$gpu" = 1 ] && echo bfloat16,float32 || echo float32) --param-dtype compute,float32 \
        --runs ${ENCODER_RUNS:-$([ "$gpu" = 1 ] && echo 100 || echo 3)} --warmup 3 --train-step \
        --peer-python "$py" --json "$OUT/encoder_latency.json" 2>&1 | tee "$OUT/encoder.log" \
        | grep -v "^  (peer" ;;
    int8) echo "== int8"  # calibrated int8 matmuls and weight-only int8 vs bf16 (issue 23)
      timeout ${INT8_TIMEOUT:-200} $py bench/int8.py --speed-only --dtype $dt --rounds 5 \
        --json "$OUT/int8.json" 2>&1 | tee "$OUT/int8.log" ;;
    *) echo "unknown section $section (llama gpt2 precision decode decode-graphs trace bert encoder int8)"; exit 2 ;;
  esac
done
