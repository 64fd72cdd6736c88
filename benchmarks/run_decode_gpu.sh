#!/bin/bash
# The decode benchmarks in one device call, logs under $OUT. Run from the project root with lit_mamba2 importable
# (PEERS: the git-ignored folder with mamba_ssm's and causal-conv1d's sources). Stages (STAGES):
#  build  causal-conv1d for sm_90, in the background (> 230 s on an H100 machine: a call of its own, BUDGET=560);
#         skipped when $CC_BUILD (default $PEERS/causal-conv1d-build) already holds a build (the .so comes back
#         gzipped under $OUT: keep it there with the causal_conv1d/ package folder for later runs);
#  sweep  the kernels' tile sweep, bf16- vs float32-state drift and a kernel profile (sweep.log, sweep.extras.json);
#  ours   our decode variants (bench.json), with the sweep's winning tiles when stage `sweep` ran;
#  mamba  mamba_ssm's generate(cg=True) (mamba.json), with causal-conv1d when a build is there (else its PyTorch
#         conv update; the output says which); its Triton kernels take about a minute to compile.
# One call of ~230 s: ours (defaults), ours_no_pdl, ours_fp32_state and ours_ring, then mamba_ssm, for
# mamba2-130m and -370m at batch 1 and 64 (whole generations timed for `ours` only: GEN_FOR="ours ours_no_pdl" to
# add more; bench.json is saved after each row, and the variants run in the order given, so a stage cut short
# loses the last ones first):
#   PEERS=../../.peers bash benchmarks/run_decode_gpu.sh          (timeout_s 260)
# with a causal-conv1d build elsewhere: CC_BUILD=/path/to/build (a folder with causal_conv1d/ and the .so).
# BATCHES (default "1 64") picks the batch sizes; OURS_ARGS adds bench_decode.py flags to the ours stage.
set -u
PEERS=${PEERS:-.peers}
OUT=${OUT:-/tmp/out}
BUDGET=${BUDGET:-230}  # seconds for the whole script
MODELS=${MODELS:-"mamba2-130m mamba2-370m"}
VARIANTS=${VARIANTS:-"ours ours_no_pdl ours_fp32_state ours_ring"}  # most wanted first
STAGES=${STAGES:-"ours mamba"}
MAMBA_S=${MAMBA_S:-100}  # seconds kept for the mamba stage
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"

CONV_DIR=${CC_BUILD:-$PEERS/causal-conv1d-build}  # (not $CC: compilers read that one)
BUILD_PID=
if ls "$CONV_DIR"/causal_conv1d_cuda*.so >/dev/null 2>&1; then
  echo "causal-conv1d build: $CONV_DIR"
elif [[ " $STAGES " != *" build "* ]]; then
  echo "no causal-conv1d build in $CONV_DIR and stage build not asked for: mamba_ssm runs without it"
else
  CONV_DIR=/tmp/causal-conv1d
  (
    cp -r "$PEERS/causal-conv1d" $CONV_DIR && cd $CONV_DIR &&
    python3 - <<'EOF' &&
# sm_90 only: replace the list of architectures setup.py builds for
src = open("setup.py").read()
marker = "    # HACK: The compiler flag"
assert marker in src
open("setup.py", "w").write(src.replace(marker, '    cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]\n' + marker, 1))
EOF
    TORCH_CUDA_ARCH_LIST=9.0 CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=16 python3 setup.py build_ext --inplace &&
    ls -la causal_conv1d_cuda*.so && gzip -c causal_conv1d_cuda*.so > "$OUT/causal_conv1d_cuda.so.gz" &&
    echo "BUILD OK at ${SECONDS}s"
  ) > "$OUT/build.log" 2>&1 &
  BUILD_PID=$!
fi

if [[ " $STAGES " == *" sweep "* ]]; then
  timeout 110 python3 benchmarks/bench_decode.py --models $MODELS --sweep --drift 512 --profile --variants \
    --out "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
  grep -v "^{'kind'" "$OUT/sweep.log" | tail -c 9000
  echo "sweep stage done at ${SECONDS}s"
fi
if [[ " $STAGES " == *" ours "* ]]; then
  TUNED=()  # the sweep's winning tiles, when this run swept (bench.json records which)
  [ -f "$OUT/sweep.extras.json" ] && TUNED=(--tuned "$OUT/sweep.extras.json")
  timeout $((BUDGET - MAMBA_S - 5 - SECONDS)) python3 benchmarks/bench_decode.py --models $MODELS --no-mamba-ssm \
    "${TUNED[@]}" --variants $VARIANTS --gen-len 64 --iters 50 --gen-for ${GEN_FOR:-ours} --out "$OUT/bench.json" \
    --batches ${BATCHES:-1 64} ${OURS_ARGS:-} \
    > "$OUT/bench.log" 2>&1
  tail -c 4000 "$OUT/bench.log"
  echo "ours done at ${SECONDS}s"
fi
[[ " $STAGES " == *" mamba "* || " $STAGES " == *" build "* ]] || exit 0
if [ -n "$BUILD_PID" ]; then
  while kill -0 $BUILD_PID 2>/dev/null && [ $SECONDS -lt $((BUDGET - MAMBA_S)) ]; do sleep 2; done
  if kill -0 $BUILD_PID 2>/dev/null; then
    echo "causal-conv1d build still running at ${SECONDS}s: mamba_ssm is timed without it"; kill $BUILD_PID
  fi
  tail -2 "$OUT/build.log"
fi
[[ " $STAGES " == *" mamba "* ]] || exit 0
timeout $((BUDGET - SECONDS)) python3 benchmarks/bench_decode.py --models $MODELS --only-mamba-ssm --batches ${BATCHES:-1 64} \
  --peers "$PEERS" --cc-build "$CONV_DIR" --gen-len 64 --iters 50 --out "$OUT/mamba.json" 2>&1 | tee -a "$OUT/bench.log"
echo "done at ${SECONDS}s"
python3 benchmarks/bench_decode.py --report "$OUT/bench.json" "$OUT/mamba.json" | tee "$OUT/table.txt"
