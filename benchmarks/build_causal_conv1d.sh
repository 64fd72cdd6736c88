#!/bin/bash
# Build causal-conv1d (the peer mamba_ssm uses for its conv) from its source on the GPU machine, for sm_90 only and
# without its backward kernels (the decode benchmark needs the forward and the one-token update; the backward is
# most of the build time); WITH_BWD=1 keeps them (for mamba_ssm's fused training path: benchmarks/bench_train.py).
# Works on a copy: the source folder is left as it is.
#   [WITH_BWD=1] bash benchmarks/build_causal_conv1d.sh SRC DEST   (SRC: causal-conv1d's source tree; DEST gets the
#                                                                   .so and the causal_conv1d/ package, for PYTHONPATH)
set -eu
SRC=$1; DEST=$2
WORK=$(mktemp -d)
cp -r "$SRC"/. "$WORK" && cd "$WORK"
WITH_BWD=${WITH_BWD:-0} python3 - <<'PY'
import os
src = open("setup.py").read()
marker = "    # HACK: The compiler flag"
assert marker in src, "setup.py layout changed"
open("setup.py", "w").write(src.replace(marker, '    cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]\n' + marker, 1))
if os.environ["WITH_BWD"] == "1":
    raise SystemExit(0)
# the backward: keep its declarations and explicit instantiations, give them bodies that refuse to run
bwd = open("csrc/causal_conv1d_bwd.cu").read()
includes = "".join(l + "\n" for l in bwd.splitlines() if l.startswith("#include"))
inst = "".join(l + "\n" for l in bwd.splitlines() if l.startswith("template void"))
stub = """
template<typename input_t, typename weight_t>
void causal_conv1d_bwd_cuda(ConvParamsBwd &params, cudaStream_t stream) { TORCH_CHECK(false, "backward not built"); }
template<typename input_t, typename weight_t>
void causal_conv1d_channellast_bwd_cuda(ConvParamsBwd &params, cudaStream_t stream) { TORCH_CHECK(false, "backward not built"); }
"""
open("csrc/causal_conv1d_bwd.cu", "w").write(includes + "#include <c10/util/Exception.h>\n" + stub + inst)
PY
TORCH_CUDA_ARCH_LIST=9.0 CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-8} python3 setup.py build_ext --inplace
mkdir -p "$DEST"
cp causal_conv1d_cuda*.so "$DEST"/ && cp -r causal_conv1d "$DEST"/
echo "causal-conv1d built into $DEST after ${SECONDS}s"
