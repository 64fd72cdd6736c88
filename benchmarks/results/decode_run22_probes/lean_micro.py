"""Probe for the next design: a read-only window step whose per-slot work is scalars and one x vector (the slots'
B . C precomputed per row, here given), against a pure read of the states. 370m / 130m shapes, batch 64, 48
layers' states (L2 holds none). Timing only (no flush step)."""
import torch, triton, triton.language as tl

@triton.jit
def _lean(s_ptr, x_ptr, dt_ptr, C_ptr, cb_ptr, wx_ptr, wdt_ptr, slot_ptr, y_ptr, nheads,
          HEADDIM: tl.constexpr, N: tl.constexpr, BLOCK_P: tl.constexpr, W: tl.constexpr):
    pid = tl.program_id(0)
    pbs: tl.constexpr = HEADDIM // BLOCK_P
    b = pid // (nheads * pbs)
    h = (pid // pbs) % nheads
    pb = pid % pbs
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, N)
    st = tl.load(s_ptr + ((b * nheads + h) * HEADDIM + offs_p[:, None]) * N + offs_n[None, :],
                 eviction_policy="evict_first")
    k = tl.load(slot_ptr) % W
    A = -0.5
    C = tl.load(C_ptr + b * N + offs_n).to(tl.float32)
    x = tl.load(x_ptr + (b * nheads + h) * HEADDIM + offs_p).to(tl.float32)
    dt = tl.load(dt_ptr + b * nheads + h)
    log = A * dt
    yw = x * dt * tl.load(cb_ptr + b * W + W - 1)  # this token's B . C in the last slot of cb
    for i in tl.static_range(W - 1):
        s = W - 2 - i
        dt_s = tl.where(s < k, tl.load(wdt_ptr + (b * W + s) * nheads + h), 0.0)
        x_s = tl.load(wx_ptr + ((b * W + s) * nheads + h) * HEADDIM + offs_p, mask=offs_p * 0 + s < k,
                      other=0.0).to(tl.float32)
        yw += x_s * (dt_s * tl.exp(log) * tl.load(cb_ptr + b * W + s))
        log += A * dt_s
    y = tl.exp(log) * tl.sum(st.to(tl.float32) * C[None, :], axis=1) + yw
    tl.store(y_ptr + (b * nheads + h) * HEADDIM + offs_p, y)
    tl.store(wx_ptr + ((b * W + k) * nheads + h) * HEADDIM + offs_p, x.to(wx_ptr.dtype.element_ty))

dev = "cuda"
for name, h in (("130m", 24), ("370m", 32)):
    b, p, n, L = 64, 64, 128, 48
    bf = dict(device=dev, dtype=torch.bfloat16)
    states = [torch.randn(b, h, p, n, **bf) for _ in range(L)]
    x, C = torch.randn(b, h, p, **bf), torch.randn(b, n, **bf)
    dt = torch.rand(b, h, device=dev)
    slot = torch.zeros((), device=dev, dtype=torch.long)
    y = torch.empty(b, h, p, device=dev)
    for W, k, block_p, warps in [(4, 0, 32, 4), (4, 2, 32, 4), (8, 0, 32, 4), (8, 4, 32, 4), (8, 6, 32, 4),
                                 (16, 8, 32, 4), (8, 4, 64, 4), (8, 4, 16, 2), (8, 4, 32, 2)]:
        wins = [(torch.randn(b, W, h, p, **bf), torch.rand(b, W, h, device=dev), torch.randn(b, W, device=dev))
                for _ in range(L)]
        slot.fill_(k)
        grid = (b * h * (p // block_p),)
        def step():
            for s, (wx, wdt, cb) in zip(states, wins):
                _lean[grid](s, x, dt, C, cb, wx, wdt, slot, y, h, p, n, block_p, W, num_warps=warps)
        step(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        g.replay(); torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(5):
            e0.record()
            for _ in range(10): g.replay()
            e1.record(); torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) / 10 / L * 1e3)
        us = sorted(ts)[2]
        print(f"{name} lean window W={W:<2} k={k:<2} tile {block_p}x{n} warps {warps}: {us:6.2f} us/layer, "
              f"state read at {states[0].numel() * 2 / us / 1e3:5.0f} GB/s", flush=True)
        del wins
    del states
    torch.cuda.empty_cache()
