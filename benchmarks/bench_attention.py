"""Causal attention over packed documents at mamba2attn-2.7b's attention shapes (heads and head_dim from the preset's
attn_cfg), batch 8 x 2048 in bf16 with 1, 4 and 16 documents per row: forward and forward+backward time of

- dense: the reference, SDPA with a dense (batch, 1, L, L) boolean mask (what Attention.forward runs today for
  packed rows; the mask is built inside each call, as there);
- flex: `lit_mamba2.ops.attention(..., impl="flex")`, compiled flex attention with the block mask from the document
  ids (built inside each call; its cost alone is printed as `mask`);
- varlen: torch.nn.attention.varlen.varlen_attn (flash, cu_seqlens from the document ids, inside each call), where
  this torch has it;
- causal: SDPA is_causal with no documents: flash, what attention costs when documents are ignored. More documents
  mean fewer query-key pairs, so flex and varlen can go under it.

q, k and v live in (batch, L, heads, head_dim) memory, the model's layout; SDPA and flex get the (batch, heads, L,
head_dim) views the model passes, varlen the (batch * L, heads, head_dim) ones. Errors are ||out - ref|| / ||ref||
(and the same over the three gradients) against the dense-mask reference in float32 on the same (upcast) inputs.

    python benchmarks/bench_attention.py [--batch 8] [--seqlen 2048] [--docs 1,4,16] [--out bench_attention.json]
    python benchmarks/bench_attention.py --tiny     # CPU, tiny shapes: checks that the script runs

Times: `timing.time_ms` (CUDA events over back-to-back calls, the median of group means) on CUDA; on CPU the median
of a few wall-clock calls. The first call of each (compilation) is not timed. On CPU flex attention has no backward:
its forward+backward column is empty there.
"""

import argparse
import inspect
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lit_mamba2 import ops, reference  # noqa: E402
from lit_mamba2.config import Mamba2Config  # noqa: E402
from lit_mamba2.kernels import attention as attention_kernels  # noqa: E402


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mamba2attn-2.7b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--docs", default="1,4,16", help="documents per row, comma-separated")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--tiny", action="store_true", help="CPU, 2 x 256 positions, 4 heads of 32: a smoke run")
    return ap.parse_args()


def timer(device):
    if device == "cuda":
        from timing import time_ms

        return time_ms

    def wall_ms(fn, n=3):
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return sorted(ts)[n // 2]
    return wall_ms


def document_ids(batch, L, ndocs, device, seed=0):
    """int32 (batch, L): each row split at ndocs - 1 distinct random points."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(L - 1, generator=g)[:ndocs - 1] + 1
        row = torch.zeros(L, dtype=torch.int32)
        for c in cuts.tolist():
            row[c:] += 1
        rows.append(row)
    return torch.stack(rows).to(device)


def varlen_fn():
    """varlen_attn called causally, whichever keyword this torch's signature has for it; None if it has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, "no torch.nn.attention.varlen"
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None, f"varlen_attn{inspect.signature(varlen_attn)}: no causal argument found"

    def run(q, k, v, doc, scale):
        b, L = doc.shape
        flat = doc.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::L] = True  # rows never share a document
        cu = torch.cat([torch.nonzero(starts).flatten(), flat.new_tensor([flat.numel()]).long()]).to(torch.int32)
        return varlen_attn(q, k, v, cu, cu, L, L, scale=scale, **causal)
    return run, f"varlen_attn{inspect.signature(varlen_attn)}"


def rel(a, r):
    a, r = a.double(), r.double()
    return ((a - r).norm() / r.norm().clamp_min(1e-30)).item()


def main():
    args = parse()
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        b, L, h, hk, d, scale = 2, 256, 4, 2, 32, None
    else:
        a = Mamba2Config.from_name(args.preset).attn
        b, L, h, hk, d, scale = args.batch, args.seqlen, a["num_heads"], a["num_heads_kv"], a["head_dim"], \
            a["softmax_scale"]
    dt = torch.bfloat16
    ms = timer(device)
    varlen, varlen_sig = varlen_fn() if device == "cuda" else (None, "CUDA only")
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "python": platform.python_version(), "varlen": varlen_sig}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(f"shapes: batch {b} x {L}, heads {h} (kv {hk}), head_dim {d}, {str(dt)[6:]}, scale {scale}")

    g = torch.Generator(device=device).manual_seed(0)
    q_, k_, v_ = (torch.randn(b, L, n, d, device=device, dtype=dt, generator=g) for n in (h, hk, hk))
    grad = torch.randn(b, h, L, d, device=device, dtype=dt, generator=g)
    rows = []
    for ndocs in [int(x) for x in args.docs.split(",")]:
        doc = document_ids(b, L, ndocs, device, seed=ndocs)
        leaves = [t.clone().requires_grad_() for t in (q_, k_, v_)]
        q, k, v = (t.transpose(1, 2) for t in leaves)  # (b, heads, L, d) views of (b, L, heads, d) memory

        def ref32():
            qq, kk, vv = (t.detach().float().requires_grad_() for t in (q, k, v))
            out = reference.attention(qq, kk, vv, doc, doc, 0, scale)
            out.backward(grad.float())
            return out.detach(), [t.grad for t in (qq, kk, vv)]
        ref_out, ref_grads = ref32()

        flex_in = (q, k, v) if device == "cuda" else (q.detach(), k.detach(), v.detach())  # no CPU backward
        impls = {
            "dense": lambda: reference.attention(q, k, v, doc, doc, 0, scale),
            "flex": lambda: ops.attention(*flex_in, doc_q=doc, scale=scale, impl="flex"),
            "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                            enable_gqa=h != hk),
        }
        if varlen is not None:
            qf, kf, vf = (t.view(b * L, t.shape[2], d) for t in leaves)
            impls["varlen"] = lambda: varlen(qf, kf, vf, doc, scale).view(b, L, h, d).transpose(1, 2)
        mask_ms = ms(lambda: attention_kernels.block_mask(doc, doc, 0, b, L, L, device))
        for name, fn in impls.items():
            row = {"docs": ndocs, "impl": name, "fwd_ms": math.nan, "fwdbwd_ms": math.nan, "out_err": math.nan,
                   "grad_err": math.nan, "error": None}
            try:
                with torch.no_grad():
                    row["fwd_ms"] = ms(fn)
                out = fn()
                if name != "causal":
                    row["out_err"] = rel(out.float(), ref_out)

                def fwdbwd():
                    for t in leaves:
                        t.grad = None
                    fn().backward(grad)
                if device == "cuda" or name not in ("flex",):
                    row["fwdbwd_ms"] = ms(fwdbwd)
                    if name != "causal":
                        row["grad_err"] = max(rel(t.grad.transpose(1, 2), r) for t, r in zip(leaves, ref_grads))
            except Exception as e:  # noqa: BLE001 - report it in the table and go on
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                traceback.print_exc()
            rows.append(row)
        rows.append({"docs": ndocs, "impl": "mask", "fwd_ms": mask_ms, "fwdbwd_ms": math.nan, "out_err": math.nan,
                     "grad_err": math.nan, "error": None})

    print(f"\n{'docs':>4} {'impl':>7} {'fwd ms':>8} {'f+b ms':>8} {'dense/x f+b':>11} {'x/causal f+b':>12} "
          f"{'out err':>8} {'grad err':>8}")
    for r in rows:
        by = {x["impl"]: x for x in rows if x["docs"] == r["docs"]}
        fb = r["fwdbwd_ms"]
        vs_dense = by["dense"]["fwdbwd_ms"] / fb if fb == fb else math.nan
        vs_causal = fb / by["causal"]["fwdbwd_ms"] if fb == fb else math.nan
        print(f"{r['docs']:>4} {r['impl']:>7} {r['fwd_ms']:>8.3f} {fb:>8.3f} {vs_dense:>11.2f} {vs_causal:>12.2f} "
              f"{r['out_err']:>8.1e} {r['grad_err']:>8.1e}" + (f"  {r['error']}" if r["error"] else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "shape": dict(batch=b, seqlen=L, heads=h, heads_kv=hk,
                                                                         head_dim=d), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
