#!/usr/bin/env bash
# One GPU call: install the wheels the GPU image lacks (bitsandbytes, liger-kernel, trl, datasets from .whl/), then
# run the named steps. Usage: bash bench/run_gpu_session.sh STEP... ; logs and RESULT lines go to $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl/trainers/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$(ls -d packages/*/src | paste -sd:) PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, triton, transformers, peft, trl; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, trl.__version__, torch.cuda.get_device_name())"
step() { local name=$1 limit=$2; shift 2; echo "== $name"; local t0=$SECONDS; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $? in $((SECONDS-t0)) s"; tail -n "${TAIL:-14}" "$OUT/$name.log"; }
for s in "$@"; do
  case $s in
    generation) step generation 120 python3 bench/bench_generation.py ;;
    trainers_a) step trainers_a 280 python3 bench/bench_trainers.py --trainers sft,dpo,orpo --steps 3 --warmup 1 ;;
    trainers_b) step trainers_b 280 python3 bench/bench_trainers.py --trainers kto,grpo --steps 3 --warmup 1 ;;
    sweep) step sweep 280 python3 packages/kernels/benchmarks/sweep_kernels.py --budget-s 200 ;;
    offload) step offload 250 python3 packages/kernels/benchmarks/bench_offloaded_checkpoint.py --qlora --search --layers 32 --max-seconds 200 ;;
    vision) step vision 200 python3 bench/bench_vision.py ;;
    *) echo "unknown step $s" ;;
  esac
done
cat "$OUT"/*.log | grep '^RESULT ' > "$OUT/results.jsonl"
