"""Offline sm_90 compile (Triton 3.6 installed at /tmp/triton36: pip install --no-deps --target /tmp/triton36 triton==3.6.0) of the dCB kernels: registers, spills, shared memory, SASS counts of the loop over heads (the longest backward branch). Helper bwd5 (v9-bwd); run from anywhere: TRITON_CACHE_DIR=/tmp/t36cache python bwd5_offline_dcb.py (expects the worktree at /work/wt-bwd5)."""
import sys, re, subprocess, tempfile, os, json
sys.path.insert(0, '/tmp/triton36')
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, '/work/wt-bwd5')
from lit_mamba2.kernels import ssd as K
tgt = GPUTarget("cuda", 90, 128)
CUOBJ = os.path.dirname(triton.__file__) + "/backends/nvidia/bin/cuobjdump"
BF = {"x_ptr", "B_ptr", "C_ptr", "dy_ptr", "dcb_ptr", "cbt_ptr"}

def comp(fn, consts, warps=4, stages=2, maxnreg=None, tag=""):
    sig = {}
    for a in fn.arg_names:
        if a in consts: sig[a] = "constexpr"
        elif a.endswith("_ptr"): sig[a] = "*bf16" if a in BF else ("*i32" if a == "seq_ptr" else "*fp32")
        else: sig[a] = "i32"
    names = list(sig)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
             if sig[a] != "constexpr" and (a.endswith("_ptr") or a in ("L", "H", "P", "N"))}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(a),): v for a, v in consts.items()}, attrs=attrs)
    opts = dict(num_warps=warps, num_stages=stages)
    if maxnreg: opts["maxnreg"] = maxnreg
    k = triton.compile(src, target=tgt, options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        r = subprocess.run([CUOBJ, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJ, "-sass", f.name], capture_output=True, text=True).stdout
    open(f"/tmp/bwd5_{tag}.sass", "w").write(sass)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", r)
    ins = [l for l in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", l)]
    # the loop over heads: the longest backward branch
    addr = lambda l: int(re.match(r"\s+/\*([0-9a-f]{4})\*/", l).group(1), 16)
    loops = []
    for l in ins:
        mm = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?.*?(0x[0-9a-f]+)", l)
        if "BRA" in l and mm:
            tgt_a = int(mm.group(1), 16)
            if tgt_a < addr(l): loops.append((addr(l) - tgt_a, tgt_a, addr(l)))
    body = None
    if loops:
        _, a0, a1 = max(loops)
        bl = [l for l in ins if a0 <= addr(l) <= a1]
        body = dict(n=len(bl), mma=sum(("HGMMA" in l or "HMMA" in l) for l in bl), shfl=sum("SHFL" in l for l in bl),
                    bar=sum("BAR" in l for l in bl), mufu=sum("MUFU" in l for l in bl), lds=sum("LDS" in l for l in bl),
                    sts=sum("STS" in l for l in bl), ldg=sum("LDG" in l for l in bl))
    return dict(tag=tag, reg=m and int(m.group(1)), stack=m and int(m.group(2)), shared=k.metadata.shared,
                total=len(ins), loop=body)

for N in (64, 128):
    c = dict(CS=256, BM=64, BP=64, BN=N, HAS_SEQ=False, STORE_CBT=True, DOT_PREC="tf32", DT=tl.bfloat16)
    for name, fn, extra, kw in [("heads_s1_splitdcum", K._bwd_dcb_heads_kernel, dict(DCUM=1), dict(stages=1)),
                                ("heads_s1_tf32dcum", K._bwd_dcb_heads_kernel, dict(DCUM=2), dict(stages=1)),
                                ("dcb_all", K._bwd_dcb_kernel, dict(DIAG_ONLY=False), {}),
                                ("dcb_diag", K._bwd_dcb_kernel, dict(DIAG_ONLY=True), {}),
                                ("heads", K._bwd_dcb_heads_kernel, {}, {}),
                                ("heads_s1_pf", K._bwd_dcb_heads_kernel, dict(PREFETCH=True), dict(stages=1)),
                                ("heads_s1_pf_docs", K._bwd_dcb_heads_kernel, dict(PREFETCH=True, HAS_SEQ=True),
                                 dict(stages=1)),
                                ("heads_s1_docs", K._bwd_dcb_heads_kernel, dict(HAS_SEQ=True), dict(stages=1)),
                                ("heads_s1", K._bwd_dcb_heads_kernel, {}, dict(stages=1)),
                                ("heads_s3", K._bwd_dcb_heads_kernel, {}, dict(stages=3)),
                                ("heads_cap168", K._bwd_dcb_heads_kernel, {}, dict(maxnreg=168, stages=1)),
                                ("heads_w8", K._bwd_dcb_heads_kernel, {}, dict(warps=8, stages=1))]:
        try:
            if fn is K._bwd_dcb_heads_kernel:
                extra = {"PREFETCH": False, "DCUM": 0, "EMUL_BF16": False, **extra}
            print(N, json.dumps(comp(fn, {**c, **extra}, tag=f"{name}_{N}", **kw)), flush=True)
        except Exception as e:
            print(N, name, "failed", repr(e)[:400], flush=True)
