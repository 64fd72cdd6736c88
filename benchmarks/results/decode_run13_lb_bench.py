"""Diagnostic: linear_block alone (CUDA graph of 24 launches, PDL on) vs the chain it replaces, batch 64."""
import sys
import torch
import triton
from lit_mamba2.kernels import decode_block
from lit_mamba2.kernels.decode_block import linear_block
from lit_mamba2.kernels.pdl import launching
from lit_mamba2.kernels.state_update import add_rmsnorm, conv_step

dev = "cuda"
torch.manual_seed(0)


def graph_us(fn, reps=24):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(g.replay, warmup=20, rep=200)
    return ms * 1e3 / reps


for name, d_model, d_ssm, nheads, dstate in (("130m", 768, 1536, 24, 128), ("370m", 1024, 2048, 32, 128)):
    M = 64
    conv_dim = d_ssm + 2 * dstate
    n_in = 2 * d_ssm + 2 * dstate + nheads
    bf = torch.bfloat16
    u = torch.randn(M, d_ssm, device=dev, dtype=bf)
    Wo = torch.randn(d_model, d_ssm, device=dev, dtype=bf) / 40
    Wi = torch.randn(n_in, d_model, device=dev, dtype=bf) / 30
    nw = torch.ones(d_model, device=dev, dtype=bf)
    ss = torch.rand(M, 24, device=dev) * 10
    res = torch.randn(M, d_model, device=dev)
    hid = torch.randn(M, d_model, device=dev, dtype=bf)
    cs = torch.randn(M, 3, conv_dim, device=dev, dtype=bf).transpose(1, 2)  # slot-major, as the Decoder keeps it
    cw = torch.randn(conv_dim, 4, device=dev, dtype=bf)
    cb = torch.randn(conv_dim, device=dev, dtype=bf)
    bar = torch.zeros(1, device=dev, dtype=torch.int64)
    conv = dict(in_weight=Wi, conv_state=cs, conv_weight=cw, conv_bias=cb, conv_lo=d_ssm)
    out_args = dict(u=u, out_weight=Wo, sumsq=ss, gated_eps=1e-5)
    rows = {}
    with launching():
        for tiles in [None] + [t for t in sys.argv[1:]]:
            before = (decode_block.OUT_TILE, decode_block.IN_TILE, decode_block.IN_STAGES, decode_block.NUM_WARPS)
            tag = "default"
            if tiles:
                o0, o1, i0, i1, st, w = map(int, tiles.split(","))
                decode_block.OUT_TILE, decode_block.IN_TILE = (o0, o1), (i0, i1)
                decode_block.IN_STAGES, decode_block.NUM_WARPS = st, w
                tag = tiles
            rows[f"{tag} full (1|2|4)"] = graph_us(lambda: linear_block(res, nw, 1e-5, bar, **out_args, **conv))
            rows[f"{tag} out+norm (1|2)"] = graph_us(lambda: linear_block(res, nw, 1e-5, bar, **out_args))
            rows[f"{tag} norm+in (2|4)"] = graph_us(lambda: linear_block(res, nw, 1e-5, bar, hidden=hid, **conv))
            rows[f"{tag} norm only (2)"] = graph_us(lambda: linear_block(res, nw, 1e-5, bar, hidden=hid))
            noconv = dict(in_weight=Wi, conv_state=cs[:, :0], conv_weight=cw[:0], conv_bias=None, conv_lo=0)
            rows[f"{tag} norm+in, no conv"] = graph_us(lambda: linear_block(res, nw, 1e-5, bar, hidden=hid, **noconv))
            decode_block.OUT_TILE, decode_block.IN_TILE, decode_block.IN_STAGES, decode_block.NUM_WARPS = before

        def chain():
            raw = u @ Wo.T
            x, _ = add_rmsnorm(raw, res, nw, 1e-5, torch.float32, hidden_rms=(ss, d_ssm, 1e-5))
            zx = x @ Wi.T
            conv_step(zx[:, d_ssm:d_ssm + conv_dim], cs, cw, cb, "silu")
        rows["chain: cuBLAS out, add_rmsnorm, cuBLAS in, conv_step"] = graph_us(chain)
    for k, v in rows.items():
        print(f"{name:5s} {k:60s} {v:7.2f} us per launch")
