"""The two timers every benchmark here uses, so that their numbers mean the same thing.

- `device_ms`: the GPU's busy time over n calls, per call: the union of the device intervals of every kernel (and
  memset / copy) the CUDA profiler sees. The host's launch overhead drops out; this is what a training loop pays
  when its host runs ahead of the GPU. For kernels that run one after another it is their summed device time (what
  it was until session 7); kernels on two streams that overlap count once.
- `time_ms`: wall time per call between CUDA events over groups of back-to-back calls, each group queued behind a
  GPU sleep so that the host starts calls ahead; the median of the group means.

Session 6 (notes/ssd_kernels.md, "Timing") replaced `triton.testing.do_bench` where these are used. For one
forward+backward configuration, do_bench's per-call medians flipped between two levels ~0.4 ms apart within one
run. Groups of 2 calls without the head start read 0.2-0.4 ms over the kernels, because the host's launch of the
first call was exposed. Every SSD input is far larger than L2, so back-to-back calls do not run from cache.
"""

import time

import torch


def kernel_intervals(prof):
    """(start, end) in µs of every device-side event of a finished torch.profiler run."""
    dev = torch.autograd.DeviceType.CUDA
    return [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == dev]


def union_us(intervals) -> float:
    """Total length of the union of (start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def device_ms(fn, n: int = 5) -> float:
    """GPU busy time per call in ms over n calls (fn is called once before, to compile and warm up)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return union_us(kernel_intervals(prof)) / 1e3 / n


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
