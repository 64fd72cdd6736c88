"""torch.compile(model.loss) against eager: the loss and every parameter group's gradient from the same weights and
batch, and the time of a training step (forward + backward) each way.

    python benchmarks/check_compile_gpu.py                      # mamba2-130m, fp32 weights, 8 x 2048, bf16 autocast
    python benchmarks/check_compile_gpu.py --batch 2 --seqlen 512 --docs 3   # smaller, packed documents (seq_idx)
    # CPU, the PyTorch path (no Triton):
    python benchmarks/check_compile_gpu.py --device cpu --preset mamba2-test --batch 2 --seqlen 64
    # CPU, the Triton kernels' custom ops under the interpreter, through torch.compile's fake kernels and AOT autograd:
    TRITON_INTERPRET=1 python benchmarks/check_compile_gpu.py --device cpu --preset mamba2-test --impl triton \\
        --batch 2 --seqlen 40 --docs 2 --warmup 0 --steps 1

Exits 1 when the compiled loss or a gradient is outside the tolerances below (or not finite); --fullgraph makes a
graph break an error too. On CUDA the custom ops stay opaque to inductor (fallback kernels), so both runs execute
the same Triton kernels; inductor compiles the code around them (norms, residual adds, casts, the embedding) and
asserts at run time that each custom op's outputs have the sizes and strides its fake kernel gave (the check that
caught causal_conv1d_bwd's weight gradient; tests/kernels/test_opcheck.py checks every fake on CPU). The last
command above, on CPU under the interpreter, runs that same check: with causal_conv1d_bwd's old fake it failed as on
the H100 ("expected size 192==192, stride 1==4 at dim=0 ... causal_conv1d_bwd"). Inductor's caches are off unless
--cache: their keys do not cover a custom op's fake kernel, so a graph cached before a fix keeps the old strides.

On CPU with torch 2.13, --docs on the PyTorch path aborts (heap corruption) in inductor's C++ backward of the
reference conv's masked unfold windows, in plain torch too (unfold, mask, sum; compiled backward): a torch bug, not
this model's; the Triton path under the interpreter (custom ops) is not affected.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

import torch
import torch._functorch.config
import torch._inductor.config

from lit_mamba2 import Mamba2Config
from lit_mamba2.model import Mamba2LMHeadModel

# Tolerances, compiled against eager (both bf16 autocast with fp32 weights). The Triton ops, the matmuls and the
# fused loss run the same kernels both ways; what differs is inductor's code around them: it fuses elementwise
# chains and reductions (RMSNorm, residual adds, casts) in float32 in another order, so an activation that eager
# rounds to bf16 can round one ulp (2^-8 relative) the other way. Such flips, carried through 24 layers, move a
# gradient by ~1e-3-1e-2 relative (on an H100, eager Triton against the PyTorch reference, different kernels
# altogether, stays within check_ssd_gpu.py's 3e-2). A wrong layout, a stale buffer or a missing term moves the
# affected tensor by O(1): cosine near 0, relative difference near 1. Hence, per parameter (each layer's tensor
# separately, so that one bad layer cannot hide among 24 good ones):
GRAD_MIN_COSINE = 0.99  # cosine similarity of the compiled and eager gradients
GRAD_MAX_REL = 5e-2  # ||g_compiled - g_eager|| / ||g_eager||
# The loss is a mean over batch x seqlen tokens, so rounding differences average out (expected ~1e-4). At init it
# is close to ln(vocab) whatever the layers do, so it is the weaker check; the gradients are the strong one.
LOSS_MAX_REL = 1e-2


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(cfg, batch, seqlen, docs, device, seed):
    """Random tokens (input_ids, labels shifted by one) and, with docs > 1, seq_idx: docs documents per row cut at
    random places (int32)."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, cfg.vocab_size, (batch, seqlen + 1), generator=g)
    seq_idx = None
    if docs > 1:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
        for i in range(batch):
            for cut in (torch.randperm(seqlen - 1, generator=g)[:docs - 1] + 1).tolist():
                seq_idx[i, cut:] += 1
        seq_idx = seq_idx.to(device)
    return toks[:, :-1].to(device), toks[:, 1:].to(device), seq_idx


def group_name(name):
    """A parameter's group: its name with the layer index replaced by *."""
    return re.sub(r"\.\d+\.", ".*.", name)


def step(fn, model, batch, autocast_dtype, device):
    """One training step's forward + backward; returns the loss (detached)."""
    model.zero_grad(set_to_none=True)
    ids, labels, seq_idx = batch
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = fn(ids, labels, seq_idx=seq_idx)
    loss.backward()
    return loss.detach()


def grads_of(model):
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def compare(eager, compiled):
    """Per parameter: (cosine, relative L2 difference, max |difference| / max |eager|), in float64."""
    out = {}
    for name, ge in eager.items():
        gc = compiled[name]
        if ge is None or gc is None:
            out[name] = None if ge is None and gc is None else (float("nan"),) * 3
            continue
        ge, gc = ge.double().flatten(), gc.double().flatten()
        ne, nc = ge.norm().item(), gc.norm().item()
        if ne == 0.0 and nc == 0.0:
            out[name] = (1.0, 0.0, 0.0)
            continue
        cos = (ge @ gc).item() / max(ne * nc, 1e-300)
        rel = (gc - ge).norm().item() / max(ne, 1e-300)
        mx = (gc - ge).abs().max().item() / max(ge.abs().max().item(), 1e-300)
        out[name] = (cos, rel, mx)
    return out


def time_steps(fn, model, batch, autocast_dtype, device, warmup, steps):
    """Median and all step times in ms (forward + backward, synchronized), after `warmup` untimed steps."""
    for _ in range(warmup):
        step(fn, model, batch, autocast_dtype, device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step(fn, model, batch, autocast_dtype, device)
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mamba2-130m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--docs", type=int, default=0, help="documents per row (> 1: packed, with seq_idx)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--impl", default=None, choices=["torch", "triton"],
                    help="force the ops' implementation (default: Triton on CUDA, PyTorch on CPU; triton on CPU "
                         "needs TRITON_INTERPRET=1)")
    ap.add_argument("--autocast", default="bf16", choices=["bf16", "fp16", "none"])
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune, ...)")
    ap.add_argument("--fullgraph", action="store_true", help="make a graph break an error")
    ap.add_argument("--cache", action="store_true",
                    help="allow inductor's FX graph and AOTAutograd caches (off by default: their keys do not cover "
                         "a custom op's fake kernel, so a cached graph can keep the strides an older fake gave)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (each way)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (each way); 0: no timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the report as JSON")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu (with a small --preset, e.g. mamba2-test)")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.autocast]
    torch.manual_seed(args.seed)
    cfg = Mamba2Config.from_name(args.preset)
    model = Mamba2LMHeadModel(cfg).to(device)  # fp32 weights
    if args.impl is not None:
        model.set_impl(args.impl)
    batch = make_batch(cfg, args.batch, args.seqlen, args.docs, device, args.seed + 1)
    path = args.impl or ("triton" if device.type == "cuda" else "torch")
    print(f"{args.preset} ({model.num_parameters() / 1e6:.1f}M parameters, fp32), batch {args.batch} x seqlen "
          f"{args.seqlen}{f', {args.docs} documents per row' if args.docs > 1 else ''}, autocast {args.autocast}, "
          f"ops: {path}{' (TRITON_INTERPRET=1)' if os.environ.get('TRITON_INTERPRET') == '1' else ''}, "
          f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")

    # eager
    loss_e = step(model.loss, model, batch, autocast_dtype, device).double().item()
    grads_e = grads_of(model)

    # compiled, from the same weights (the same module; no optimizer step in between) on the same batch
    if not args.cache:
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model.loss, backend=args.backend, mode=args.mode, fullgraph=args.fullgraph)
    sync(device)
    t0 = time.perf_counter()
    loss_c = step(compiled, model, batch, autocast_dtype, device).double().item()
    sync(device)
    compile_s = time.perf_counter() - t0
    grads_c = grads_of(model)
    counters = torch._dynamo.utils.counters
    graph_breaks = dict(counters["graph_break"])
    n_graphs = counters["stats"].get("unique_graphs", None)

    # compare
    loss_rel = abs(loss_c - loss_e) / max(abs(loss_e), 1e-300)
    per_param = compare(grads_e, grads_c)
    groups = {}
    for name, m in per_param.items():
        groups.setdefault(group_name(name), []).append((name, m))
    failures = []
    if not (math.isfinite(loss_c) and loss_rel <= LOSS_MAX_REL):
        failures.append(f"loss: eager {loss_e:.6f}, compiled {loss_c:.6f}, relative difference {loss_rel:.2e} "
                        f"(max {LOSS_MAX_REL:g})")
    print(f"\nloss: eager {loss_e:.6f}  compiled {loss_c:.6f}  relative difference {loss_rel:.2e}  "
          f"(max {LOSS_MAX_REL:g})")
    print(f"first compiled step (compile + run): {compile_s:.1f} s; graphs {n_graphs}, graph breaks "
          f"{sum(graph_breaks.values())}")
    for reason, count in graph_breaks.items():
        print(f"  graph break x{count}: {reason[:200]}")
    print(f"\ngradients, per group the worst parameter (pass: cosine >= {GRAD_MIN_COSINE}, relative L2 difference "
          f"<= {GRAD_MAX_REL:g}); max |diff| / max |eager| for information")
    print(f"{'group':<44} {'params':>6} {'min cosine':>11} {'max rel L2':>11} {'max |diff|/max':>15}")
    report_groups = {}
    for gname, items in groups.items():
        present = [(n, m) for n, m in items if m is not None]
        if not present:
            print(f"{gname:<44} {len(items):>6}   (no gradient either way)")
            continue
        worst_cos = min(present, key=lambda nm: nm[1][0] if math.isfinite(nm[1][0]) else -math.inf)
        worst_rel = max(present, key=lambda nm: nm[1][1] if math.isfinite(nm[1][1]) else math.inf)
        max_mx = max(m[2] for _, m in present)
        bad = [(n, m) for n, m in present if not (m[0] >= GRAD_MIN_COSINE and m[1] <= GRAD_MAX_REL)]  # nan fails
        flag = "  FAIL" if bad else ""
        print(f"{gname:<44} {len(items):>6} {worst_cos[1][0]:>11.6f} {worst_rel[1][1]:>11.2e} {max_mx:>15.2e}{flag}")
        for n, m in bad:  # nan: a gradient on one side only
            failures.append(f"gradient of {n}: cosine {m[0]:.6f}, relative L2 difference {m[1]:.2e}")
        report_groups[gname] = dict(params=len(items), min_cosine=worst_cos[1][0], worst_cosine_param=worst_cos[0],
                                    max_rel=worst_rel[1][1], worst_rel_param=worst_rel[0], max_abs_over_max=max_mx)

    # timing
    timing = None
    if args.steps > 0:
        eager_ms, eager_all = time_steps(model.loss, model, batch, autocast_dtype, device, args.warmup, args.steps)
        comp_ms, comp_all = time_steps(compiled, model, batch, autocast_dtype, device, args.warmup, args.steps)
        timing = dict(eager_ms=eager_ms, compiled_ms=comp_ms, compiled_over_eager=comp_ms / eager_ms,
                      eager_all_ms=eager_all, compiled_all_ms=comp_all)
        tokens = args.batch * args.seqlen
        print(f"\nstep time (forward + backward, median of {args.steps} after {args.warmup} warmup): eager "
              f"{eager_ms:.2f} ms ({tokens / eager_ms * 1e3:,.0f} tok/s), compiled {comp_ms:.2f} ms "
              f"({tokens / comp_ms * 1e3:,.0f} tok/s); compiled / eager = {comp_ms / eager_ms:.3f} "
              f"({eager_ms / comp_ms:.2f}x)")

    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(preset=args.preset, batch=args.batch, seqlen=args.seqlen, docs=args.docs,
                           device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           impl=path, autocast=args.autocast, backend=args.backend, mode=args.mode,
                           torch_version=torch.__version__, loss_eager=loss_e, loss_compiled=loss_c,
                           loss_rel=loss_rel, compile_s=compile_s, graphs=n_graphs, graph_breaks=graph_breaks,
                           grads=report_groups, timing=timing, failures=failures), f, indent=1)
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    if not args.fullgraph and graph_breaks:
        print("(graph breaks above: run with --fullgraph to make them an error)")
    print("\nOK: compiled matches eager within the tolerances")


if __name__ == "__main__":
    main()
