"""Correctness at real sizes and speed of the training path's small kernels: causal conv1d, gated RMSNorm and the
fused LM-head cross-entropy, each side by side with the unfused PyTorch path (and mamba_ssm's Triton gated norm
when its source is at hand).

    python benchmarks/bench_small_kernels.py [--peers PATH/TO/.peers] [--out DIR] [--smoke] [--only conv,norm,ce]
        [--sweep] [--sweep-compile I/N]

Shapes are mamba2-130m's and mamba2-2.7b's at batch 8 x seqlen 2048 in bf16. Errors are ||out - ref|| / ||ref||
against a float64 reference on the same (upcast) inputs; the unfused bf16 path's own error is printed next to ours
so that the tolerance means something. Times are medians of triton.testing.do_bench (CUDA events). --smoke runs
tiny shapes on CPU under TRITON_INTERPRET=1 to check the script itself.

--sweep (norm section) first times the gated norm's launch variants (rmsnorm_gated.CONFIG) per shape, kernel by
kernel: forward variants, then backward variants after the best forward; the best of each phase (re-timed) is
applied for that shape's table rows. --sweep-compile I/N compiles every N-th sweep variant from the I-th at a small
row count and exits, so that N processes can fill Triton's cache in parallel before the timed run.
"""

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from lit_mamba2 import reference  # noqa: E402
from lit_mamba2.kernels import conv1d, cross_entropy, rmsnorm_gated  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import device_ms  # noqa: E402

DEV = "cpu" if SMOKE else "cuda"
DT = torch.bfloat16
ROWS = []  # (section, shape, impl, fwd_ms, fwdbwd_ms, fwd_gpu_ms, fwdbwd_gpu_ms, peak_mib)
ERRS = []  # (section, shape, quantity, ours, unfused)


def bench(fn):
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def gpu_ms(fn, n=10):
    """GPU time alone (`timing.device_ms`), so that the host's launch overhead, which the eager timing includes when
    the GPU waits for it, drops out."""
    if SMOKE:
        return float("nan")
    try:
        return device_ms(fn, n)
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"profiling failed: {type(e).__name__}: {e}")
        return float("nan")


def timings(fn, grad_fn):
    """(fwd, fwd+bwd) eagerly, then the same two as GPU time alone."""
    return bench(fn), bench(grad_fn), gpu_ms(fn), gpu_ms(grad_fn)


def peak_mib(fn):
    if SMOKE:
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randn(*shape, scale=1.0):
    return torch.randn(*shape, device=DEV) * scale


# ---------------------------------------------------------------------------------------------------------------
def conv_torch(x, w, b):
    """The unfused path without a conv kernel (mamba_ssm's fallback): F.conv1d over (b, d, L), slice, SiLU."""
    W = w.shape[1]
    y = F.conv1d(x.transpose(1, 2), w[:, None, :], b, padding=W - 1, groups=w.shape[0])[..., : x.shape[1]]
    return F.silu(y).transpose(1, 2)


def bench_conv(name, batch, L, d_inner, conv_dim, nheads, W=4):
    shape = f"{name}: x ({batch}, {L}, {conv_dim}) slice of ({batch}, {L}, {2 * d_inner + conv_dim - d_inner + nheads}), width {W}"
    in_proj = randn(batch, L, 2 * d_inner + (conv_dim - d_inner) + nheads).to(DT)
    x = in_proj[:, :, d_inner:d_inner + conv_dim].requires_grad_()  # non-contiguous, as in the model
    w = randn(conv_dim, W, scale=0.3).to(DT).requires_grad_()
    b = randn(conv_dim, scale=0.1).to(DT).requires_grad_()
    g = randn(batch, L, conv_dim).to(DT)
    ndoc = 4
    seq_idx = torch.sort(torch.randint(0, ndoc, (batch, L), device=DEV, dtype=torch.int32), dim=1).values
    init = randn(batch, conv_dim, W - 1).to(DT).requires_grad_()

    # correctness: with seq_idx, initial and final states, against float64
    out, fin = conv1d.causal_conv1d(x, w, b, seq_idx, init, True, "silu")
    gfin = randn(batch, conv_dim, W - 1)
    grads = torch.autograd.grad((out.float() * g.float()).sum() + (fin * gfin).sum(), (x, w, b, init))
    refs = [t.detach().double().requires_grad_() for t in (x, w, b, init)]
    rout, rfin = reference.causal_conv1d(refs[0], refs[1], refs[2], seq_idx, refs[3], True, "silu")
    rgrads = torch.autograd.grad((rout * g.double()).sum() + (rfin * gfin.double()).sum(), refs)
    # the unfused bf16 path (no seq_idx support there): its error without seq_idx / states, for scale
    o2 = conv_torch(x, w, b)
    g2 = torch.autograd.grad((o2.float() * g.float()).sum(), (x, w, b))
    r2 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ro2 = reference.causal_conv1d(*r2, None, None, False, "silu")
    rg2 = torch.autograd.grad((ro2 * g.double()).sum(), r2)
    o3 = conv1d.causal_conv1d(x, w, b)
    g3 = torch.autograd.grad((o3.float() * g.float()).sum(), (x, w, b))
    ERRS.append(("conv1d", name, "out (seq_idx, states)", rel(out, rout), float("nan")))
    ERRS.append(("conv1d", name, "final states", rel(fin, rfin), float("nan")))
    for n, a, r in zip(("dx", "dweight", "dbias", "dinit"), grads, rgrads):
        ERRS.append(("conv1d", name, f"{n} (seq_idx, states)", rel(a, r), float("nan")))
    ERRS.append(("conv1d", name, "out (plain)", rel(o3, ro2), rel(o2, ro2)))
    for n, a, u, r in zip(("dx", "dweight", "dbias"), g3, g2, rg2):
        ERRS.append(("conv1d", name, f"{n} (plain)", rel(a, r), rel(u, r)))
    del refs, rout, rfin, rgrads, r2, ro2, rg2

    variants = {
        "triton": lambda: conv1d.causal_conv1d(x, w, b),
        "triton, seq_idx": lambda: conv1d.causal_conv1d(x, w, b, seq_idx),
        "F.conv1d + silu": lambda: conv_torch(x, w, b),
        "reference (torch)": lambda: reference.causal_conv1d(x, w, b),
    }
    for impl, f in variants.items():
        ROWS.append(("conv1d", shape, impl, *timings(f, lambda: torch.autograd.grad(f(), (x, w, b), g)),
                     float("nan")))
    if not SMOKE and CONV_SWEEP:  # the backward's launch variants (conv1d constants), to pick the default
        f = variants["triton"]
        for patch in CONV_SWEEP:
            before = {k: getattr(conv1d, k) for k in patch}
            for k, v in patch.items():
                setattr(conv1d, k, v)
            label = ", ".join(f"{k}={v}" for k, v in patch.items()) or "default"
            try:
                gx = torch.autograd.grad(f(), (x, w, b), g)
                for n, a, r in zip(("dx", "dweight", "dbias"), gx, g3):
                    ERRS.append(("conv1d", name, f"{n}, backward {label} vs default", rel(a, r), float("nan")))
                fbg = gpu_ms(lambda: torch.autograd.grad(f(), (x, w, b), g))
                ROWS.append(("conv1d", shape, f"triton, backward {label}", float("nan"), float("nan"),
                             float("nan"), fbg, float("nan")))
                print(f"  conv backward {label}: fwd+bwd GPU {fbg:.3f} ms", flush=True)
            finally:
                for k, v in before.items():
                    setattr(conv1d, k, v)


# --conv-sweep: conv1d constants per variant (runs 1-2: the one-kernel backward's tiles, then the two-pass
# backward that replaced it: notes/small_kernels.md; their JSON in commits bf9fdb6 and 6903ef0)
CONV_SWEEP = []
CONV_SWEEP_SET = [{}] + [{"BWD_TILES": tiles} for tiles in (
    ((32, 64, 4), (64, 128, 4)), ((64, 64, 8), (64, 128, 4)), ((64, 32, 4), (64, 128, 4)),
    ((64, 64, 4), (64, 64, 4)), ((64, 64, 4), (128, 128, 8)))]


# ---------------------------------------------------------------------------------------------------------------
SWEEP = []  # (model, overrides chosen)
SWEEP_RESULTS = []  # (model, phase, overrides, GPU ms, errors, ok)


def bench_norm_swept(args, name, M, d_ssm, ngroups, d_in_proj, peer_fn):
    """bench_norm, after --sweep's best overrides (kept for this shape only) where asked."""
    if not args.sweep or SMOKE:
        return bench_norm(name, M, d_ssm, ngroups, d_in_proj, peer_fn)
    best = norm_sweep(name, M, d_ssm, ngroups, d_in_proj)
    SWEEP.append((name, best))
    print(f"[norm sweep {name}] chosen: {_cfg_str(best)}", flush=True)
    cfg0 = dict(rmsnorm_gated.CONFIG)
    rmsnorm_gated.CONFIG.update(best)
    try:
        bench_norm(name, M, d_ssm, ngroups, d_in_proj, peer_fn)
    finally:
        rmsnorm_gated.CONFIG.clear()
        rmsnorm_gated.CONFIG.update(cfg0)


def load_mamba_rmsnorm(peers):
    if not peers:
        return None
    path = Path(peers) / "mamba_ssm" / "ops" / "triton" / "layernorm_gated.py"
    if not path.exists():
        print(f"mamba_ssm gated norm not found at {path}")
        return None
    try:
        spec = importlib.util.spec_from_file_location("peer_layernorm_gated", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.rmsnorm_fn
    except Exception:
        traceback.print_exc()
        return None


def bench_norm(name, M, d_ssm, ngroups, d_in_proj, peer_fn):
    gs = d_ssm // ngroups
    shape = f"{name}: x ({M}, {d_ssm}), z slice of ({M}, {d_in_proj}), group {gs}"
    x = randn(M, d_ssm, scale=2.0).to(DT).requires_grad_()
    z = randn(M, d_in_proj).to(DT)[:, :d_ssm].requires_grad_()
    w = (1 + 0.1 * randn(d_ssm)).to(DT).requires_grad_()
    g = randn(M, d_ssm).to(DT)
    for nbg in (False, True):
        out = rmsnorm_gated.gated_rmsnorm(x, z, w, 1e-5, gs, nbg)
        grads = torch.autograd.grad((out.float() * g.float()).sum(), (x, z, w))
        refs = [t.detach().double().requires_grad_() for t in (x, z, w)]
        rout = reference.gated_rmsnorm(*refs, 1e-5, gs, nbg)
        rgrads = torch.autograd.grad((rout * g.double()).sum(), refs)
        unf = reference.gated_rmsnorm(x, z, w, 1e-5, gs, nbg)  # the unfused path, in float32 on bf16 inputs
        ugrads = torch.autograd.grad((unf.float() * g.float()).sum(), (x, z, w))
        tag = f"norm_before_gate={nbg}"
        ERRS.append(("gated_rmsnorm", name, f"out ({tag})", rel(out, rout), rel(unf, rout)))
        for n, a, u, r in zip(("dx", "dz", "dweight"), grads, ugrads, rgrads):
            ERRS.append(("gated_rmsnorm", name, f"{n} ({tag})", rel(a, r), rel(u, r)))
        del refs, rout, rgrads
    variants = {
        "triton": lambda: rmsnorm_gated.gated_rmsnorm(x, z, w, 1e-5, gs, False),
        "reference (torch)": lambda: reference.gated_rmsnorm(x, z, w, 1e-5, gs, False),
    }
    if peer_fn is not None:
        variants["mamba_ssm rmsnorm_fn"] = lambda: peer_fn(x, w, None, z=z, eps=1e-5, group_size=gs,
                                                           norm_before_gate=False)
        pout = variants["mamba_ssm rmsnorm_fn"]()
        ERRS.append(("gated_rmsnorm", name, "mamba_ssm out vs ours", rel(pout, variants["triton"]()), float("nan")))
    for impl, f in variants.items():
        ROWS.append(("gated_rmsnorm", shape, impl, *timings(f, lambda: torch.autograd.grad(f(), (x, z, w), g)),
                     float("nan")))


def _cfg_str(cfg):
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def norm_sweep_jobs(name):
    """(phase, CONFIG overrides) for one shape; phase "fwd" varies the forward kernel, "bwd" the backward."""
    big = name.endswith("2.7b")
    jobs = []
    fwd_rw = [(1, 4), (1, 8), (1, 16), (2, 8), (2, 16)] if big else [(1, 4), (1, 8), (2, 4), (2, 8), (4, 8), (4, 16)]
    for za in ((True,) if big else (True, False)):  # 2.7b's z stride (10576) is a multiple of 16 already
        for r, w in fwd_rw:
            jobs.append(("fwd", dict(z_align=za, fwd_rows=r, fwd_warps=w)))
    bwd_rw = [(1, 8), (1, 16), (2, 8), (2, 16)] if big else [(1, 4), (1, 8), (2, 4), (2, 8), (4, 8)]
    for r, w in bwd_rw:
        for per_sm in (1, 2, 4):
            jobs.append(("bwd", dict(bwd_rows=r, bwd_warps=w, bwd_progs_per_sm=per_sm)))
    return jobs


def norm_sweep(name, M, d_ssm, ngroups, d_in_proj, compile_part=None):
    """Time each launch variant of the gated norm's forward and backward kernels alone (GPU ms, profiler), check each
    against float64, and return the best overrides (forward phase, then backward phase on the best forward)."""
    gs = d_ssm // ngroups
    cfg0 = dict(rmsnorm_gated.CONFIG)
    jobs = norm_sweep_jobs(name)
    if compile_part is not None:
        i, n = compile_part
        jobs, M = jobs[i::n], 256
    x = randn(M, d_ssm, scale=2.0).to(DT)
    z = randn(M, d_in_proj).to(DT)[:, :d_ssm]
    w = (1 + 0.1 * randn(d_ssm)).to(DT)
    g = randn(M, d_ssm).to(DT)
    eps = 1e-5

    def fwd():
        return rmsnorm_gated._norm_fwd(x, z, w, eps, gs, False)

    def bwd(rstd):
        return rmsnorm_gated._norm_bwd(g, x, z, w, rstd, eps, gs, False)

    if compile_part is not None:
        for phase, over in jobs:
            rmsnorm_gated.CONFIG.update(over)
            try:
                bwd(fwd()[1])
            except Exception:
                traceback.print_exc()
            rmsnorm_gated.CONFIG.clear()
            rmsnorm_gated.CONFIG.update(cfg0)
        torch.cuda.synchronize()
        return {}

    refs = [t.detach().double().requires_grad_() for t in (x, z, w)]
    rout = reference.gated_rmsnorm(*refs, eps, gs, False)
    rgrads = torch.autograd.grad((rout * g.double()).sum(), refs)
    rout = rout.detach()
    del refs

    def run(phase, over, n=20):
        rmsnorm_gated.CONFIG.clear()
        rmsnorm_gated.CONFIG.update(cfg0)
        rmsnorm_gated.CONFIG.update(over)
        try:
            out, rstd = fwd()
            if phase == "fwd":
                errs = [rel(out, rout)]
                ms = gpu_ms(fwd, n=n)
            else:
                errs = [rel(a, r) for a, r in zip(bwd(rstd), rgrads)]
                ms = gpu_ms(lambda: bwd(rstd), n=n)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a variant that fails to compile or run is reported and skipped
            print(f"[norm sweep {name}] {phase} {_cfg_str(over)}: {type(e).__name__}: {str(e)[:300]}")
            ms, errs = float("nan"), [float("nan")]
        finally:
            rmsnorm_gated.CONFIG.clear()
            rmsnorm_gated.CONFIG.update(cfg0)
        ok = all(e < 1e-2 for e in errs)  # NaN fails
        SWEEP_RESULTS.append((name, phase, over, ms, errs, ok))
        print(f"[norm sweep {name}] {phase} {_cfg_str(over)}: {ms:.4f} ms, errors {['%.1e' % e for e in errs]}",
              flush=True)
        return ms if ok else float("inf")

    def best_of(phase, cands, base=None):
        timed = sorted(((run(phase, {**(base or {}), **c}), i) for i, c in enumerate(cands)))
        # re-time the three fastest with more calls; the best re-time wins
        top = [(run(phase, {**(base or {}), **cands[i]}, n=50), i) for _, i in timed[:3]]
        return {**(base or {}), **cands[min(top)[1]]}

    fwd_best = best_of("fwd", [o for p, o in jobs if p == "fwd"])
    base = {"z_align": fwd_best["z_align"]}
    bwd_best = best_of("bwd", [o for p, o in jobs if p == "bwd"], base)
    # structural extras on the best backward: a pipelined row loop, 3 programs per SM (run 1 also timed two column
    # blocks per group, recomputing rstd and torch's sum for dw: all lost, removed)
    extras = [dict(bwd_stages=2), dict(bwd_progs_per_sm=3)]
    bwd_best = best_of("bwd", [{}] + extras, bwd_best)
    return {**fwd_best, **bwd_best}


# ---------------------------------------------------------------------------------------------------------------
def ce_unfused(h, w, labels):
    return F.cross_entropy((h @ w.t()).float(), labels, ignore_index=-100)


def ce_fused(h, w, labels):
    return cross_entropy.linear_cross_entropy(h, w, labels, -100, "mean")


def bench_ce(name, N, d, V):
    shape = f"{name}: hidden ({N}, {d}), weight ({V}, {d})"
    h = randn(N, d).to(DT).requires_grad_()
    w = randn(V, d, scale=d ** -0.5 * 2).to(DT).requires_grad_()
    labels = torch.randint(0, V, (N,), device=DEV)
    labels[torch.rand(N, device=DEV) < 0.1] = -100

    # correctness against float64 (rows chunked to keep the float64 logits small)
    rh, rw = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rloss = F.cross_entropy(rh @ rw.t(), labels, ignore_index=-100)
    rgh, rgw = torch.autograd.grad(rloss, (rh, rw))
    del rh, rw
    for impl, f in (("fused", ce_fused), ("unfused", ce_unfused)):
        loss = f(h, w, labels)
        gh, gw = torch.autograd.grad(loss, (h, w))
        ERRS.append(("cross_entropy", name, f"{impl}: loss abs err", abs(loss.item() - rloss.item()), float("nan")))
        ERRS.append(("cross_entropy", name, f"{impl}: dhidden", rel(gh, rgh), float("nan")))
        ERRS.append(("cross_entropy", name, f"{impl}: dweight", rel(gw, rgw), float("nan")))
        del gh, gw, loss
    del rgh, rgw
    for impl, f in (("fused (chunked, Triton)", ce_fused), ("unfused (matmul + F.cross_entropy)", ce_unfused)):
        with torch.no_grad():
            fwd = bench(lambda: f(h, w, labels))
        fb = bench(lambda: torch.autograd.grad(f(h, w, labels), (h, w)))
        mem = peak_mib(lambda: torch.autograd.grad(f(h, w, labels), (h, w)))
        ROWS.append(("cross_entropy", shape, impl, fwd, fb, float("nan"), gpu_ms(
            lambda: torch.autograd.grad(f(h, w, labels), (h, w)), n=3), mem))


# ---------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", default=None, help="folder holding mamba_ssm's source (.peers)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", default="conv,norm,ce")
    ap.add_argument("--conv-sweep", action="store_true", help="time the conv backward's launch variants")
    ap.add_argument("--sweep", action="store_true", help="sweep the gated norm's launch variants first")
    ap.add_argument("--sweep-compile", default=None, help="I/N: compile sweep variants I, I+N, ... and exit")
    args = ap.parse_args()
    if args.conv_sweep:
        CONV_SWEEP.extend(CONV_SWEEP_SET)
    torch.manual_seed(0)
    if args.sweep_compile:
        i, n = (int(v) for v in args.sweep_compile.split("/"))
        for name, d_ssm, d_in_proj in (("mamba2-130m", 1536, 3352), ("mamba2-2.7b", 5120, 10576)):
            norm_sweep(name, 0, d_ssm, 1, d_in_proj, compile_part=(i, n))
        return
    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if not SMOKE else "cpu (TRITON_INTERPRET=1)"}
    if not SMOKE:  # the memory-bandwidth ceiling: a device-to-device copy, bytes read + written
        src = torch.empty(1 << 29, device=DEV, dtype=torch.uint8).random_()
        dst = torch.empty_like(src)
        ms = bench(lambda: dst.copy_(src))
        env["copy_GBps"] = round(2 * src.numel() / ms / 1e6, 1)
        del src, dst
    print(env, flush=True)
    only = args.only.split(",")
    # (name, batch, seqlen, d_model, d_inner, ngroups, d_state, nheads, vocab)
    models = [("mamba2-130m", 8, 2048, 768, 1536, 1, 128, 24, 50288),
              ("mamba2-2.7b", 8, 2048, 2560, 5120, 1, 128, 80, 50288)]
    if SMOKE:
        models = [("smoke", 2, 40, 16, 32, 2, 8, 4, 300)]
    peer_fn = load_mamba_rmsnorm(args.peers) if "norm" in only else None
    for name, b, L, dm, di, ng, ds, nh, V in models:
        conv_dim = di + 2 * ng * ds
        d_in_proj = 2 * di + 2 * ng * ds + nh
        for section, fn in (("conv", lambda: bench_conv(name, b, L, di, conv_dim, nh)),
                            ("norm", lambda: bench_norm_swept(args, name, b * L, di, ng, d_in_proj, peer_fn)),
                            ("ce", lambda: bench_ce(name, b * L, dm, V))):
            if section not in only:
                continue
            try:
                t0 = time.time()
                fn()
                print(f"[{section} {name}] done in {time.time() - t0:.1f} s", flush=True)
            except Exception:
                traceback.print_exc()
            if not SMOKE:
                torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "bench_small_kernels.json", "w") as f:
        json.dump({"env": env, "rows": ROWS, "errors": ERRS, "norm_sweep_chosen": SWEEP,
                   "norm_sweep": SWEEP_RESULTS}, f, indent=1)
    env["fp32_addmm"] = {str(k): v for k, v in cross_entropy._FP32_ADDMM.items()}
    print(env)
    print("\n| op | shape | impl | fwd ms | fwd+bwd ms | fwd GPU ms | fwd+bwd GPU ms | peak MiB (fwd+bwd) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for sec, shape, impl, fwd, fb, fg, fbg, mem in ROWS:
        print(f"| {sec} | {shape} | {impl} | {fwd:.3f} | {fb:.3f} | {fg:.3f} | {fbg:.3f} | {mem:.0f} |")
    print("\n| op | model | quantity | ours | unfused bf16 path |")
    print("|---|---|---|---:|---:|")
    for sec, name, q, a, u in ERRS:
        print(f"| {sec} | {name} | {q} | {a:.2e} | {u:.2e} |")
    for name, best in SWEEP:
        print(f"norm sweep {name} chosen: {_cfg_str(best)}")


if __name__ == "__main__":
    main()
