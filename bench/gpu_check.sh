#!/usr/bin/env bash
# One pass over what needs a GPU (about 8 minutes on an H200), for a lent CUDA machine:
#   1. the main job (default config: public pretraining + DP fine-tuning) trains and predicts on CUDA,
#   2. bench/bench_gpu.py --quick (DP vs non-private images/s and memory, loader vs GPU),
#   3. bench/bench_dp.py's default DP step against the non-private one at 224 px.
# Usage: bash bench/gpu_check.sh OUT_FOLDER     (logs and markdown tables land there)
# The requirements must be importable by python3 there (a lent machine lacking opacus, dp-accounting, pydantic,
# fairlearn, pydicom: install their wheels first, e.g. pip install --target DIR and PYTHONPATH=DIR).
# Each part has its own time limit, so one failing part does not stop the others; the exit code is the
# number of parts that failed.
set -u
out=${1:?usage: bash bench/gpu_check.sh OUT_FOLDER}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s"; tail -n 15 "$out/$name.log"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
nvidia-smi -L
python3 -c "import torch, opacus; print('torch', torch.__version__, 'opacus', opacus.__version__, torch.cuda.get_device_name(0))"
runs=$(mktemp -d)
part train 170 python3 main_2D_DP.py train --name gpu --set output.target_dir="$runs" training.device=cuda
part predict 60 python3 main_2D_DP.py predict "$runs/gpu" --split test
part bench_gpu 240 python3 bench/bench_gpu.py --quick --budget-s 170 --out "$out/bench_gpu.md"
part bench_dp 70 python3 bench/bench_dp.py --methods non-private,bookkeeping-patients-secure --repeats 7 \
  --out "$out/bench_dp.md"
exit "$failed"
