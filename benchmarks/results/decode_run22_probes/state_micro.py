"""The batch-64 state kernel alone, per layer (48 distinct layers' states so that L2 holds none), with and
without a state window: us per launch and the state's GB/s."""
import torch, itertools
from lit_mamba2.kernels import state_update as su
torch.manual_seed(0)
dev = "cuda"
for name, h in (("130m", 24), ("370m", 32)):
    b, p, n, L = 64, 64, 128, 48
    bf = dict(device=dev, dtype=torch.bfloat16)
    states = [torch.randn(b, h, p, n, **bf) * 0.1 for _ in range(L)]
    x, z = torch.randn(b, h, p, **bf), torch.randn(b, h, p, **bf)
    dt, B, C = torch.randn(b, h, **bf), torch.randn(b, 1, n, **bf), torch.randn(b, 1, n, **bf)
    A_log, dtb, D = torch.rand(h, device=dev), torch.randn(h, device=dev), torch.randn(h, device=dev)
    nw = torch.rand(h * p, **bf)
    pos = torch.zeros((), device=dev, dtype=torch.long)
    def run(W, k, flush="", block_p=None, warps=None):
        wins = [su.StateWindow.allocate(b, W, h, p, 1, n, torch.bfloat16, dev) if W > 1 else None for _ in range(L)]
        pos.fill_(k)
        def step():
            for st, w in zip(states, wins):
                su.state_update(st, x, dt, A_log, B, C, D=D, z=z, dt_bias=dtb, dt_softplus=True, A_is_log=True,
                                norm_weight=nw, window=w, position=pos if w is not None else None,
                                block_p=block_p, num_warps=warps)
        step(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        for _ in range(3): g.replay()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(5):
            e0.record()
            for _ in range(10): g.replay()
            e1.record(); torch.cuda.synchronize()
            ts.append(e0.elapsed_time(e1) / 10 / L * 1e3)
        us = sorted(ts)[2]
        writes = W == 1 or k == W - 1
        gb = states[0].numel() * 2 * (2 if writes else 1) / us / 1e3
        print(f"{name} W={W:<2} k={k:<2} {flush:<6} block_p={block_p} warps={warps}: {us:6.2f} us/layer, "
              f"{gb:6.0f} GB/s of state", flush=True)
    run(1, 0)
    for W, k in [(4, 0), (4, 2), (4, 3), (8, 0), (8, 4), (8, 7), (16, 0), (16, 8), (16, 15)]:
        run(W, k)
    for W, k in [(1, 0), (8, 0), (8, 4), (8, 7)]:
        run(W, k, "", 64, 4)
        run(W, k, "", 16, 2)
    del states
    torch.cuda.empty_cache()
