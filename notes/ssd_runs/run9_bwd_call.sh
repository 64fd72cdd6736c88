#!/bin/bash
# Run 9 (backward helper bwd4): the one device call, run from the repository root of a copy of the worktree.
#   bash notes/ssd_runs/run9_bwd_call.sh SECONDS   (the call's time limit; each step gets a share of it)
# Steps: bench_ssd.py's bwd4 sweep per dstate (dstate 128 first; 64K, 32K, 16K tokens per row), the float64 check,
# the two-level pass's batch-1 errors and determinism, then the reverse state pass's per-kernel profile.
T=${1:-240}
export PYTHONUNBUFFERED=1
o=${OUT:-/tmp/out}
mkdir -p "$o"
t0=$(date +%s)
left() { echo $(( T - ($(date +%s) - t0) - ${1:-5} )); }
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$o/env.log" 2>&1
for n in 128 64; do
  timeout $(( T * 26 / 100 )) python benchmarks/bench_ssd.py --sweep --sweep-set bwd4 --no-bench --no-profile \
    --no-sdpa --dstate $n --warmup 10 --rep 40 --sweep-out "$o/sweep_$n.json" > "$o/sweep_$n.log" 2>&1
  rc=$?
  echo "sweep $n done $(( $(date +%s) - t0 )) s rc $rc" >> "$o/env.log"
done
timeout $(( T * 28 / 100 )) python benchmarks/check_ssd_gpu.py --no-mamba --out "$o/check.json" > "$o/check.log" 2>&1
echo "check done $(( $(date +%s) - t0 )) s" >> "$o/env.log"
timeout $(( T * 11 / 100 )) python notes/ssd_runs/run9_bwd_extra.py det > "$o/det.log" 2>&1
echo "det done $(( $(date +%s) - t0 )) s" >> "$o/env.log"
L=$(left 8); [ "$L" -gt 10 ] && timeout $L python notes/ssd_runs/run9_bwd_extra.py profile "$o/profile.json" \
  > "$o/profile.log" 2>&1
echo "profile done $(( $(date +%s) - t0 )) s" >> "$o/env.log"
cat "$o/env.log"; grep -h "fwd+bwd\|best" "$o"/sweep_*.log; tail -12 "$o/check.log"; cat "$o/det.log"
grep "^profile" "$o/profile.log" 2>/dev/null
