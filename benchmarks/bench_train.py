"""Training speed of whole models: one forward + backward of the language-model loss, ours (Triton kernels, LM head
fused with the cross-entropy) beside mamba_ssm's `MambaLMHeadModel` (its Triton SSD kernels and norms; with
--cc-build a causal-conv1d built with its backward, its fused conv + scan path; without, its unfused path with
PyTorch's conv) with the same weights on the same batch, in one run on the GPU.

    python benchmarks/bench_train.py --peers .peers [--cc-build BUILD] [--profile] --out train.json

Both models hold float32 parameters and run under bf16 autocast (as Lightning's "bf16-mixed"); mamba_ssm's loss
is `F.cross_entropy` on its float32-cast logits (what its users write). Per model and shape: the median time of a
step (zero grads, loss, backward; CUDA events, after warm-up), tokens/s, peak memory allocated during the step, and
the two losses and gradient norms on the same batch (a parity check at real size: the weights are mamba_ssm's,
loaded into ours by name).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import import_mamba_ssm  # noqa: E402

SHAPES = {"mamba2-130m": (768, 24), "mamba2-370m": (1024, 48), "mamba2-780m": (1536, 48)}


def train_step(params, loss_fn):
    """Zero the gradients, the loss under bf16 autocast, its backward; returns the loss."""
    for p in params:
        p.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn()
    loss.backward()
    return loss


def step_stats(model, loss_fn, iters: int, warmup: int = 3):
    """(median ms, peak MiB allocated above the weights and gradients, loss, gradient norm) of a train_step."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        return train_step(params, loss_fn)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params
                                                      if p.grad is not None])).item()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], peak, loss.item(), grad_norm


def profile_step(model, loss_fn, top: int = 15):
    """The kernels of one step under the CUDA profiler, by total device time (ms)."""
    from torch.profiler import ProfilerActivity, profile

    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(2):
        train_step(params, loss_fn)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_step(params, loss_fn)
        torch.cuda.synchronize()
    totals = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(e.name[:70], [0.0, 0])
            t[0] += e.device_time_total / 1e3 if hasattr(e, "device_time_total") else e.cuda_time_total / 1e3
            t[1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])
    print(f"  profile: {sum(v[0] for v in totals.values()):.1f} ms of kernels in one step")
    for k, (ms, n) in rows[:top]:
        print(f"    {k:<70} {ms:8.2f} ms  x{n}")
    return [dict(kernel=k, ms=ms, calls=n) for k, (ms, n) in rows[:top]]


def run(name, batch, seqlen, args, MambaConfig, MambaLMHeadModel):
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.model import Mamba2LMHeadModel

    d_model, n_layer = SHAPES[name]
    torch.manual_seed(0)
    # without causal-conv1d (or with one built without its backward: benchmarks/build_causal_conv1d.sh) mamba_ssm
    # trains through its unfused path (PyTorch conv, then its SSD kernels): use_mem_eff_path=False
    ssm_cfg = {"layer": "Mamba2", "use_mem_eff_path": args.cc_build is not None}
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277, ssm_cfg=ssm_cfg,
                      rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=16)
    theirs = MambaLMHeadModel(cfg, device="cuda", dtype=torch.float32).train()
    with torch.device("cuda"):
        ours = Mamba2LMHeadModel(Mamba2Config.from_name(name)).train()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"{name}: state dicts differ: missing {missing}, unexpected {unexpected}")
    g = torch.Generator(device="cuda").manual_seed(1)
    toks = torch.randint(0, 50277, (batch, seqlen + 1), device="cuda", generator=g)
    ids, labels = toks[:, :-1], toks[:, 1:]

    def their_loss():
        logits = theirs(ids).logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    row = dict(model=name, batch=batch, seqlen=seqlen, tokens=batch * seqlen)
    if args.profile:
        row["profile_ours"] = profile_step(ours, lambda: ours.loss(ids, labels))
        row["profile_mamba_ssm"] = profile_step(theirs, their_loss)
    for key, model, fn in (("ours", ours, lambda: ours.loss(ids, labels)), ("mamba_ssm", theirs, their_loss)):
        try:
            ms, peak, loss, gnorm = step_stats(model, fn, args.iters)
            row[key] = dict(step_ms=ms, tokens_per_s=batch * seqlen / ms * 1e3, peak_mib=peak, loss=loss,
                            grad_norm=gnorm)
        except Exception as e:  # noqa: BLE001 - one side failing must not lose the other's numbers
            row[key] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        print(name, batch, seqlen, key, row[key], flush=True)
    del ours, theirs
    torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peers", type=Path, default=Path(".peers"), help="folder holding mamba_ssm's source")
    p.add_argument("--cc-build", type=Path, default=None, help="a built causal-conv1d (see bench_decode.py)")
    p.add_argument("--models", nargs="+", default=["mamba2-130m", "mamba2-370m"], choices=list(SHAPES))
    p.add_argument("--shapes", nargs="+", default=["8x2048"], help="batch x seqlen")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="also list each side's kernels of one step")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    print(f"torch {torch.__version__}, triton {__import__('triton').__version__}, {torch.cuda.get_device_name()}")
    MambaConfig, MambaLMHeadModel, conv = import_mamba_ssm(args.peers, args.cc_build)
    print(f"[mamba_ssm] {conv}")
    rows = []
    t0 = time.perf_counter()
    for name in args.models:
        for shape in args.shapes:
            batch, seqlen = (int(v) for v in shape.split("x"))
            rows.append(run(name, batch, seqlen, args, MambaConfig, MambaLMHeadModel))
            if args.out:
                args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                                    triton=__import__("triton").__version__, mamba_ssm=conv,
                                                    rows=rows), indent=2))
    print(f"\n{time.perf_counter() - t0:.0f} s. Step = zero_grad + loss + backward, bf16 autocast, float32 weights.")
    print(f"{'model':<12} {'batch x seqlen':>14} | {'ours ms':>8} {'mamba_ssm ms':>12} {'ratio':>6} | "
          f"{'ours tok/s':>10} | {'ours MiB':>8} {'theirs MiB':>10} | loss ours / theirs, grad norm ours / theirs")
    for r in rows:
        o, t = r.get("ours", {}), r.get("mamba_ssm", {})
        if "step_ms" not in o or "step_ms" not in t:
            print(f"{r['model']:<12} {r['batch']}x{r['seqlen']:<10} | {o.get('error', '')} {t.get('error', '')}")
            continue
        print(f"{r['model']:<12} {str(r['batch']) + 'x' + str(r['seqlen']):>14} | {o['step_ms']:8.2f} "
              f"{t['step_ms']:12.2f} {o['step_ms'] / t['step_ms']:6.2f} | {o['tokens_per_s']:10.0f} | "
              f"{o['peak_mib']:8.0f} {t['peak_mib']:10.0f} | {o['loss']:.4f} / {t['loss']:.4f}, "
              f"{o['grad_norm']:.4f} / {t['grad_norm']:.4f}")


if __name__ == "__main__":
    main()
