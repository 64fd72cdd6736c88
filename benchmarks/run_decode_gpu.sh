#!/bin/bash
# The decode benchmarks in one device call, logs under $OUT. Run from the project root (PEERS: the git-ignored
# folder with mamba_ssm's and causal-conv1d's sources). causal-conv1d is built for sm_90 only unless
# $PEERS/causal-conv1d-build already holds a build; the build runs beside the kernel sweep, and mamba_ssm is timed
# once it is done (or without it, said in the log, when it fails or takes too long).
#   STAGES="sweep bench" BENCH_ARGS="--variants ours ours_cublas" bash benchmarks/run_decode_gpu.sh
set -u
PEERS=${PEERS:-.peers}
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-290}  # seconds for the whole script
STAGES=${STAGES:-"sweep bench"}
SWEEP_ARGS=${SWEEP_ARGS:-"--models mamba2-130m --sweep --profile --drift 512"}
BENCH_ARGS=${BENCH_ARGS:-"--variants ours ours_ring ours_cublas"}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"

CC=$PEERS/causal-conv1d-build
BUILD_PID=
if ! ls "$CC"/causal_conv1d_cuda*.so >/dev/null 2>&1; then
  CC=/tmp/causal-conv1d
  (
    cp -r "$PEERS/causal-conv1d" $CC && cd $CC &&
    python3 - <<'EOF' &&
# sm_90 only: replace the list of architectures setup.py builds for
src = open("setup.py").read()
marker = "    # HACK: The compiler flag"
assert marker in src
open("setup.py", "w").write(src.replace(marker, '    cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]\n' + marker, 1))
EOF
    TORCH_CUDA_ARCH_LIST=9.0 CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=16 python3 setup.py build_ext --inplace &&
    gzip -c causal_conv1d_cuda*.so > "$OUT/causal_conv1d_cuda.so.gz" && ls causal_conv1d_cuda*.so > "$OUT/so_name.txt"
  ) > "$OUT/build.log" 2>&1 &
  BUILD_PID=$!
fi

if [[ " $STAGES " == *" sweep "* ]]; then
  timeout $((BUDGET / 2)) python3 benchmarks/bench_decode.py $SWEEP_ARGS --variants --out "$OUT/sweep.json" \
    2>&1 | tee "$OUT/sweep.log" | grep -v "^{'kind'" | tail -c 20000
fi
if [ -n "$BUILD_PID" ]; then
  while kill -0 $BUILD_PID 2>/dev/null && [ $SECONDS -lt $((BUDGET - 150)) ]; do sleep 2; done
  if kill -0 $BUILD_PID 2>/dev/null; then
    echo "causal-conv1d build still running at ${SECONDS}s: mamba_ssm is timed without it"; kill $BUILD_PID
  fi
  tail -3 "$OUT/build.log"
fi
echo "build done at ${SECONDS}s"
if [[ " $STAGES " == *" bench "* ]]; then
  timeout $((BUDGET - SECONDS)) python3 benchmarks/bench_decode.py --peers "$PEERS" --cc-build "$CC" --gen-len 64 \
    --iters 50 $BENCH_ARGS --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -c 8000
fi
echo "done at ${SECONDS}s"
