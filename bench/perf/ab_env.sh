#!/usr/bin/env bash
# A/B of one environment setting on swiftune's 8B QLoRA step (ckpt=0.6), alternating in fresh processes:
#   bash bench/perf/ab_env.sh "OMP_NUM_THREADS=1" 2
# Prints each process's tokens/s, peak and every timed step. Run from bench/perf's parent's parent (the repo root).
set -uo pipefail
cd "$(dirname "$0")"
SETTING=$1; PAIRS=${2:-2}; shift 2 || true
for i in $(seq "$PAIRS"); do
  for arm in base test; do
    if [ $arm = test ]; then ENVV="env $SETTING"; else ENVV=env; fi
    $ENVV python3 train_one.py --system swiftune --shape 8b --quant nf4 --points 2x2048 --warmup 3 --steps 10 \
      --checkpointing 0.6 "$@" 2>/dev/null | grep '^RESULT' | python3 -c "
import json,sys
for line in sys.stdin:
    r=json.loads(line[7:])
    if 'tokens_per_s' in r: print('$arm', '$SETTING' if '$arm'=='test' else '-', r['tokens_per_s'], r['peak_gib'], r.get('step_s_all'))"
  done
done
