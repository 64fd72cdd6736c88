#!/bin/bash
# The attention numbers in one device call: torch's API at hand, the GPU correctness check, then the benchmark.
# Logs and JSON under $OUT. Run from the project root with lit_mamba2 importable.
#   bash benchmarks/run_attention_gpu.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; CHECK_S=${CHECK_S:-300}; BENCH_S=${BENCH_S:-240}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env.log"
python3 - <<'PY' 2>&1 | tee -a "$OUT/env.log"
import inspect, torch, triton
from torch.nn.attention import flex_attention as fa
print("torch", torch.__version__, "triton", triton.__version__)
for f in (fa.flex_attention, fa.create_block_mask, fa.BlockMask.from_kv_blocks):
    print(f.__qualname__, inspect.signature(f))
try:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
except ImportError as e:
    print("no varlen_attn:", e)
PY
timeout "$BENCH_S" python3 benchmarks/bench_attention.py --out "$OUT/bench_attention.json" 2>&1 | grep -v Warning \
  | tee "$OUT/bench.log"
echo "bench done at ${SECONDS}s"
timeout "$CHECK_S" python3 benchmarks/check_attention_gpu.py --out "$OUT/check_attention.json" 2>&1 \
  | grep -v Warning | tee "$OUT/check.log"
echo "check done at ${SECONDS}s"
