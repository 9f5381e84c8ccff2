#!/usr/bin/env bash
# One command per GPU call: bash bench/perf/run.sh call1|call2|call3|call4|curve|ctx [--profile] [--smoke]
# Puts the packages' sources on PYTHONPATH and runs bench/perf/suite.py. On the GPU machine it first installs the
# peers' wheels when present: .whl/*.whl (bitsandbytes, Liger) into /tmp/site for every process, .whl/unsloth/*.whl
# (unsloth and its needs, fetched with ../shared/bench-peers/fetch_wheels.sh) into /tmp/usite, which the suite
# puts on the path of the unsloth process only. --smoke (CPU) installs nothing. PYTHON=... picks the interpreter.
# Results: RESULT lines and the table on stdout, $OUT/<call>.jsonl and loss_curve.png (default OUT=/tmp/out).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
SRC=$(ls -d packages/*/src src 2>/dev/null | paste -sd: -)
SITE=""
if [[ " $* " != *" --smoke "* ]]; then
  if compgen -G ".whl/*.whl" > /dev/null && [ ! -e /tmp/site/.done ]; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && touch /tmp/site/.done
  fi
  [ -e /tmp/site/.done ] && SITE=/tmp/site
  if compgen -G ".whl/unsloth/*.whl" > /dev/null && [ ! -e /tmp/usite/.done ]; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/usite .whl/unsloth/*.whl && touch /tmp/usite/.done
  fi
  [ -e /tmp/usite/.done ] && export SWIFTUNE_BENCH_UNSLOTH_SITE=/tmp/usite
fi
export PYTHONPATH="$SRC${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec $PY bench/perf/suite.py "$@"
