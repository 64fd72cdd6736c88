"""GPU correctness of `lit_mamba2.ops.attention`'s fast path (impl="triton": SDPA flash or compiled flex attention):
the output and the three gradients against the reference in float64 on upcast inputs, for packed documents (sorted
and not), a KV cache in front of the queries, a query shard (q_offset), a decoding step, GQA, head dims 64/80/128,
bf16/fp16/fp32, lengths that are not multiples of 128; the bf16/fp16 dense-mask reference's own error is printed
beside ours for scale. Then a cache that grows call by call: how many times flex attention compiles. The tests that
run everywhere (tests/test_attention_op.py) cannot check flex attention's backward: it has none on CPU.

    python benchmarks/check_attention_gpu.py [--out check_attention.json]
"""

import argparse
import json
import sys

import torch
import torch._dynamo

from lit_mamba2 import ops, reference

DEV = "cuda"
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def rel(a, r):
    a, r = a.double(), r.double()
    return ((a - r).norm() / r.norm().clamp_min(1e-30)).item()


def document_ids(b, L, ndocs, gen, sort=True):
    doc = torch.zeros(b, L, dtype=torch.int32, device=DEV)
    for i in range(b):
        for c in (torch.randperm(L - 1, device=DEV, generator=gen)[:ndocs - 1] + 1).tolist():
            doc[i, c:] += 1
    if not sort:  # the same runs, renumbered out of order
        doc = (doc * 7919) % 13
    return doc


# name: (dtype, batch, heads, heads_kv, head_dim, Lq, Lk, docs per row (0: none), q_offset, sorted ids, scale)
CASES = [
    ("packed bf16 gqa", torch.bfloat16, 2, 8, 2, 128, 1000, 1000, 5, None, True, None),
    ("packed fp16", torch.float16, 2, 4, 4, 128, 1000, 1000, 5, None, True, None),
    ("packed fp32", torch.float32, 2, 4, 2, 64, 700, 700, 3, None, True, None),
    ("packed hd64 scale", torch.bfloat16, 2, 4, 4, 64, 512, 512, 9, None, True, 0.2),
    ("packed hd80", torch.bfloat16, 2, 4, 2, 80, 640, 640, 4, None, True, None),
    ("unsorted ids", torch.bfloat16, 2, 4, 2, 128, 777, 777, 6, None, False, None),
    ("causal (sdpa)", torch.bfloat16, 2, 8, 2, 128, 1000, 1000, 0, None, True, None),
    ("cache, no docs", torch.bfloat16, 2, 8, 2, 128, 300, 1000, 0, None, True, None),
    ("cache + docs", torch.bfloat16, 2, 8, 2, 128, 300, 1000, 4, None, True, None),
    ("shard at 256", torch.bfloat16, 2, 8, 2, 128, 300, 1000, 4, 256, True, None),
    ("decode (sdpa)", torch.bfloat16, 3, 8, 2, 128, 1, 513, 0, None, True, None),
    ("decode + docs", torch.bfloat16, 3, 8, 2, 128, 1, 513, 3, None, True, None),
]


def check(name, dtype, b, h, hk, d, Lq, Lk, ndocs, off, sort, scale, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(b, h, Lq, d, device=DEV, dtype=dtype, generator=gen)
    k = torch.randn(b, hk, Lk, d, device=DEV, dtype=dtype, generator=gen)
    v = torch.randn(b, hk, Lk, d, device=DEV, dtype=dtype, generator=gen)
    grad = torch.randn(b, h, Lq, d, device=DEV, dtype=dtype, generator=gen)
    doc_k = document_ids(b, Lk, ndocs, gen, sort) if ndocs else None
    kw = dict(doc_k=doc_k, q_offset=off, scale=scale)

    def run(impl, cast=None):
        leaves = [(t if cast is None else t.to(cast)).clone().requires_grad_() for t in (q, k, v)]
        out = ops.attention(*leaves, **kw, impl=impl)
        out.backward(grad if cast is None else grad.to(cast))
        return [out.detach()] + [t.grad for t in leaves]

    exact = run("torch", torch.float64)
    fast = run("triton")
    dense = run("torch") if dtype != torch.float32 else fast
    errs = [rel(a, r) for a, r in zip(fast, exact)]
    dense_errs = [rel(a, r) for a, r in zip(dense, exact)]
    ok = all(e < TOL[dtype] for e in errs) and all(x.isfinite().all() for x in fast)
    row = {"case": name, "ok": bool(ok), "err": errs, "dense_err": dense_errs}
    print(f"{'ok  ' if ok else 'FAIL'} {name:>18}: out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} "
          f"dv {errs[3]:.1e}   (dense {str(dtype)[6:]}: out {dense_errs[0]:.1e} dq {dense_errs[1]:.1e} "
          f"dk {dense_errs[2]:.1e} dv {dense_errs[3]:.1e})", flush=True)
    return row


def growing_cache():
    """Prefill chunks after a cache that grows: one static compile, one dynamic one, then none."""
    from torch._dynamo.utils import counters

    gen = torch.Generator(device=DEV).manual_seed(1)
    before = counters["stats"]["unique_graphs"]
    errs = []
    for Lk in (400, 500, 600, 700, 800):
        q = torch.randn(2, 8, 100, 128, device=DEV, dtype=torch.bfloat16, generator=gen)
        k, v = (torch.randn(2, 2, Lk, 128, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(2))
        doc_k = document_ids(2, Lk, 3, gen)
        out = ops.attention(q, k, v, doc_k=doc_k, impl="triton")
        errs.append(rel(out, ops.attention(q.double(), k.double(), v.double(), doc_k=doc_k, impl="torch")))
    graphs = counters["stats"]["unique_graphs"] - before
    ok = graphs <= 3 and max(errs) < TOL[torch.bfloat16]
    print(f"{'ok  ' if ok else 'FAIL'} growing cache (Lk 400..800): {graphs} new graphs compiled, errors "
          + " ".join(f"{e:.1e}" for e in errs), flush=True)
    return {"case": "growing cache", "ok": bool(ok), "graphs": graphs, "err": errs}


def main():
    # every (dtype, GQA, scale, head_dim) here compiles flex attention anew: past dynamo's default limit of 8
    # recompiles it would run eagerly (the model's one configuration compiles once, or twice with dynamic shapes)
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print("torch", torch.__version__, torch.cuda.get_device_name(), flush=True)
    rows = []
    for case in CASES:
        try:
            rows.append(check(*case))
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"FAIL {case[0]:>18}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append({"case": case[0], "ok": False, "error": f"{type(e).__name__}: {e}"})
    try:
        rows.append(growing_cache())
    except Exception as e:  # noqa: BLE001
        print(f"FAIL growing cache: {type(e).__name__}: {str(e)[:300]}", flush=True)
        rows.append({"case": "growing cache", "ok": False, "error": f"{type(e).__name__}: {e}"})
    bad = [r["case"] for r in rows if not r["ok"]]
    print("ALL OK" if not bad else f"FAILED: {bad}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
