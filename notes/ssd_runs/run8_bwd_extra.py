"""Run 8 (backward helper) device-side extras, beside benchmarks/check_ssd_gpu.py and bench_ssd.py --sweep:

    python run8_bwd_extra.py check '{"dx_bm": 128, "bc_bm": 128}' ...   # GPU correctness of sweep variants
    python run8_bwd_extra.py old OLD_SSD_PY [DSTATE ...]                  # f+b of the previous kernels file

`check`: each CONFIG variant against the float64 reference at real size (check_ssd_gpu.compare: dstate 128 plain,
dstate 64 with documents, initial states, z, D per headdim and ngroups 4) plus bitwise determinism, so a variant the
sweep picks is known right on the GPU. `old`: the run-7 kernels file loaded by path in its own process (its custom
ops carry the same names), timed forward+backward exactly as the sweep times ours, for a same-device before/after.
(a record of run 8's device call, not part of the package)"""
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def check(variants):
    import check_ssd_gpu as C
    from lit_mamba2.kernels import ssd as K

    base = dict(K.CONFIG)
    for var in variants:
        K.CONFIG.clear()
        K.CONFIG.update({**base, **var})
        for name, cs, shape, kw in [("b8 L2048 h32 n128 plain", 256, (8, 2048, 32, 64, 1, 128), {}),
                                    ("b4 L2048 h32 g4 n64 docs+init+z+D(h,p)", 256, (4, 2048, 32, 64, 4, 64),
                                     dict(docs=3, init=True, z=True, D2=True))]:
            r = C.compare(name, cs, shape, **kw)
            print(f"check {var}: {name}: {'OK' if r['ok'] else 'FAIL'} "
                  + " ".join(f"{k} {v:.1e}" for k, v in r["errs"].items()), flush=True)
        r = C.deterministic()
        print(f"check {var}: deterministic {'OK' if r['ok'] else 'FAIL'}", flush=True)
    K.CONFIG.clear()
    K.CONFIG.update(base)


def old(path, seqlens=(4096, 16384, 65536), dstates=(64, 128)):
    from bench_ssd import TOKENS, make_inputs

    spec = importlib.util.spec_from_file_location("old_ssd", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for n in dstates:
        for L in seqlens:
            inp = make_inputs(TOKENS // L, L, 32, 64, 1, n)
            gy = torch.randn_like(inp["x"])
            leaves = {k: v.detach().requires_grad_() for k, v in inp.items()}

            def f(t):
                return mod.ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], 256, t["D"], None, t["dt_bias"], None, None,
                               True, (0.0, math.inf), False)

            def fb():
                torch.autograd.grad(f(leaves), list(leaves.values()), gy)

            with torch.no_grad():
                tf = do_bench(lambda: f(inp), warmup=10, rep=40, return_mode="median")
            tfb = do_bench(fb, warmup=10, rep=40, return_mode="median")
            print(f"old (run-7 kernels) dstate {n} seqlen {L}: fwd {tf:.3f} ms, fwd+bwd {tfb:.3f} ms", flush=True)
            del inp, leaves, gy
            torch.cuda.empty_cache()


if __name__ == "__main__":
    if sys.argv[1] == "check":
        check([json.loads(a) for a in sys.argv[2:]])
    else:
        old(sys.argv[2], dstates=tuple(int(a) for a in sys.argv[3:]) or (64, 128))
