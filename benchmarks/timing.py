"""The two timers every benchmark here uses, so that their numbers mean the same thing.

- `device_ms`: the summed device time of every kernel (and memset / copy) the CUDA profiler sees over n calls, per
  call. The host's launch overhead drops out; this is what a training loop pays when its host runs ahead of the GPU.
- `time_ms`: wall time per call between CUDA events over groups of back-to-back calls, each group queued behind a
  GPU sleep so that the host starts calls ahead; the median of the group means.

Session 6 (notes/ssd_kernels.md, run 13) replaced `triton.testing.do_bench` where these are used. For one
forward+backward configuration, do_bench's per-call medians flipped between two levels ~0.4 ms apart within one
run. Groups of 2 calls without the head start read 0.2-0.4 ms over the kernels, because the host's launch of the
first call was exposed. Every SSD input is far larger than L2, so back-to-back calls do not run from cache.
"""

import time

import torch


def device_ms(fn, n: int = 5) -> float:
    """Device time per call in ms (fn is called once before, to compile and warm up)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    total = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
                for e in prof.key_averages())
    return total / 1e3 / n


def time_ms(fn, warmup: float = 25, rep: float = 100, groups: int = 5) -> float:
    """Mean wall time per call in ms: about `warmup` ms of calls, then `groups` groups of about rep / groups ms
    (at least 5 calls each), each started behind a ~1 ms GPU sleep; the median of the group means."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    est = max((time.perf_counter() - t0) * 1e3 / 3, 1e-3)
    for _ in range(max(1, int(warmup / est))):
        fn()
    n = max(5, int(rep / groups / est))
    means = []
    for _ in range(groups):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2e6))  # ~1 ms at H100 clocks: time for the host to queue the first calls
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        means.append(start.elapsed_time(end) / n)
    return sorted(means)[groups // 2]
