#!/usr/bin/env bash
# RoPE launch configurations, each timed by bench_rope.py (CUDA graphs) in a fresh process, so that no earlier
# benchmark's memory or graph pool can make a capture fail. Usage, on the GPU machine from the repository root:
#   PYTHONPATH=$(ls -d packages/*/src | paste -sd:) bash packages/kernels/benchmarks/rope_configs.sh
#   LAYOUTS=hf bash packages/kernels/benchmarks/rope_configs.sh '{}' '{"token_warps":4}'   # chosen overrides
# Each block prints bench_rope's table for one CONFIG override of swiftune_kernels/rope.py.
if [ $# -eq 0 ]; then
  set -- '{}' '{"hf_kernel":"heads"}' '{"token_warps":4}' '{"token_eviction":""}' '{"token_warps":1}' \
    '{"tokens_per_program":2,"token_warps":4,"token_tile":8192}'
fi
for cfg in "$@"; do
  echo "== rope CONFIG $cfg"
  timeout 90 python3 - "$cfg" "${LAYOUTS:-hf,contiguous}" <<'PY'
import json
import runpy
import sys

sys.path.insert(0, "packages/kernels/benchmarks")
import swiftune_kernels  # noqa: E402,F401  (the package exports the functional under the module's name)

sys.modules["swiftune_kernels.rope"].CONFIG.update(json.loads(sys.argv[1]))
sys.argv = ["bench_rope.py", "--layouts", sys.argv[2]]
runpy.run_path("packages/kernels/benchmarks/bench_rope.py", run_name="__main__")
PY
done
