"""Probe: does a state stream confined to S SMs overlap with cuBLAS products on another stream? 48 layers of
370m shapes: stream A streams 32 rows' states (read + write, persistent kernel on SMs < S, 8 programs per SM),
stream B runs in_proj and out_proj for the other 32 rows (cuBLAS), no dependencies between the streams."""
import torch, triton, triton.language as tl
import torch.nn.functional as F

@triton.jit
def _smid():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)

@triton.jit
def _walk(s_ptr, c_ptr, y_ptr, n_tiles, q_ptr, S, N: tl.constexpr, SUB: tl.constexpr):
    if _smid() >= S:
        return
    offs_p = tl.arange(0, SUB)
    offs_n = tl.arange(0, N)
    c = tl.load(c_ptr + offs_n).to(tl.float32)
    t = tl.atomic_add(q_ptr, 1)
    while t < n_tiles:
        ptrs = s_ptr + t * SUB * N + offs_p[:, None] * N + offs_n[None, :]
        st = tl.load(ptrs, eviction_policy="evict_first").to(tl.float32)
        nxt = tl.atomic_add(q_ptr, 1)
        tl.store(y_ptr + t * SUB + offs_p, tl.sum(st * c[None, :], axis=1))
        tl.store(ptrs, (st * 0.99).to(s_ptr.dtype.element_ty), eviction_policy="evict_first")
        t = nxt

dev = "cuda"
L, rows, h, p, n, d = 48, 32, 32, 64, 128, 1024
bf = dict(device=dev, dtype=torch.bfloat16)
states = [torch.randn(rows * h * p, n, **bf) for _ in range(L)]
w_in = [torch.randn(4384, d, **bf) * 0.02 for _ in range(L)]
w_out = [torch.randn(d, 2048, **bf) * 0.02 for _ in range(L)]
xa, ua = torch.randn(rows, d, **bf), torch.randn(rows, 2048, **bf)
c = torch.randn(n, device=dev)
y = torch.empty(rows * h * p, device=dev)
n_sm = torch.cuda.get_device_properties(0).multi_processor_count
q = torch.zeros(L, dtype=torch.int32, device=dev)
sA, sB = torch.cuda.Stream(), torch.cuda.Stream()

def timed(fn):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.graph(g, stream=s):
        fn()
    g.replay(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(5):
        e0.record()
        for _ in range(5): g.replay()
        e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 5 / L * 1e3)
    return sorted(ts)[2]

for S, per_sm in ((n_sm, 8), (108, 8), (96, 8), (84, 8), (72, 8)):
    def state_part():
        q.zero_()
        for i in range(L):
            _walk[(n_sm * per_sm,)](states[i], c, y, rows * h * p // 32, q[i:], S, n, 32, num_warps=4)
    def product_part():
        for i in range(L):
            F.linear(F.linear(xa, w_in[i])[:, :2048], w_out[i])
    def both():
        cur = torch.cuda.current_stream()
        sA.wait_stream(cur); sB.wait_stream(cur)
        with torch.cuda.stream(sA):
            state_part()
        with torch.cuda.stream(sB):
            product_part()
        cur.wait_stream(sA); cur.wait_stream(sB)
    a, b, ab = timed(state_part), timed(product_part), timed(both)
    print(f"state on {S:3} SMs: state {a:5.1f} us/layer, products {b:5.1f}, both on two streams {ab:5.1f} "
          f"(sum {a + b:5.1f}, max {max(a, b):5.1f})", flush=True)
