"""One linear_block launch per phase set, eager, for ncu."""
import sys
import torch
from lit_mamba2.kernels.decode_block import linear_block

dev = "cuda"
d_model, d_ssm, nheads, dstate, M = 768, 1536, 24, 128, 64
conv_dim, n_in = d_ssm + 2 * dstate, 2 * d_ssm + 2 * dstate + nheads
bf = torch.bfloat16
u = torch.randn(M, d_ssm, device=dev, dtype=bf)
Wo = torch.randn(d_model, d_ssm, device=dev, dtype=bf) / 40
Wi = torch.randn(n_in, d_model, device=dev, dtype=bf) / 30
nw = torch.ones(d_model, device=dev, dtype=bf)
ss = torch.rand(M, 24, device=dev) * 10
res = torch.randn(M, d_model, device=dev)
hid = torch.randn(M, d_model, device=dev, dtype=bf)
cs = torch.randn(M, conv_dim, 3, device=dev, dtype=bf)
cw = torch.randn(conv_dim, 4, device=dev, dtype=bf)
cb = torch.randn(conv_dim, device=dev, dtype=bf)
bar = torch.zeros(1, device=dev, dtype=torch.int64)
for _ in range(4):
    if sys.argv[1] == "in":
        linear_block(res, nw, 1e-5, bar, hidden=hid, in_weight=Wi, conv_state=cs, conv_weight=cw, conv_bias=cb,
                     conv_lo=d_ssm)
    else:
        linear_block(res, nw, 1e-5, bar, u=u, out_weight=Wo, sumsq=ss, gated_eps=1e-5)
torch.cuda.synchronize()
