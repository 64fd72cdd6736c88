# per-kernel device time (profiler) of f+b per variant, each twice in order; argv: json of {"dstate,seqlen": [variants]}
import sys, math, json, os
sys.path.insert(0, "benchmarks")
import torch
from torch.profiler import ProfilerActivity, profile
import bench_ssd
from timing import kernel_intervals, union_us
from lit_mamba2.kernels import ssd as kernels
base = dict(kernels.CONFIG)
CASES = json.loads(open(sys.argv[1]).read())
REPS = int(os.environ.get("REPS", "2"))
out = []
short = lambda k: k.replace("_kernel", "").replace("_bwd_", "b").replace("_fwd_", "f").lstrip("_")
for key, variants in CASES.items():
    n, L = map(int, key.split(","))
    inp = bench_ssd.make_inputs(65536 // L, L, 32, 64, 1, n)
    gy = torch.randn_like(inp["x"])
    leaves = {k: v.detach().requires_grad_() for k, v in inp.items()}
    def fb():
        y = kernels.ssd(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 256, leaves["D"], None,
                        leaves["dt_bias"], None, None, True, (0.0, math.inf), False)
        torch.autograd.grad(y, list(leaves.values()), gy)
    for v in variants * REPS:
        kernels.CONFIG.clear(); kernels.CONFIG.update({**base, **v})
        try:
            fb(); torch.cuda.synchronize()
        except Exception as e:
            print(f"dstate {n} L {L} {v}: failed {e!r}"[:300], flush=True); continue
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fb()
            torch.cuda.synchronize()
        ev = [e for e in prof.key_averages() if e.device_time_total > 0]
        tot = sum(e.device_time_total for e in ev) / 5e3
        st = {short(e.key): round(e.device_time_total / 5e3, 3) for e in sorted(ev, key=lambda e: -e.device_time_total)
              if e.device_time_total / 5e3 >= 0.01}
        busy = union_us(kernel_intervals(prof)) / 5e3
        print(f"dstate {n} L {L} {v or 'default'}: f+b sum {tot:.3f} busy {busy:.3f} ms  {st}", flush=True)
        out.append(dict(dstate=n, seqlen=L, variant=v, fb_kernels=tot, fb_busy=busy, kernels=st))
    kernels.CONFIG.clear(); kernels.CONFIG.update(base)
    del inp, leaves, gy
    torch.cuda.empty_cache()
json.dump(out, open(os.environ["OUT"] + "/probe_" + os.path.basename(sys.argv[1]), "w"), indent=1)
