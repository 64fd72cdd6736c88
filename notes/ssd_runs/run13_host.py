# where the host time of one forward+backward goes (session 6): cProfile, sync debug, allocator counters
import sys, math, time, cProfile, pstats, io
sys.path.insert(0, "benchmarks")
import torch
import bench_ssd
from lit_mamba2.kernels import ssd as kernels
for n, L in ((64, 4096), (64, 65536)):
    inp = bench_ssd.make_inputs(65536 // L, L, 32, 64, 1, n)
    gy = torch.randn_like(inp["x"])
    leaves = {k: v.detach().requires_grad_() for k, v in inp.items()}
    def fb():
        y = kernels.ssd(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 256, leaves["D"], None,
                        leaves["dt_bias"], None, None, True, (0.0, math.inf), False)
        torch.autograd.grad(y, list(leaves.values()), gy)
    for _ in range(3):
        fb()
    torch.cuda.synchronize()
    s0 = torch.cuda.memory_stats()
    torch.cuda.set_sync_debug_mode("warn")
    t0 = time.perf_counter()
    for _ in range(10):
        fb()
    t_enq = (time.perf_counter() - t0) / 10
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    t_all = (time.perf_counter() - t0) / 10
    s1 = torch.cuda.memory_stats()
    keys = ["num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams"]
    print(f"dstate {n} L {L}: host enqueue {t_enq*1e3:.3f} ms/call, with sync {t_all*1e3:.3f}; allocator deltas over 10 calls:",
          {k: s1.get(k, 0) - s0.get(k, 0) for k in keys}, flush=True)
    # the host alone, GPU kept far behind by a long sleep so no call waits on the device
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e9))
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(10):
        fb()
    pr.disable()
    t_host = (time.perf_counter() - t0) / 10
    torch.cuda.synchronize()
    print(f"  host per call under cProfile with the GPU asleep: {t_host*1e3:.3f} ms", flush=True)
    st = io.StringIO()
    pstats.Stats(pr, stream=st).sort_stats("tottime").print_stats(22)
    print("\n".join(st.getvalue().splitlines()[:45]), flush=True)
    st = io.StringIO()
    pstats.Stats(pr, stream=st).sort_stats("cumulative").print_stats(25)
    print("\n".join(st.getvalue().splitlines()[:45]), flush=True)
    del inp, leaves, gy
    torch.cuda.empty_cache()
