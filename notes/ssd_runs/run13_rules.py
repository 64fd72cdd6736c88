# state-pass rules at 128-position chunks: device time (profiler kernel sum) of f+b per variant (session 6)
import sys, math, json
sys.path.insert(0, "benchmarks")
import torch
from torch.profiler import ProfilerActivity, profile
import bench_ssd
from lit_mamba2.kernels import ssd as kernels
base = dict(kernels.CONFIG)
SETS = {
    "call7": {
    (64, 16384): [{}, {"bwd_state_seg_target": 256}, {"bwd_state_seg_below": 128}, {"state_seg_min_nc": 128}],
    (64, 32768): [{}, {"bwd_state_seg_target": 256}, {"state_seg_min_nc": 512}, {"bwd_state_seg_target": 1024}],
    (64, 65536): [{}, {"bwd_state_seg_target": 256}, {"bwd_state_seg_target": 1024}],
    (128, 32768): [{}, {"bwd_state_seg_below": 512}, {"state_seg_min_nc": 512}, {"bwd_state_seg_below": 512, "state_seg_min_nc": 512},
                   {"fwd_state_min_programs": 128}],
    (128, 65536): [{}, {"bwd_state_seg_target": 256}, {"bwd_state_seg_target": 1024}, {"fwd_state_min_programs": 128}],
},
    "call9": {
    (64, 16384): [{}, {"state_seg_min_nc": 128, "state_seg_programs": 256}, {"bwd_state_warps": 8}],
    (64, 32768): [{}, {"state_seg_programs": 256}, {"state_seg_programs": 512}, {"bwd_state_warps": 8}],
    (64, 65536): [{}, {"state_seg_programs": 256}, {"state_seg_programs": 512}],
    (128, 32768): [{}, {"state_seg_programs": 256}, {"bwd_state_seg_below": 512},
                   {"bwd_state_seg_below": 512, "state_seg_programs": 256}, {"bwd_state_warps": 8}],
    (128, 65536): [{}, {"state_seg_programs": 256}, {"state_seg_programs": 512}, {"bwd_state_warps": 8}],
},
    "call13": {
    (64, 16384): [{}, {"dx_heads_fastest": True}, {"dx_stages": 3}, {"dcb_stages": 3}, {"out_stages": 2}],
    (64, 32768): [{}, {"dx_heads_fastest": True}, {"dx_stages": 3}, {"dcb_stages": 3}, {"out_stages": 2}],
    (128, 32768): [{}, {"dx_heads_fastest": True}, {"dcb_stages": 3}, {"out_stages": 2}],
    (128, 65536): [{}, {"dx_heads_fastest": False}, {"dcb_stages": 3}, {"out_stages": 2}],
},
}
WHICH = sys.argv[1] if len(sys.argv) > 1 else "call13"
CASES = SETS[WHICH]
# call 13 listed the per-kernel times of dx / dCB / out instead of the state passes
STATE_KEYS = ("dx", "dcb", "out") if WHICH == "call13" else ("state", "fix", "seg")
out = []
for (n, L), variants in CASES.items():
    inp = bench_ssd.make_inputs(65536 // L, L, 32, 64, 1, n)
    gy = torch.randn_like(inp["x"])
    leaves = {k: v.detach().requires_grad_() for k, v in inp.items()}
    def fb():
        y = kernels.ssd(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 256, leaves["D"], None,
                        leaves["dt_bias"], None, None, True, (0.0, math.inf), False)
        torch.autograd.grad(y, list(leaves.values()), gy)
    for i, v in enumerate(variants * 2):  # each variant twice, in order
        kernels.CONFIG.clear(); kernels.CONFIG.update({**base, **v})
        fb(); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fb()
            torch.cuda.synchronize()
        ev = prof.key_averages()
        tot = sum(e.device_time_total for e in ev) / 5e3
        st = {e.key: round(e.device_time_total / 5e3, 3) for e in ev if any(k in e.key for k in STATE_KEYS)}
        print(f"dstate {n} L {L} {v or 'default'}: f+b kernels {tot:.3f} ms  {st}", flush=True)
        out.append(dict(dstate=n, seqlen=L, variant=v, fb_kernels=tot, state=st))
    kernels.CONFIG.clear(); kernels.CONFIG.update(base)
    del inp, leaves, gy
    torch.cuda.empty_cache()
import os
json.dump(out, open(os.environ["OUT"] + "/rules.json", "w"), indent=1)  # run13_<set>_rules.json
