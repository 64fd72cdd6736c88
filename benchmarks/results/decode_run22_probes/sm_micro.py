"""Probe for a persistent design: how many SMs does the batch-64 state stream (read and write, 370m layer) need to
run at the copy rate? Programs on SMs >= S exit at once; the others walk the tiles (Triton-pipelined loads)."""
import torch, triton, triton.language as tl

@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)

@triton.jit
def _walk(s_ptr, c_ptr, y_ptr, n_tiles, slots_ptr, S, N: tl.constexpr, SUB: tl.constexpr, STAGES: tl.constexpr):
    if _smid() >= S:
        return
    # a dynamic work queue: each program takes the next tile index from a counter
    offs_p = tl.arange(0, SUB)
    offs_n = tl.arange(0, N)
    c = tl.load(c_ptr + offs_n).to(tl.float32)
    t = tl.atomic_add(slots_ptr, 1)
    while t < n_tiles:
        ptrs = s_ptr + t * SUB * N + offs_p[:, None] * N + offs_n[None, :]
        st = tl.load(ptrs, eviction_policy="evict_first").to(tl.float32)
        nxt = tl.atomic_add(slots_ptr, 1)
        tl.store(y_ptr + t * SUB + offs_p, tl.sum(st * c[None, :], axis=1))
        tl.store(ptrs, (st * 0.99).to(s_ptr.dtype.element_ty), eviction_policy="evict_first")
        t = nxt

dev = "cuda"
b, h, p, n, L = 64, 32, 64, 128, 48
states = [torch.randn(b * h * p, n, device=dev, dtype=torch.bfloat16) for _ in range(L)]
c = torch.randn(n, device=dev)
y = torch.empty(b * h * p, device=dev)
n_sm = torch.cuda.get_device_properties(0).multi_processor_count
counters = torch.zeros(L, dtype=torch.int32, device=dev)
for S in (n_sm, 120, 108, 96, 84, 72, 60):
    for per_sm, sub, warps in ((4, 32, 4), (8, 32, 4), (8, 16, 2), (16, 16, 2)):
        n_tiles = b * h * p // sub
        def step():
            counters.zero_()
            for i, s in enumerate(states):
                _walk[(n_sm * per_sm,)](s, c, y, n_tiles, counters[i:], S, n, sub, 1, num_warps=warps)
        step(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        g.replay(); torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(5):
            e0.record()
            for _ in range(5): g.replay()
            e1.record(); torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) / 5 / L * 1e3)
        us = sorted(ts)[2]
        print(f"SMs {S:3}, {per_sm:2} programs per SM, tile {sub}x{n}, warps {warps}: {us:6.2f} us/layer, "
              f"{states[0].numel() * 4 / us / 1e3:5.0f} GB/s read + written", flush=True)
