"""Offline sm_90 compile (Triton 3.6: `pip install --no-deps --target /tmp/t36 triton==3.6.0`) of the big SSD
kernels at their dstate 128 / chunk 128 launch settings: registers, and which loads stay in loops as plain `tt.load`
(each iteration waits on them) rather than async copies the pipeliner issues ahead (session 7, a record).

    TRITON_CACHE_DIR=/tmp/t36cache PYTHONPATH=/tmp/t36 python notes/ssd_runs/run14_offline_loads.py [dx dC dB out ...]

Found: at 1 stage (dx, out; dB / dC before session 7) every load is plain; in 2 stages dC still had its per-head cum
load in the loop (now carried one head ahead), dB none. The forward walk loads x, the reverse walk dy, as plain
loads (both are scaled before their dot); scaling B / C instead makes them async copies (fewer registers), but
that lost on the GPU (run 14 call 4: +0.3 ms at dstate 128 / 16K, ties elsewhere)."""
import os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, os.getcwd())
os.environ.pop("TRITON_INTERPRET", None)
from lit_mamba2.kernels import ssd as K
TARGET = GPUTarget("cuda", 90, 32)
CUOBJ = os.path.dirname(triton.__file__) + "/backends/nvidia/bin/cuobjdump"
BF16 = {"x_ptr", "B_ptr", "C_ptr", "dy_ptr", "dstates_ptr", "states_ptr", "cb_ptr", "dcb_ptr", "out_ptr", "dx_ptr",
        "dB_ptr", "dC_ptr", "z_ptr", "ypre_ptr", "cbt_ptr"}
def compile_(fn, const, warps=4, stages=2, maxnreg=None):
    names = list(fn.arg_names); sig = {}
    for n in names:
        if n in const: sig[n] = "constexpr"
        elif n.endswith("_ptr"): sig[n] = "*bf16" if n in BF16 else ("*i32" if n == "seq_ptr" else "*fp32")
        else: sig[n] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in const and (n.endswith("_ptr") or n in ("L", "H", "P", "N", "NC"))}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    opts = dict(num_warps=warps, num_stages=stages)
    if maxnreg: opts["maxnreg"] = maxnreg
    k = triton.compile(src, target=TARGET, options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        res = subprocess.run([CUOBJ, "-res-usage", f.name], capture_output=True, text=True).stdout
    return k, res
bf = tl.bfloat16
KS = {
 "dx": (K._bwd_dx_kernel, dict(CS=128, BM=64, BP=64, BN=128, HAS_D=True, D_PER_P=False, HAS_SEQ=False, USE_CB=False,
        CB_T=True, FOLD=True, HEADS_FASTEST=True, DOT_PREC="tf32", DT=bf), 4, 1, 168),
 "dC": (K._bwd_bc_kernel, dict(CS=128, BM=64, BP=64, BN=128, DO_DC=True, HAS_SEQ=False, DOT_PREC="tf32", DT=bf), 8, int(os.environ.get("ST", "2")), 128),
 "dB": (K._bwd_bc_kernel, dict(CS=128, BM=64, BP=64, BN=128, DO_DC=False, HAS_SEQ=False, DOT_PREC="tf32", DT=bf), 8, int(os.environ.get("ST", "2")), 128),
 "out": (K._fwd_out_kernel, dict(CS=128, BM=64, BK=64, BP=64, BN=128, HAS_D=True, D_PER_P=False, HAS_Z=False,
        HAS_SEQ=False, USE_CB=True, FOLD=True, DOT_PREC="tf32", DT=bf), 4, 1, 128),
 "fstate": (K._fwd_state_kernel, dict(CS=128, BK=128, BP=64, BN=64, HAS_INIT=False, HAS_SEQ=False, TWO_LEVEL=True,
        DOT_PREC="tf32", DT=bf), 4, 2, None),
 "bstate": (K._bwd_state_kernel, dict(CS=128, BK=int(os.environ.get("BK","64")), BP=64, BN=64, HAS_DFINAL=True, HAS_SEQ=False, TWO_LEVEL=True,
        DCL_ROWS=False, DOT_PREC="tf32", DT=bf), 4, 2, int(os.environ.get("MR","0")) or None),
 "dcb": (K._bwd_dcb_kernel, dict(CS=128, BM=64, BP=64, BN=128, HAS_SEQ=False, STORE_CBT=True, DOT_PREC="tf32", DT=bf), 8, 2, None),
}
for name in sys.argv[1:] or KS:
    fn, const, w, st, mr = KS[name]
    k, res = compile_(fn, const, w, st, mr)
    ttgir = k.asm["ttgir"]
    print(f"== {name}:", re.search(r"REG:(\d+) STACK:(\d+)", res).group(0), "smem", k.metadata.shared)
    # every loop body: in-loop plain loads (pipelined loads become async_copy / local_load)
    depth = 0
    for line in ttgir.splitlines():
        s = line.strip()
        if s.startswith("scf.for") or " scf.for " in s:
            depth += 1; print("   [loop", depth, "]")
        if depth and "tt.load" in s:
            m = re.search(r"tt\.load (%[\w#]+)", s)
            print("     load", s[:150])
        if depth and ("async_copy_global_to_local" in s):
            print("     async", s[:100])
