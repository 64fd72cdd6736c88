"""Time the SSD op forward and forward+backward on the GPU, side by side with its peers, in one run.

    python benchmarks/bench_ssd.py [--dstate 64 128] [--seqlens 512 ... 65536] [--out bench_ssd.json]

Peers, each when importable: mamba_ssm's `mamba_chunk_scan_combined` (its Triton files, loaded from a source checkout
given by --mamba-src or $MAMBA_SSM_SRC without its compiled extensions), fla's `chunk_simple_gla` (the same
recurrence with q=C and k=B expanded per head, v=x·dt, g=A·dt, scale=1; forward only) and causal
`scaled_dot_product_attention` on the FlashAttention backend at the same batch × seqlen × heads × headdim.
Every call sees 65,536 tokens (batch = 65536 / seqlen). The two ceilings (copy bandwidth, bf16 matmul rate) are
measured in the same run; "floor" is max(bytes / bandwidth, flops / matmul rate) for the minimum bytes and flops.
"""

import argparse
import json
import math
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import device_ms, time_ms  # noqa: E402

TOKENS = 65536


def load_mamba(src=None):
    """mamba_ssm's `mamba_chunk_scan_combined` from a source tree, skipping the package __init__ (which imports
    compiled CUDA extensions); its SSD path is pure Triton."""
    src = src or os.environ.get("MAMBA_SSM_SRC")
    if not src or not (Path(src) / "mamba_ssm").is_dir():
        return None
    if "mamba_ssm" not in sys.modules:
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = [str(Path(src) / "mamba_ssm")]
        sys.modules["mamba_ssm"] = pkg
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001 - a peer that does not import is reported, not fatal
        print(f"mamba_ssm not importable: {e!r}")
        return None
    return mamba_chunk_scan_combined


def load_fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:  # noqa: BLE001
        print(f"fla not importable: {e!r}")
        return None
    return chunk_simple_gla


def make_inputs(b, L, h, p, g, n, dtype=torch.bfloat16, device="cuda", seed=0):
    """Mamba-2-like inputs: dt through dt_bias + softplus (bias initialised as mamba_ssm does, dt in [1e-3, 0.1]),
    A = -exp(U(log 1, log 16)), D per head."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(b, L, h, p, device=device, dtype=dtype, generator=gen)
    dt = torch.randn(b, L, h, device=device, dtype=dtype, generator=gen)
    dt0 = torch.exp(torch.rand(h, device=device, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt_bias = dt0 + torch.log(-torch.expm1(-dt0))
    A = -torch.exp(torch.rand(h, device=device, generator=gen) * math.log(16))
    B = torch.randn(b, L, g, n, device=device, dtype=dtype, generator=gen)
    C = torch.randn(b, L, g, n, device=device, dtype=dtype, generator=gen)
    D = torch.randn(h, device=device, generator=gen)
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias)


def ceilings():
    n = 1 << 28  # 512 MiB of bf16
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty_like(a)
    t = do_bench(lambda: c.copy_(a), warmup=25, rep=200, return_mode="median")
    bw = 2 * a.numel() * a.element_size() / (t * 1e-3)
    del a, c
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t = do_bench(lambda: x @ y, warmup=25, rep=200, return_mode="median")
    return bw, 2 * m ** 3 / (t * 1e-3)


def floors(b, L, h, p, g, n, cs):
    """Minimum bytes and flops of the chunked algorithm (causal halves counted once, C·B^T once per group)."""
    tok = b * L
    nch = b * math.ceil(L / cs)
    e = 2  # bf16
    fwd_bytes = tok * (2 * h * p * e + 2 * g * n * e + h * e)  # x in, y out, B, C, dt
    bwd_bytes = tok * (3 * h * p * e + 4 * g * n * e + 2 * h * e)  # x, dy in, dx out; B, C in, dB, dC out; dt, ddt
    quad = nch * cs * cs  # C·B^T or score·x over a full chunk, halved by causality and x2 flops per MAC
    lin = 2 * b * L * p * n  # one (cs x p) by (cs x n) product per chunk, per head
    fwd_flops = g * quad * n + h * (quad * p + 2 * lin)
    bwd_flops = g * quad * n + h * (2 * quad * p + 2 * quad * n + 4 * lin)
    return fwd_bytes, fwd_bytes + bwd_bytes, fwd_flops, fwd_flops + bwd_flops


def bench(args):
    from lit_mamba2.kernels.ssd import ssd as ours

    mamba = load_mamba(args.mamba_src)
    fla = load_fla()
    bw, mm = ceilings()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s")
    rows = []
    h, p, g, cs = args.nheads, args.headdim, 1, args.chunk_size
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                copy_TBps=bw / 1e12, matmul_TFLOPs=mm / 1e12, nheads=h, headdim=p, ngroups=g, chunk_size=cs,
                tokens=TOKENS)
    from lit_mamba2.kernels import ssd as kernels

    base = dict(kernels.CONFIG)
    for n in args.dstate:
        kernels.CONFIG.clear()
        kernels.CONFIG.update({**base, **BEST.get(n, {})})
        for L in args.seqlens:
            b = TOKENS // L
            inp = make_inputs(b, L, h, p, g, n)
            gy = torch.randn_like(inp["x"])
            leaves = {k: v.detach().requires_grad_() for k, v in inp.items()}
            row = dict(dstate=n, seqlen=L, batch=b, config=BEST.get(n, {}))

            def call(fn, t):
                return fn(t["x"], t["dt"], t["A"], t["B"], t["C"], cs, D=t["D"], dt_bias=t["dt_bias"],
                          dt_softplus=True)

            def ours_call(t):
                return ours(t["x"], t["dt"], t["A"], t["B"], t["C"], cs, t["D"], None, t["dt_bias"], None, None,
                            True, (0.0, math.inf), False)

            def fb(f):
                def run():
                    y = f(leaves)
                    torch.autograd.grad(y, list(leaves.values()), gy)
                return run

            def timed(key, fn):
                try:
                    row[key] = time_ms(fn, warmup=args.warmup, rep=args.rep)
                    if key.startswith(("ours", "mamba")):
                        row[key + "_dev"] = device_ms(fn)
                except Exception as e:  # noqa: BLE001 - one failing peer must not lose the others' numbers
                    print(f"{key} failed at dstate {n} seqlen {L}: {e!r}"[:400])

            with torch.no_grad():
                timed("ours_fwd", lambda: ours_call(inp))
            if args.baseline is not None:  # the same op under another CONFIG (e.g. the previous version's kernels)
                kernels.CONFIG.clear()
                kernels.CONFIG.update({**base, **json.loads(args.baseline)})
                with torch.no_grad():
                    timed("base_fwd", lambda: ours_call(inp))
                if not args.no_fb:
                    timed("base_fb", fb(ours_call))
                kernels.CONFIG.clear()
                kernels.CONFIG.update({**base, **BEST.get(n, {})})
            if not args.no_fb:
                timed("ours_fb", fb(ours_call))
            if mamba is not None:
                with torch.no_grad():
                    timed("mamba_fwd", lambda: call(mamba, inp))
                if not args.no_fb:
                    timed("mamba_fb", fb(lambda t: call(mamba, t)))
            if fla is not None:
                dtp = F.softplus(inp["dt"].float() + inp["dt_bias"])
                q = inp["C"].expand(b, L, h, n).contiguous()
                k = inp["B"].expand(b, L, h, n).contiguous()
                v = (inp["x"] * dtp[..., None]).to(torch.bfloat16)
                gl = (dtp * inp["A"]).contiguous()
                with torch.no_grad():
                    timed("fla_fwd", lambda: fla(q, k, v, g=gl, scale=1.0))
                del q, k, v, gl
            if not args.no_sdpa:
                qa = torch.randn(b, h, L, p, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                ka = torch.randn_like(qa, requires_grad=True)
                va = torch.randn_like(qa, requires_grad=True)
                go = torch.randn_like(qa)
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    with torch.no_grad():
                        timed("sdpa_fwd", lambda: F.scaled_dot_product_attention(qa, ka, va, is_causal=True))

                    def sdpa_fb():
                        o = F.scaled_dot_product_attention(qa, ka, va, is_causal=True)
                        torch.autograd.grad(o, (qa, ka, va), go)

                    timed("sdpa_fb", sdpa_fb)
                del qa, ka, va, go
            fb_bytes = floors(b, L, h, p, g, n, cs)
            row["floor_fwd"] = max(fb_bytes[0] / bw, fb_bytes[2] / mm) * 1e3
            row["floor_fb"] = max(fb_bytes[1] / bw, fb_bytes[3] / mm) * 1e3
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            if args.out:  # after every row: a call cut by its timeout keeps what it measured
                Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
            del inp, leaves, gy
            torch.cuda.empty_cache()
    kernels.CONFIG.clear()
    kernels.CONFIG.update(base)
    print_table(meta, rows)
    if os.environ.get("LIT_MAMBA2_KERNEL_STATS") == "1":
        from lit_mamba2.kernels import ssd as kernels

        for k, v in kernels.STATS.items():
            print(f"{k}: registers {v[0]}, spills {v[1]}, shared {v[2]}")
    return meta, rows


SWEEP = [  # launch-setting variants of our kernels compared by --sweep (keys of lit_mamba2.kernels.ssd.CONFIG)
    {},
    {"fold_decay": True},  # decay folded into the operands off the diagonal (default: at dstate >= 128 only)
    {"fold_decay": False},
    {"dcb_warps": 8},
    {"dx_warps": 8},
]
# forward-only variants (kernel version v6 of notes/ssd_kernels.md), timed by forward alone. fwd_out: the output
# kernel's position / source blocks (registers 168 -> 96-126 at source blocks of 32, Triton 3.6 sm_90), warps,
# pipelining, register cap, heads per program, C·B source and decay folding; fwd_state: the state pass's
# pipelining, dot length, grid and the two-level pass
SWEEP_FWD_OUT = [  # run 5 call 1 compared 14 variants at 4096 (logs in commit 86411de); not yet run:
    {},
    {"out_maxnreg": 112}, {"out_maxnreg": 96},
    {"out_bk": 32, "out_fold_decay": False},
    {"out_bk": 32, "out_stages": 1},
]
SWEEP_FWD_STATE = [  # run 5 call 1 tried two-level passes alone (won only at 64K); not yet run:
    {},
    {"fwd_state_stages": 1}, {"fwd_state_stages": 2}, {"fwd_state_stages": 3},
    {"fwd_state_min_programs": 1024, "fwd_state_stages": 2},
    {"state_seg_programs": 0}, {"state_seg_min_nc": 128},  # one walk always; two-level from 128 chunks
    {"fwd_state_bk": 128, "fwd_state_stages": 2}, {"fwd_state_bk": 256, "fwd_state_stages": 2},
]
# backward variants (kernel version v6-bwd), ranked by forward+backward
V5_BWD = {"bwd_cbt": False, "bwd_state_segments": 1, "dcb_stages": None, "bwd_state_stages": None, "dx_maxnreg": 0,
          "bc_maxnreg": 0, "dx_heads_fastest": False, "bwd_state_dcl_rows": False, "bwd_state_bk": None,
          "bwd_state_bn": None, "bwd_state_warps": None}  # the backward's launch settings as run 4 measured them (v5)
SWEEP_BWD = [  # run 5 kept the winners as defaults; these are the ones that were close or split by seqlen
    {},
    V5_BWD,
    {"dx_heads_fastest": False},  # run 5: -0.1 ms at 4096, +0.06-0.1 ms at 65536
    {"dx_heads_fastest": True},  # (default None: heads fastest from 16 MB of C·Bᵀ per batch row, i.e. 32K tokens)
    {"bwd_cbt": False},  # dx loads C·B (fp32, from a C·B launch) or recomputes it, as v5
    {"bwd_state_dcl_rows": True},  # run 5: -0.01 to -0.05 ms (noise level)
    {"dx_maxnreg": 0},
    {"dx_maxnreg": 168},
    {"bc_maxnreg": 0},
    {"bwd_state_seg_chunks": 16},
]
# --- forward round 3 (helper fwd3; kernel version v7 of notes/ssd_kernels.md), ranked by forward alone ---
# Run 8-fwd's two device calls swept (logs in commits 10d3f16, 98d8bcb): C·B stored in 16 bits, register
# caps, 3 stages, 128-position blocks of 8 warps, the two-level state pass with an elementwise fix-up against a second
# walk, its walk-length threshold, dstate blocks of 128 (call 1); folded 64 x 64 tiles at dstate 64, the diagonal
# blocks' C·B recomputed in float32, 8-warp state programs (call 2). The losers' code is gone; these sets keep what
# can still be compared: the output kernel's tiles, folding and stages (at 4096: it does not change with seqlen),
# and from which walk length the two-level pass is on
SWEEP_FWD3_OUT = [{}, {"out_fold_decay": False}, {"out_bk": 32}, {"out_bk": 32, "out_stages": 3}, {"out_stages": 2}]
SWEEP_FWD3_STATE = [{}, {"state_seg_min_nc": 128}, {"state_seg_min_nc": 256}, {"state_seg_programs": 0}]
# backward round 3 (run 8, version v7 of notes/ssd_kernels.md), ranked by forward+backward. Run 8 timed and
# removed (slower or tied): 128-position dx / dB / dC blocks, heads looped inside dx programs, the dCB kernel split
# into diagonal / off-diagonal launches, the s side of the quadratic d cum moved from the dCB kernel to dx, dx's own
# fold choice. What is left to sweep are existing keys that were close: dx pipelining at dstate 128 and the reverse
# state pass's dot length and dstate block.
SWEEP_BWD3 = [{}, {"dx_stages": 2}, {"bwd_state_bk": 256}, {"bwd_state_bn": 128}]
# backward round 4 (helper bwd4, v8-bwd): the two-level reverse state pass with a scan and an elementwise fix-up
# (default) against one sequential walk (segments 1); then how many segments (target programs, chunks per segment)
# and from which grid size (seg_below) it pays. Run 9 also timed v6-bwd b's second walk (removed: +0.10-0.16 ms f+b;
# logs in commit 3eae7c2)
SWEEP_BWD4 = [{}, {"bwd_state_segments": 1},
              {"bwd_state_seg_target": 2048, "bwd_state_seg_chunks": 4},
              {"bwd_state_seg_target": 4096, "bwd_state_seg_chunks": 4},
              {"bwd_state_seg_target": 1024}, {"bwd_state_seg_below": 512}, {"bwd_state_seg_below": 128}]
# backward round 6 (helper fixfold, v10-bwd, run 12): the two-level reverse pass without its fix-up pass over dstates
# (dx and dB adding each chunk's segment term themselves, the d cum_last term in a small kernel or in the dC pass, the
# segments' gradients in 16 or 32 bits, the term summed or as a second dot) lost or tied against the fix-up pass at
# every point and was removed (notes/ssd_kernels.md; its sweep set "fixfold" is in commit 5da6e76)
# session 6: chunks of 256 computed as chunks of 128 (CONFIG max_chunk). The launch settings below were picked at
# chunk 256 (runs 3-12); at 128 a chunk has 3 causal tile pairs instead of 10, so they are timed again
SWEEP_C128 = [{}, {"stages": 2}, {"fold_decay": True}, {"fold_decay": False}, {"out_fold_decay": False},
              {"dx_stages": 2}, {"dcb_stages": 1}, {"dx_maxnreg": 0}, {"dx_maxnreg": 168}, {"bc_maxnreg": 0},
              {"dx_heads_fastest": True}, {"dx_heads_fastest": False}, {"bwd_state_bk": 128},
              {"fwd_state_bk": 128}, {"dcb_warps": 8}, {"out_bk": 32}]
# name -> (variants, seqlens or None for --sweep-seqlens, rank by "fb" or "fwd" (None: --sweep-by))
SWEEP_SETS = {"default": (SWEEP, None, None), "fwd_out": (SWEEP_FWD_OUT, [4096], "fwd"),
              "fwd_state": (SWEEP_FWD_STATE, [4096, 65536], "fwd"), "bwd": (SWEEP_BWD, None, "fb"),
              "dx_order": ([{}, {"dx_heads_fastest": True}, {"dx_heads_fastest": False}], [4096, 16384, 32768, 65536],
                           "fb"),
              "fwd3_out": (SWEEP_FWD3_OUT, [4096], "fwd"), "fwd3_state": (SWEEP_FWD3_STATE, [16384, 32768, 65536], "fwd"),
              "bwd3": (SWEEP_BWD3, None, "fb"), "bwd4": (SWEEP_BWD4, [65536, 32768, 16384], "fb"),
              "c128": (SWEEP_C128, [4096, 65536], "fb"),
              "c128b": ([{}, {"stages": 2}, {"bwd_state_bk": 128}, {"stages": 2, "bwd_state_bk": 128}],
                        [4096, 16384, 65536], "fb"),
              "c128s": ([{}, {"bwd_state_seg_below": 128}, {"bwd_state_seg_target": 256},
                         {"bwd_state_seg_target": 1024}, {"bwd_state_seg_chunks": 16},
                         {"fwd_state_min_programs": 128}, {"fwd_state_min_programs": 1024},
                         {"state_seg_min_nc": 128}], [16384, 32768], "fb")}
SWEPT = []  # every (dstate, seqlen, variant, fwd, fb) the sweep timed, saved to --sweep-out
BEST = {}  # dstate -> the sweep's fastest variant (by --sweep-by), applied by bench() when --sweep ran


def sweep(args):
    """Our forward (and forward+backward) under each launch variant, then a per-kernel profile of the winner. With
    several --sweep-set names, each set runs on top of the previous sets' winner; a set's winner has the least
    total time over its seqlens."""
    from lit_mamba2.kernels import ssd as kernels

    base = dict(kernels.CONFIG)
    h, p, cs = args.nheads, args.headdim, args.chunk_size
    for n in args.dstate:
        won = dict(BEST.get(n, {}))
        for set_name in args.sweep_set:
            variants, seqlens, by = SWEEP_SETS[set_name]
            seqlens, by = seqlens or args.sweep_seqlens, by or args.sweep_by
            totals = {}
            for L in seqlens:
                b = TOKENS // L
                inp = make_inputs(b, L, h, p, 1, n)
                gy = torch.randn_like(inp["x"])
                leaves = {k: v.detach().requires_grad_() for k, v in inp.items()}

                def f(t):
                    return kernels.ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], cs, t["D"], None, t["dt_bias"],
                                       None, None, True, (0.0, math.inf), False)

                def fb():
                    torch.autograd.grad(f(leaves), list(leaves.values()), gy)

                for i, var in enumerate(variants):
                    kernels.CONFIG.clear()
                    kernels.CONFIG.update({**base, **won, **var})
                    try:
                        with torch.no_grad():
                            tf = time_ms(lambda: f(inp), warmup=args.warmup, rep=args.rep)
                        tfb = None if by == "fwd" else time_ms(fb, warmup=args.warmup, rep=args.rep)
                        print(f"sweep {set_name} dstate {n} seqlen {L} {var or 'default'}: fwd {tf:.3f} ms"
                              + ("" if tfb is None else f", fwd+bwd {tfb:.3f} ms"), flush=True)
                        SWEPT.append(dict(set=set_name, dstate=n, seqlen=L, variant=var, on_top_of=won, fwd=tf,
                                          fb=tfb))
                        totals[i] = totals.get(i, 0.0) + (tf if tfb is None else tfb)
                    except Exception as e:  # noqa: BLE001
                        totals[i] = math.inf
                        print(f"sweep {set_name} dstate {n} seqlen {L} {var}: failed {e!r}"[:300], flush=True)
                if args.sweep_out:
                    Path(args.sweep_out).write_text(json.dumps(SWEPT, indent=1))
                del inp, leaves, gy
                torch.cuda.empty_cache()
            i_best = min(totals, key=totals.get)
            won.update(variants[i_best])
            print(f"sweep {set_name} dstate {n}: best {variants[i_best] or 'default'} -> {won}", flush=True)
        BEST[n] = won
        if os.environ.get("LIT_MAMBA2_KERNEL_STATS") == "1":  # registers of every launch variant the sweep compiled
            for k, v in kernels.STATS.items():
                print(f"{k}: registers {v[0]}, spills {v[1]}, shared {v[2]}")
        if not args.no_profile:
            profile_config(args, kernels, base, n, won, args.profile_seqlens)
        kernels.CONFIG.clear()
        kernels.CONFIG.update(base)


def profile_config(args, kernels, base, n, cfg, seqlens):
    """Per-kernel device time of our forward (and forward+backward unless --sweep-by fwd) under cfg."""
    from torch.profiler import ProfilerActivity, profile

    h, p, cs = args.nheads, args.headdim, args.chunk_size
    kernels.CONFIG.clear()
    kernels.CONFIG.update({**base, **cfg})
    for L in seqlens:
        inp = make_inputs(TOKENS // L, L, h, p, 1, n)
        leaves = {k: v.detach().requires_grad_() for k, v in inp.items()}
        gy = torch.randn_like(inp["x"])

        def f(t):
            return kernels.ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], cs, t["D"], None, t["dt_bias"], None,
                               None, True, (0.0, math.inf), False)

        def fb():
            torch.autograd.grad(f(leaves), list(leaves.values()), gy)

        steps = [("fwd", lambda: f(inp), torch.no_grad)]
        if args.sweep_by != "fwd":
            steps.append(("fwd+bwd", fb, torch.enable_grad))
        for name, step, mode in steps:
            with mode():
                step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        step()
                    torch.cuda.synchronize()
            print(f"profile dstate {n} seqlen {L} (5 x {name}) {cfg or 'default'}, per-call ms:")
            for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:10]:
                print(f"  {ev.key[:60]:60s} {ev.device_time_total / 5e3:8.3f} ms  x{ev.count // 5}")
        del inp, leaves, gy
        torch.cuda.empty_cache()
    kernels.CONFIG.clear()
    kernels.CONFIG.update(base)


def print_table(meta, rows):
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    def r(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"

    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | copy {meta['copy_TBps']:.2f} TB/s"
          f" | bf16 mm {meta['matmul_TFLOPs']:.0f} TFLOP/s | h={meta['nheads']} p={meta['headdim']} g=1 "
          f"cs={meta['chunk_size']}")
    print("dstate seqlen | ours fwd  mamba  fla   sdpa | ours/mamba ours/fla floor/ours | ours f+b  mamba   sdpa"
          " | ours/mamba floor/ours | kernels only: fwd ours mamba ratio, f+b ours mamba ratio")
    if any("base_fwd" in w for w in rows):
        print("baseline (--baseline) forward / f+b ms and ours/baseline: " + "; ".join(
            f"{w['dstate']}/{w['seqlen']}: {f(w.get('base_fwd'))} {r(w.get('ours_fwd'), w.get('base_fwd'))}"
            f" {f(w.get('base_fb'))} {r(w.get('ours_fb'), w.get('base_fb'))}" for w in rows))
    for w in rows:
        g = w.get
        print(f"{w['dstate']:>6} {w['seqlen']:>6} | {f(g('ours_fwd'))} {f(g('mamba_fwd'))} {f(g('fla_fwd'))} "
              f"{f(g('sdpa_fwd'))} | {r(g('ours_fwd'), g('mamba_fwd'))} {r(g('ours_fwd'), g('fla_fwd'))} "
              f"{r(g('floor_fwd'), g('ours_fwd'))} | {f(g('ours_fb'))} {f(g('mamba_fb'))} {f(g('sdpa_fb'))} | "
              f"{r(g('ours_fb'), g('mamba_fb'))} {r(g('floor_fb'), g('ours_fb'))} | kernels: fwd {f(g('ours_fwd_dev'))} "
              f"{f(g('mamba_fwd_dev'))} {r(g('ours_fwd_dev'), g('mamba_fwd_dev'))} f+b {f(g('ours_fb_dev'))} "
              f"{f(g('mamba_fb_dev'))} {r(g('ours_fb_dev'), g('mamba_fb_dev'))}")


def markdown(meta, rows):
    """The BENCHMARKS.md table: times in ms (median), ratios ours / peer (< 1 is faster), floor / ours."""
    def f(v):
        return "–" if v is None else f"{v:.3f}"

    def r(a, b):
        return "–" if a is None or b is None else f"{a / b:.2f}"

    out = [f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}; measured ceilings: copy "
           f"{meta['copy_TBps']:.2f} TB/s, bf16 matmul {meta['matmul_TFLOPs']:.0f} TFLOP/s. "
           f"{meta['tokens']} tokens per call (batch = {meta['tokens']} / seqlen), {meta['nheads']} heads, headdim "
           f"{meta['headdim']}, ngroups {meta['ngroups']}, chunk {meta['chunk_size']}, bf16, D per head, dt_bias + "
           "softplus, no z.", "",
           "| dstate | seqlen | ours fwd | mamba_ssm fwd | fla fwd | SDPA fwd | ours/mamba | ours/fla | floor/ours "
           "| ours f+b | mamba_ssm f+b | SDPA f+b | ours/mamba | floor/ours | kernels: ours/mamba fwd | f+b |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for w in rows:
        g = w.get
        out.append(f"| {w['dstate']} | {w['seqlen']} | {f(g('ours_fwd'))} | {f(g('mamba_fwd'))} | {f(g('fla_fwd'))} | "
                   f"{f(g('sdpa_fwd'))} | {r(g('ours_fwd'), g('mamba_fwd'))} | {r(g('ours_fwd'), g('fla_fwd'))} | "
                   f"{r(g('floor_fwd'), g('ours_fwd'))} | {f(g('ours_fb'))} | {f(g('mamba_fb'))} | {f(g('sdpa_fb'))} | "
                   f"{r(g('ours_fb'), g('mamba_fb'))} | {r(g('floor_fb'), g('ours_fb'))} | "
                   f"{r(g('ours_fwd_dev'), g('mamba_fwd_dev'))} | {r(g('ours_fb_dev'), g('mamba_fb_dev'))} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dstate", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--nheads", type=int, default=32)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--mamba-src", default=None)
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--warmup", type=int, default=25)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true", help="compare launch variants of our kernels, then profile")
    ap.add_argument("--sweep-seqlens", type=int, nargs="+", default=[4096])
    ap.add_argument("--sweep-set", choices=sorted(SWEEP_SETS), nargs="+", default=["default"],
                    help="default: launch variants of forward and backward; fwd_out, fwd_state: forward-only "
                         "variants (each set on top of the previous ones' winner)")
    ap.add_argument("--profile-seqlens", type=int, nargs="+", default=[4096])
    ap.add_argument("--sweep-by", choices=["fb", "fwd"], default="fb",
                    help="rank variants by forward+backward (default) or forward alone (then f+b is not timed)")
    ap.add_argument("--sweep-out", default=None, help="JSON of every sweep timing")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile after each sweep")
    ap.add_argument("--config", default=None,
                    help="JSON dict of lit_mamba2.kernels.ssd.CONFIG overrides for the whole run (per dstate: "
                         '{"64": {...}, "128": {...}})')
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-fb", action="store_true", help="time forwards only (ours and mamba_ssm)")
    ap.add_argument("--baseline", default=None, metavar="JSON",
                    help="also time ours under these CONFIG overrides (columns base_fwd, base_fb), e.g. the "
                         "previous launch settings")
    ap.add_argument("--to-markdown", metavar="JSON", help="print a saved run (--out) as the BENCHMARKS.md table")
    args = ap.parse_args()
    if args.to_markdown:
        saved = json.loads(Path(args.to_markdown).read_text())
        print(markdown(saved["meta"], saved["rows"]))
        return
    if args.config:
        cfg = json.loads(args.config)
        for n in args.dstate:
            BEST[n] = cfg.get(str(n), {})
    if args.sweep:
        sweep(args)
    if not args.no_bench:
        bench(args)


if __name__ == "__main__":
    main()
