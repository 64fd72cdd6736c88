"""How fast can a kernel stream the batch-64 SSM states when it only reads them (y = h C per row), against reading
and writing them, by tile size, warps and in-program pipelining? 48 layers' states, so L2 holds none."""
import torch, triton, triton.language as tl

@triton.jit
def _read_kernel(s_ptr, c_ptr, y_ptr, n_tiles_per_prog, P: tl.constexpr, N: tl.constexpr, SUB: tl.constexpr,
                 STAGES: tl.constexpr, WRITE: tl.constexpr):
    # program: n_tiles_per_prog consecutive (SUB x N) sub-tiles
    pid = tl.program_id(0)
    offs_p = tl.arange(0, SUB)
    offs_n = tl.arange(0, N)
    c = tl.load(c_ptr + offs_n).to(tl.float32)
    base = pid * n_tiles_per_prog * SUB * N
    for i in tl.range(0, n_tiles_per_prog, num_stages=STAGES):
        ptrs = s_ptr + base + i * SUB * N + offs_p[:, None] * N + offs_n[None, :]
        st = tl.load(ptrs, eviction_policy="evict_first").to(tl.float32)
        y = tl.sum(st * c[None, :], axis=1)
        tl.store(y_ptr + pid * n_tiles_per_prog * SUB + i * SUB + offs_p, y)
        if WRITE:
            tl.store(ptrs, (st * 0.99).to(s_ptr.dtype.element_ty), eviction_policy="evict_first")

dev = "cuda"
b, h, p, n, L = 64, 32, 64, 128, 48
states = [torch.randn(b * h * p, n, device=dev, dtype=torch.bfloat16) for _ in range(L)]
c = torch.randn(n, device=dev)
y = torch.empty(b * h * p, device=dev)
def run(sub, per_prog, stages, warps, write):
    rows = b * h * p
    grid = (rows // (sub * per_prog),)
    def step():
        for s in states:
            _read_kernel[grid](s, c, y, per_prog, p, n, sub, stages, write, num_warps=warps)
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
    nbytes = states[0].numel() * 2
    print(f"sub {sub:3} x {per_prog} per program, stages {stages}, warps {warps}, write {write}: {us:6.2f} us/layer, "
          f"read {nbytes / us / 1e3:5.0f} GB/s, total {nbytes * (1 + write) / us / 1e3:5.0f} GB/s", flush=True)
for write in (0, 1):
    run(32, 1, 1, 4, write)
run(64, 1, 1, 4, 0)
run(64, 1, 1, 8, 0)
run(128, 1, 1, 8, 0)
run(16, 1, 1, 2, 0)
run(16, 1, 1, 4, 0)
for sub, per, st, w in [(32, 2, 2, 4), (32, 4, 3, 4), (32, 8, 3, 4), (32, 8, 4, 4), (16, 8, 4, 4), (64, 4, 3, 8),
                        (32, 16, 4, 4)]:
    run(sub, per, st, w, 0)
