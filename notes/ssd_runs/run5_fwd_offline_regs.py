"""Offline sm_90 compile of the forward kernels (registers, stack/spills, shared memory) for launch variants, with no
GPU: Triton 3.6 (the device's version) installed beside the project's (`pip install --no-deps --target /tmp/t36
triton==3.6.0`), kernels compiled through ASTSource with the divisibility hints the GPU launch would specialise on,
and the cubin's resource usage read by the cuobjdump Triton ships. Run 5 used it to pick the variants worth device
time; the counts matched the GPU's (LIT_MAMBA2_KERNEL_STATS=1) exactly.

    TRITON_CACHE_DIR=/tmp/t36cache PYTHONPATH=/tmp/t36 python run5_fwd_offline_regs.py '[{"BN": 128, "BK": 32}]'
    TRITON_CACHE_DIR=/tmp/t36cache PYTHONPATH=/tmp/t36 python -c "import run5_fwd_offline_regs as r; r.state_variants()"

(a record of how run 5's register numbers were obtained, not part of the package; expects the worktree at
/work/wt-fwd)"""
import sys, itertools, json, re
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, "/work/wt-fwd")
from lit_mamba2.kernels import ssd as K

TARGET = GPUTarget("cuda", 90, 32)

def compile_out(BN, BM=64, BK=64, HPP=1, warps=4, stages=1, fold=True, use_cb=True, v5=False, maxnreg=None):
    fn = K._fwd_out_v5_kernel if v5 else K._fwd_out_kernel
    names = list(inspect_args(fn))
    ptrs = ["x_ptr", "B_ptr", "C_ptr", "D_ptr", "z_ptr", "seq_ptr", "dtp_ptr", "cum_ptr", "states_ptr", "cb_ptr",
            "out_ptr", "ypre_ptr"]
    dtypes = dict(x_ptr="*bf16", B_ptr="*bf16", C_ptr="*bf16", D_ptr="*fp32", z_ptr="*bf16", seq_ptr="*i32",
                  dtp_ptr="*fp32", cum_ptr="*fp32", states_ptr="*bf16", cb_ptr="*fp32", out_ptr="*bf16",
                  ypre_ptr="*bf16")
    sig = {}
    for n in names:
        sig[n] = dtypes.get(n, "i32")
    const = dict(CS=256, BM=BM, BP=64, BN=BN, HAS_D=True, D_PER_P=False, HAS_Z=False, HAS_SEQ=False,
                 USE_CB=use_cb, FOLD=fold, DOT_PREC="tf32", DT=tl.bfloat16)
    if not v5:
        const.update(BK=BK, HPP=HPP)
    else:
        const.update(BK=BK)
    for k in const:
        sig[k] = "constexpr"
    const["G"] = 1
    sig["G"] = "constexpr"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in const and (sig[n].startswith("*") or n in ("L", "H", "P", "N", "NC"))}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    opts = dict(num_warps=warps, num_stages=stages)
    if maxnreg:
        opts["maxnreg"] = maxnreg
    k = triton.compile(src, target=TARGET, options=opts)
    import subprocess, tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run(["" + __import__("os").path.dirname(triton.__file__) + "/backends/nvidia/bin/cuobjdump",
                          "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)", out, re.S)
    r, st = int(m.group(1)), int(m.group(2)); W = opts["num_warps"]; occ = min(65536 // (((r + 7) // 8) * 8 * 32 * W), 228 * 1024 // max(k.metadata.shared, 1), 64 // W); return f"regs {r} stack {st} smem {k.metadata.shared} -> {occ} progs/SM ({occ * W} warps)"

def inspect_args(fn):
    return fn.arg_names

if __name__ == "__main__":
    for cfg in json.loads(sys.argv[1]):
        try:
            print(cfg, compile_out(**cfg), flush=True)
        except Exception as e:
            print(cfg, "FAILED", repr(e)[:3000], flush=True)


def compile_generic(fn, dtypes, const, ints_div16, warps=4, stages=1, one=()):
    names = list(fn.arg_names)
    sig = {n: dtypes.get(n, "i32") for n in names}
    const = dict(const)
    for n in one:
        const[n] = 1
    for k in const:
        sig[k] = "constexpr"
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in const and (sig[n].startswith("*") or n in ints_div16)}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    opts = dict(num_warps=warps, num_stages=stages)
    k = triton.compile(src, target=TARGET, options=opts)
    import subprocess, tempfile, os
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    out = subprocess.run([os.path.dirname(triton.__file__) + "/backends/nvidia/bin/cuobjdump", "-res-usage", f.name],
                         capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"{fn.__name__} regs {m.group(1)} stack {m.group(2)} smem {k.metadata.shared}"


def state_variants():
    d = dict(x_ptr="*bf16", B_ptr="*bf16", init_ptr="*fp32", seq_ptr="*i32", dtp_ptr="*fp32", cum_ptr="*fp32",
             states_ptr="*bf16", final_ptr="*fp32", seg_ptr="*fp32", segdec_ptr="*fp32")
    for BP, BN, mode, stages in [(64, 64, 0, 1), (64, 64, 1, 1), (64, 64, 2, 1), (16, 64, 0, 1), (64, 64, 0, 2),
                                 (64, 32, 0, 2)]:
        c = dict(CS=256, BK=64, BP=BP, BN=BN, HAS_INIT=False, HAS_SEQ=False, MODE=mode, DOT_PREC="tf32",
                 DT=tl.bfloat16)
        print(BP, BN, mode, stages, compile_generic(K._fwd_state_kernel, d, c, ("L", "H", "P", "N", "NC"),
                                                    stages=stages, one=("G",)), flush=True)
    c = dict(CS=256, BK=64, BP=64, BN=64, HAS_INIT=True, HAS_SEQ=True, MODE=2, DOT_PREC="tf32", DT=tl.bfloat16)
    print("seq+init mode 2", compile_generic(K._fwd_state_kernel, d, c, ("L", "H", "P", "N", "NC")), flush=True)
    print(compile_generic(K._fwd_seg_kernel, dict(init_ptr="*fp32", seg_ptr="*fp32", segdec_ptr="*fp32",
                                                  final_ptr="*fp32"), dict(BLOCK=1024, HAS_INIT=True), ("PN",)))
    d2 = dict(x_ptr="*bf16", B_ptr="*bf16", C_ptr="*bf16", D_ptr="*fp32", z_ptr="*bf16", seq_ptr="*i32",
              dtp_ptr="*fp32", cum_ptr="*fp32", states_ptr="*bf16", cb_ptr="*fp32", out_ptr="*bf16", ypre_ptr="*bf16")
    c = dict(CS=256, BM=64, BK=32, BP=64, BN=128, HPP=2, HAS_D=True, D_PER_P=True, HAS_Z=True, HAS_SEQ=True,
             USE_CB=False, FOLD=False, DOT_PREC="tf32", DT=tl.bfloat16)
    print("out all options", compile_generic(K._fwd_out_kernel, d2, c, ("L", "H", "P", "N", "NC"), stages=2))
    c = dict(CS=64, BM=64, BK=64, BP=128, BN=256, HPP=1, HAS_D=True, D_PER_P=False, HAS_Z=False, HAS_SEQ=False,
             USE_CB=True, FOLD=True, DOT_PREC="tf32", DT=tl.float16)
    print("out p128 n256", compile_generic(K._fwd_out_kernel, d2, c, ("L", "H", "P", "N", "NC"), stages=1))


def state_variants2(items):
    d = dict(x_ptr="*bf16", B_ptr="*bf16", init_ptr="*fp32", seq_ptr="*i32", dtp_ptr="*fp32", cum_ptr="*fp32",
             states_ptr="*bf16", final_ptr="*fp32", seg_ptr="*fp32", segdec_ptr="*fp32")
    for BP, BN, stages in items:
        c = dict(CS=256, BK=64, BP=BP, BN=BN, HAS_INIT=False, HAS_SEQ=False, MODE=0, DOT_PREC="tf32",
                 DT=tl.bfloat16)
        r = compile_generic(K._fwd_state_kernel, d, c, ("L", "H", "P", "N", "NC"), stages=stages, one=("G",))
        print(BP, BN, stages, r, flush=True)


def state_variants3(items):
    d = dict(x_ptr="*bf16", B_ptr="*bf16", init_ptr="*fp32", seq_ptr="*i32", dtp_ptr="*fp32", cum_ptr="*fp32",
             states_ptr="*bf16", final_ptr="*fp32", seg_ptr="*fp32", segdec_ptr="*fp32")
    for BP, BN, BK, stages in items:
        c = dict(CS=256, BK=BK, BP=BP, BN=BN, HAS_INIT=False, HAS_SEQ=False, MODE=0, DOT_PREC="tf32",
                 DT=tl.bfloat16)
        r = compile_generic(K._fwd_state_kernel, d, c, ("L", "H", "P", "N", "NC"), stages=stages, one=("G",))
        print(BP, BN, BK, stages, r, flush=True)
