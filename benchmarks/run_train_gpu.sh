#!/bin/bash
# The whole-model training benchmark (benchmarks/bench_train.py) on the GPU machine, logs under $OUT. Run from the
# project root with lit_mamba2 importable; PEERS holds mamba_ssm's and causal-conv1d's sources. Stages (STAGES):
#  build  causal-conv1d WITH its backward, for sm_90 (several minutes: a call of its own); its .so comes back
#         gzipped under $OUT with the causal_conv1d/ package: unpack both into a git-ignored folder and pass it as
#         CC_BUILD (carried) to the bench stage, so that mamba_ssm trains through its fused conv + scan path
#  bench  ours against mamba_ssm, the same weights and batch (mamba_ssm's fused path when CC_BUILD holds a build with
#         the backward, else its unfused path with PyTorch's conv), with a per-kernel profile of each side
#   STAGES=build PEERS=.peers bash benchmarks/run_train_gpu.sh                          (timeout_s 600)
#   CC_BUILD=.peers/causal-conv1d-full PEERS=.peers bash benchmarks/run_train_gpu.sh    (timeout_s 400)
set -u
PEERS=${PEERS:-.peers}
OUT=${OUT:-/tmp/out}
STAGES=${STAGES:-bench}
MODELS=${MODELS:-"mamba2-130m mamba2-370m"}
SHAPES=${SHAPES:-"8x2048"}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [[ " $STAGES " == *" build "* ]]; then
  WITH_BWD=1 MAX_JOBS=${MAX_JOBS:-16} bash benchmarks/build_causal_conv1d.sh "$PEERS/causal-conv1d" /tmp/cc-full \
    > "$OUT/build.log" 2>&1 && gzip -c /tmp/cc-full/causal_conv1d_cuda*.so > "$OUT/causal_conv1d_cuda_full.so.gz" \
    && cp -r /tmp/cc-full/causal_conv1d "$OUT/" && echo "build done at ${SECONDS}s"
  tail -3 "$OUT/build.log"
fi
if [[ " $STAGES " == *" bench "* ]]; then
  CC=()
  [ -n "${CC_BUILD:-}" ] && CC=(--cc-build "$CC_BUILD")
  python3 benchmarks/bench_train.py --peers "$PEERS" "${CC[@]}" --models $MODELS --shapes $SHAPES --profile \
    --out "$OUT/train.json" 2>&1 | grep -v Warning | tee "$OUT/train.log" | tail -12
  echo "bench done at ${SECONDS}s"
fi
