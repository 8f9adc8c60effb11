#!/usr/bin/env bash
# Measure the spread of every value that a numerical test bounds (tests/spread.py says why),
# over torch's CPU kernels and the seeds of the tiny reference models, and write
# tests/spread.json: the figures the thresholds' comments quote.
#
#   bash tests/spread.sh ["SEEDS"] ["KERNELS"]     defaults: "0 1 2" and "default avx2 avx512"
#
# Two runs at a time, each test process on one torch thread where the tests ask for it.
# ONNX Runtime picks its own kernels from the CPU: only another machine varies those.
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-0 1 2}
kernels=${2:-default avx2 avx512}
work=$(mktemp -d)
# SPREAD_FILES narrows the run (e.g. after changing one test); tests/spread.json then holds only those.
files=${SPREAD_FILES:-$(grep -l "measured(" tests/unit/test_*.py | tr '\n' ' ')}
run_one() {  # kernels seed
  ATEN_CPU_CAPABILITY=$1 EDGESLIM_TEST_SEED=$2 EDGESLIM_TEST_CACHE="$work/models-$1-$2" \
  EDGESLIM_SPREAD_LOG="$work/log-$1-$2.jsonl" \
    python -m pytest -q -p no:cacheprovider $files > "$work/pytest-$1-$2.txt" 2>&1 || true
  echo "kernels $1, seed $2: $(tail -n 1 "$work/pytest-$1-$2.txt")"
}
export -f run_one; export work files
for k in $kernels; do for s in $seeds; do echo "$k $s"; done; done | xargs -P 2 -n 2 bash -c 'run_one "$0" "$1"'
cat "$work"/log-*.jsonl > "$work/all.jsonl"
python tests/spread.py "$work/all.jsonl" > tests/spread.json
grep -h -E "^(FAILED|ERROR)" "$work"/pytest-*.txt | sort | uniq -c || true
echo "tests/spread.json: $(grep -c '"min"' tests/spread.json) values; logs in $work"
