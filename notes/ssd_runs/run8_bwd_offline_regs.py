"""Offline sm_90 compile of the backward kernels with Triton 3.6 (the device's version; `pip install --no-deps
--target /tmp/t36 triton==3.6.0`): registers, spills, shared memory and tensor-core instructions per launch variant,
no GPU needed (the method of run5_fwd_offline_regs.py, whose counts matched the GPU's).

    TRITON_CACHE_DIR=/tmp/t36cache PYTHONPATH=/tmp/t36:/work/wt-bwd3 python run8_bwd_offline_regs.py

Run 8 also compiled the variants it then removed (128-position dx / dB / dC blocks, heads looped in dx, a split dCB
kernel, the s side of d cum in dx); their numbers are in notes/ssd_kernels.md (v7-bwd). (a record of how run 8's register numbers were
obtained, not part of the package)"""
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lit_mamba2.kernels import ssd as K

TARGET = GPUTarget("cuda", 90, 32)
CUOBJ = os.path.dirname(triton.__file__) + "/backends/nvidia/bin/cuobjdump"
BF16 = {"x_ptr", "B_ptr", "C_ptr", "dy_ptr", "dstates_ptr", "states_ptr", "dx_ptr", "dB_ptr", "dC_ptr", "dcb_ptr"}


def compile_(fn, const, warps=4, stages=1, maxnreg=None, ptr_types=None):
    names = list(fn.arg_names)
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = (ptr_types or {}).get(n, "*bf16" if n in BF16 else "*fp32")
        else:
            sig[n] = "i32"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in const and (n.endswith("_ptr") or n in ("L", "H", "P", "N", "NC"))}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    opts = dict(num_warps=warps, num_stages=stages)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    k = triton.compile(src, target=TARGET, options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([CUOBJ, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJ, "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    r, st = int(m.group(1)), int(m.group(2))
    occ = min(65536 // (((r + 7) // 8) * 8 * 32 * warps), 228 * 1024 // max(k.metadata.shared, 1), 64 // warps)
    return (f"regs {r} stack {st} smem {k.metadata.shared} hgmma {sass.count('HGMMA')} hmma {sass.count('HMMA')}"
            f" -> {occ} progs/SM")


def dx(N, warps=4, stages=None, maxnreg=None, fold=None, hf=True):
    stages = stages or (1 if N >= 128 else 2)
    fold = (N >= 128) if fold is None else fold
    const = dict(CS=256, BM=64, BP=64, BN=N, HAS_D=True, D_PER_P=False, HAS_SEQ=False, USE_CB=False,
                 CB_T=True, FOLD=fold, HEADS_FASTEST=hf, DOT_PREC="tf32", DT=tl.bfloat16)
    return compile_(K._bwd_dx_kernel, const, warps, stages, maxnreg)


if __name__ == "__main__":
    for args in [dict(N=64, maxnreg=168), dict(N=128)] + [eval(a) for a in sys.argv[1:]]:
        print("dx", args, dx(**args), flush=True)


def bc(N, warps=None, stages=None, maxnreg=-1, do_dc=True):
    warps = warps or (8 if N >= 128 else 4)
    stages = stages or (1 if N >= 128 else 2)
    maxnreg = 128 if maxnreg == -1 else maxnreg
    const = dict(CS=256, BM=64, BP=64, BN=N, DO_DC=do_dc, HAS_SEQ=False, DOT_PREC="tf32", DT=tl.bfloat16)
    return compile_(K._bwd_bc_kernel, const, warps, stages, maxnreg)

def state(N, BK=64, BN=64, BP=64, warps=4, stages=2):
    const = dict(CS=256, BK=BK, BP=BP, BN=BN, HAS_DFINAL=True, HAS_SEQ=False, MODE=0, DCL_ROWS=False,
                 DOT_PREC="tf32", DT=tl.bfloat16)
    return compile_(K._bwd_state_kernel, const, warps, stages)


def state_variants():
    for args in [dict(N=64), dict(N=128), dict(N=64, BK=256), dict(N=128, BK=256), dict(N=128, BN=128)]:
        print("state", args, state(**args), flush=True)
    print("dx", dict(N=128, stages=2), dx(N=128, stages=2), flush=True)
    print("dx", dict(N=64, stages=3, maxnreg=168), dx(N=64, stages=3, maxnreg=168), flush=True)


def dcb(maxnreg=None, warps=4, stages=2):
    const = dict(CS=256, BM=64, BP=64, BN=128, HAS_SEQ=False, STORE_CBT=True, DOT_PREC="tf32", DT=tl.bfloat16)
    return compile_(K._bwd_dcb_kernel, const, warps, stages, maxnreg)

