#!/usr/bin/env bash
# Every GPU row the benchmarks have, in one go, for a session with a lent GPU (see ../.library/device).
# Each step is bounded so the whole script fits one device call; results land in benchmarks/results/*-cuda.json
# and the printed tables go to $OUT (or ./gpu-logs) for BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-logs}"
mkdir -p "$out"
run() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name" | tee -a "$out/summary.txt"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   rc=$? ($(tail -1 "$out/$name.log"))" | tee -a "$out/summary.txt"
}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'" || exit 1
run serve_throughput 240 python benchmarks/serve_throughput.py --device cuda --n 2,10,100 --duration 10
run qst_memory 120 python benchmarks/qst_memory.py --device cuda --model llama-1b
run mezo_memory 90 python benchmarks/mezo_memory.py --device cuda --models llama-1b
cp benchmarks/results/*-cuda.json "$out"/ 2>/dev/null || true
