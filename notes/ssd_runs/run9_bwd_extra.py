"""Run 9 (backward helper bwd4) device-side extras, beside benchmarks/check_ssd_gpu.py and bench_ssd.py --sweep:

    python run9_bwd_extra.py profile   # reverse state pass kernels' device time: fix-up / second walk / one walk
    python run9_bwd_extra.py det       # batch-1 64K errors and bitwise determinism where the two-level pass runs

`profile`: forward+backward five times under torch.profiler per (dstate, seqlen, variant); prints the time per call
of the reverse state pass's kernels (walk, scan or combine, fix-up) and of the whole backward's kernels.
(a record of run 9's device call, not part of the package; CONFIG bwd_state_fix, the switch back to the second walk,
was removed after the call)"""
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = [{}, {"bwd_state_fix": False}, {"bwd_state_segments": 1}]


def profile(out):
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    from bench_ssd import TOKENS, make_inputs
    from lit_mamba2.kernels import ssd as K

    base = dict(K.CONFIG)
    rows = []
    for n in (64, 128):
        for L in (16384, 32768, 65536):
            inp = make_inputs(TOKENS // L, L, 32, 64, 1, n)
            leaves = {k: v.detach().requires_grad_() for k, v in inp.items()}
            gy = torch.randn_like(inp["x"])
            for var in VARIANTS:
                K.CONFIG.clear()
                K.CONFIG.update({**base, **var})

                def fb():
                    y = K.ssd(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 256, leaves["D"],
                              None, leaves["dt_bias"], None, None, True, (0.0, math.inf), False)
                    torch.autograd.grad(y, list(leaves.values()), gy)

                fb()
                torch.cuda.synchronize()
                with prof_ctx(activities=[ProfilerActivity.CUDA]) as p:
                    for _ in range(5):
                        fb()
                    torch.cuda.synchronize()
                ks = {e.key: e.device_time_total / 5e3 for e in p.key_averages() if e.device_time_total > 0}
                state = {k: v for k, v in ks.items() if k.startswith(("_bwd_state", "_bwd_seg", "_bwd_fix"))}
                bwd = sum(v for k, v in ks.items() if k.startswith("_bwd"))
                nseg, seg_len = K._bwd_state_segments(TOKENS // L, 32, 64, n, L // 256)
                row = dict(dstate=n, seqlen=L, variant=var, nseg=nseg, seg_len=seg_len,
                           state_pass=sum(state.values()), kernels=state, bwd_kernels=bwd)
                rows.append(row)
                print(f"profile dstate {n} seqlen {L} {var or 'default'} (segments {nseg} x {seg_len}): state pass "
                      f"{row['state_pass']:.3f} ms " + " ".join(f"{k} {v:.3f}" for k, v in state.items())
                      + f" | bwd kernels {bwd:.3f} ms", flush=True)
            del inp, leaves, gy
            torch.cuda.empty_cache()
    K.CONFIG.clear()
    K.CONFIG.update(base)
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))


def det():
    import check_ssd_gpu as C

    # the two-level pass with the fix-up (the default) against the reference at batch 1 × 64K: documents, initial
    # states, dfinal (the check's cases cover it at 16K / 64K without documents at dstate 64)
    for name, shape, kw in [("b1 L65536 h32 n128 docs+init (fp32 ref)", (1, 65536, 32, 64, 1, 128),
                             dict(docs=3, init=True)),
                            ("b1 L65536 h32 n64 docs+init+z (fp32 ref)", (1, 65536, 32, 64, 1, 64),
                             dict(docs=5, init=True, z=True))]:
        r = C.compare(name, 256, shape, ref_dtype=torch.float32, **kw)
        print(f"check {name}: {'OK' if r['ok'] else 'FAIL'} " + " ".join(f"{k} {v:.1e}" for k, v in r["errs"].items()),
              flush=True)
    for shape in [(1, 65536, 32, 64, 1, 128), (1, 65536, 32, 64, 1, 64), (2, 32768, 32, 64, 1, 128)]:
        r = C.deterministic(shape=shape)
        print(f"deterministic {shape}: {'OK' if r['ok'] else 'FAIL'}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "profile":
        profile(sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        det()
