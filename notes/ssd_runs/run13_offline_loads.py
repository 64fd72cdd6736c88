"""Offline sm_90 compile with Triton 3.6 (the device's version; `pip install --no-deps --target /tmp/t36 triton==3.6.0`)
of the reverse walk and the dCB kernel: which of their loop's loads Triton's pipeliner turns into async copies or
carries across iterations, and which it leaves in the loop where each iteration waits on them (session 6).

    TRITON_CACHE_DIR=/tmp/t36cache PYTHONPATH=/tmp/t36 python run13_offline_loads.py {bwd|dcb} {0|1}

Found on main (no prefetch): the walk's `cum_last` scalar and entering-state tile, and the dCB kernel's five per-head
cum / dt loads, are plain `tt.load`s inside the loop; dy / C (walk) and dy / x (dCB) are pipelined. With the branch's
prefetch (second argument 1) they are loaded one iteration ahead and carried (`scf.yield`); registers: walk 221 ->
243 (2 programs per SM either way), dCB 255 + 8 B stack either way. (a record, not part of the package)"""
import os, re, subprocess, sys, tempfile
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, os.getcwd())
os.environ.pop("TRITON_INTERPRET", None)
from lit_mamba2.kernels import ssd as K
TARGET = GPUTarget("cuda", 90, 32)
CUOBJ = os.path.dirname(triton.__file__) + "/backends/nvidia/bin/cuobjdump"
BF16 = {"x_ptr", "B_ptr", "C_ptr", "dy_ptr", "dstates_ptr", "states_ptr"}
def compile_(fn, const, warps=4, stages=2):
    names = list(fn.arg_names); sig = {}
    for n in names:
        if n in const: sig[n] = "constexpr"
        elif n.endswith("_ptr"): sig[n] = "*bf16" if n in BF16 else ("*i32" if n == "seq_ptr" else "*fp32")
        else: sig[n] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n not in const and (n.endswith("_ptr") or n in ("L", "H", "P", "N", "NC"))}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    k = triton.compile(src, target=TARGET, options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        res = subprocess.run([CUOBJ, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJ, "-sass", f.name], capture_output=True, text=True).stdout
    return k, res, sass
which, PF = sys.argv[1], sys.argv[2] == "1"
if which == "bwd":
    const = dict(CS=128, BK=64, BP=64, BN=64, HAS_DFINAL=True, HAS_SEQ=False, TWO_LEVEL=True, DCL_ROWS=False,
                 DOT_PREC="tf32", DT=tl.bfloat16, PREFETCH=PF)
    k, res, sass = compile_(K._bwd_state_kernel, const)
else:
    const = dict(CS=128, BM=64, BP=64, BN=64, HAS_SEQ=False, STORE_CBT=True, DOT_PREC="tf32", DT=tl.bfloat16,
                 PREFETCH=PF)
    k, res, sass = compile_(K._bwd_dcb_kernel, const, 4, 2)
ttgir = k.asm["ttgir"]
print(re.search(r"REG:(\d+) STACK:(\d+)", res).group(0), "smem", k.metadata.shared)
loop = ttgir[ttgir.index("scf.for"):]
print("in-loop tt.load lines:")
for line in loop.splitlines():
    if "tt.load" in line:
        print("  ", line.strip()[:120])
