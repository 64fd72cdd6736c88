#!/bin/bash
# The SSD numbers of BENCHMARKS.md in one device call: the real-size correctness check, then the table (ours,
# mamba_ssm, fla, SDPA) after an optional sweep whose winners the table uses. Logs and JSON under $OUT.
# Run from the project root with lit_mamba2 importable; PEERS holds mamba_ssm's source, WHL fla's wheel.
#   PEERS=.peers WHL=.whl bash benchmarks/run_ssd_gpu.sh [extra bench_ssd.py arguments, e.g. --sweep --sweep-set fwd_state]
set -uo pipefail
PEERS=${PEERS:-.peers}; WHL=${WHL:-.whl}; OUT=${OUT:-/tmp/out}
CHECK_S=${CHECK_S:-150}; BENCH_S=${BENCH_S:-400}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$WHL"/fla_core-*.whl && export PYTHONPATH=${PYTHONPATH:-}:/tmp/site
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/env.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.log"
timeout "$CHECK_S" python3 benchmarks/check_ssd_gpu.py --no-mamba --out "$OUT/check_ssd.json" 2>&1 | grep -v Warning \
  | tee "$OUT/check.log" | grep -v '^{'
echo "check done at ${SECONDS}s"
LIT_MAMBA2_KERNEL_STATS=1 timeout "$BENCH_S" python3 benchmarks/bench_ssd.py --mamba-src "$PEERS" \
  --out "$OUT/bench_ssd.json" "$@" 2>&1 | grep -v Warning | tee "$OUT/bench.log" | grep -v '^{'
echo "bench done at ${SECONDS}s"
