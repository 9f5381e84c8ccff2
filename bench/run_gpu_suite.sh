#!/usr/bin/env bash
# One call on the GPU machine: kernels II tests compiled on the GPU, the kernels II benchmarks, and the whole-model
# fast path (Llama-3.2-1B shape, bf16 LoRA and NF4 QLoRA) against transformers + peft. Wheels the GPU image lacks
# (bitsandbytes, liger-kernel) come from .whl/. Logs go to $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$(ls -d packages/*/src | paste -sd:) PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, torch.cuda.get_device_name())"
step() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $?"; tail -n "${TAIL:-12}" "$OUT/$name.log"; }
TAIL=4 step tests_norm_rope 80 python3 -m pytest packages/kernels/tests/test_rms_norm.py packages/kernels/tests/test_rope.py \
  -p no:cacheprovider -q
TAIL=4 step tests_kernels2 100 python3 -m pytest packages/kernels/tests/test_nf4.py packages/kernels/tests/test_lora.py \
  packages/kernels/tests/test_offloaded_checkpoint.py -p no:cacheprovider -q
step bench_nf4 60 python3 packages/kernels/benchmarks/bench_nf4.py
step bench_lora 90 python3 packages/kernels/benchmarks/bench_lora.py
step bench_offload 60 python3 packages/kernels/benchmarks/bench_offloaded_checkpoint.py --max-seconds 45
TAIL=4 step fast_path_1b_bf16 80 python3 bench/bench_fast_path.py --shape 1b --seq 2048 --batch 4
TAIL=4 step fast_path_1b_qlora 100 python3 bench/bench_fast_path.py --shape 1b --seq 2048 --batch 4 --qlora
cat "$OUT"/*.log | grep '^RESULT ' > "$OUT/results.jsonl"
