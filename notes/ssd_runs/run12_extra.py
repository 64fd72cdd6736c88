"""Run 12 (helper fixfold) device-side extra, beside check_ssd_gpu.py and bench_ssd.py --sweep --sweep-set fixfold:

    python run12_extra.py profile OUT.json   # per-kernel device time of the backward, old fix-up pass vs the folds

Forward+backward five times under torch.profiler per (dstate, seqlen, variant); prints per call the time of every
backward kernel (the reverse state pass's walk, scan, fix-up or d cum_last kernel, dx, dCB, dB + dC, dt chain).
(a record of run 12's device call, not part of the package; CONFIG bwd_state_fold / bwd_fold_* and the kernels
they chose were removed after the call: commit 5da6e76 has them)"""
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = [{"bwd_state_fold": False}, {}, {"bwd_fold_dcl": "dc"}, {"bwd_fold_dots": True}]
POINTS = [(64, 65536), (128, 65536), (64, 16384)]


def profile(out):
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    from bench_ssd import TOKENS, make_inputs
    from lit_mamba2.kernels import ssd as K

    base = dict(K.CONFIG)
    rows = []
    for n, L in POINTS:
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
            bwd = {k: v for k, v in ks.items() if k.startswith("_bwd")}
            row = dict(dstate=n, seqlen=L, variant=var, kernels=bwd, bwd_kernels=sum(bwd.values()),
                       all_kernels=sum(ks.values()))
            rows.append(row)
            print(f"profile dstate {n} seqlen {L} {var or 'default'}: bwd kernels {row['bwd_kernels']:.3f} ms, all "
                  f"{row['all_kernels']:.3f} | " + " ".join(f"{k} {v:.3f}" for k, v in sorted(bwd.items())),
                  flush=True)
        del inp, leaves, gy
        torch.cuda.empty_cache()
    K.CONFIG.clear()
    K.CONFIG.update(base)
    Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "profile":
        profile(sys.argv[2])
