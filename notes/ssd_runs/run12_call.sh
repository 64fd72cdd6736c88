#!/bin/bash
# Run 12 (helper fixfold): the one device call, run from the repository root of a copy of the worktree.
#   PEERS=../../.peers bash notes/ssd_runs/run12_call.sh SECONDS
# Steps: the float64 check at real sizes (defaults: the folded two-level reverse pass), then per dstate bench_ssd.py's
# fixfold sweep (old fix-up pass vs the folds, 64K / 32K / 16K tokens per row) followed by the table at 16K / 32K /
# 64K under the sweep's winner with the v8-bwd fix-up pass as --baseline and mamba_ssm beside, then the per-kernel
# profile of old vs new.
# (a record of run 12's device call: needs the code of commit 5da6e76; the folds were removed after the call)
T=${1:-400}
PEERS=${PEERS:-.peers}
export PYTHONUNBUFFERED=1
o=${OUT:-/tmp/out}
mkdir -p "$o"
t0=$(date +%s)
left() { echo $(( T - ($(date +%s) - t0) - ${1:-5} )); }
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$o/env.log" 2>&1
timeout $(( T * 22 / 100 )) python benchmarks/check_ssd_gpu.py --no-mamba --out "$o/check.json" > "$o/check.log" 2>&1
rc=$?; echo "check done $(( $(date +%s) - t0 )) s rc $rc" >> "$o/env.log"
for n in 64 128; do
  L=$(left 50); [ "$n" = 64 ] && L=$(( L / 2 ))
  LIT_MAMBA2_KERNEL_STATS=1 timeout $L python benchmarks/bench_ssd.py --sweep --sweep-set fixfold --no-profile \
    --no-sdpa --dstate $n --seqlens 16384 32768 65536 --warmup 10 --rep 40 --mamba-src "$PEERS" \
    --baseline '{"bwd_state_fold": false}' --sweep-out "$o/sweep_$n.json" --out "$o/bench_$n.json" \
    > "$o/bench_$n.log" 2>&1
  rc=$?; echo "sweep+bench $n done $(( $(date +%s) - t0 )) s rc $rc" >> "$o/env.log"
done
L=$(left 5); [ "$L" -gt 15 ] && timeout $L python notes/ssd_runs/run12_extra.py profile "$o/profile.json" \
  > "$o/profile.log" 2>&1
echo "profile done $(( $(date +%s) - t0 )) s" >> "$o/env.log"
cat "$o/env.log"; tail -12 "$o/check.log"; grep -h "fwd+bwd\|best" "$o"/bench_*.log
grep -h -A6 "^dstate seqlen\|^baseline" "$o"/bench_*.log; grep "^profile" "$o/profile.log" 2>/dev/null
