# do_bench medians, time_ms group means and the profiler's kernel sum on one configuration (session 6)
import sys, math, time
sys.path.insert(0, "benchmarks")
import torch
from triton.testing import do_bench
from torch.profiler import ProfilerActivity, profile
import bench_ssd
from lit_mamba2.kernels import ssd as kernels
mamba = bench_ssd.load_mamba(".peers")
for n, L in ((64, 4096), (64, 65536), (128, 16384)):
    inp = bench_ssd.make_inputs(65536 // L, L, 32, 64, 1, n)
    gy = torch.randn_like(inp["x"])
    leaves = {k: v.detach().requires_grad_() for k, v in inp.items()}
    def fb():
        y = kernels.ssd(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 256, leaves["D"], None,
                        leaves["dt_bias"], None, None, True, (0.0, math.inf), False)
        torch.autograd.grad(y, list(leaves.values()), gy)
    def mfb():
        t = leaves
        y = mamba(t["x"], t["dt"], t["A"], t["B"], t["C"], 256, D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True)
        torch.autograd.grad(y, list(leaves.values()), gy)
    for name, f in (("ours", fb), ("mamba", mfb)):
        db, tm = [], []
        for _ in range(3):
            db.append(do_bench(f, warmup=10, rep=100, return_mode="median"))
            tm.append(bench_ssd.time_ms(f, warmup=10, rep=100))
        f(); torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            f()
        host = (time.perf_counter() - t0) / 5 * 1e3
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                f()
            torch.cuda.synchronize()
        ksum = sum(e.device_time_total for e in prof.key_averages()) / 5e3
        print(f"{name} dstate {n} L {L}: do_bench {' '.join(f'{t:.3f}' for t in db)} | time_ms {' '.join(f'{t:.3f}' for t in tm)} | kernels {ksum:.3f} | host enqueue {host:.3f}", flush=True)
