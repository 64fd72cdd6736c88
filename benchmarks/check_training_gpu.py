"""GPU check: a short training run of mamba2-130m shapes on the Triton kernels and on the PyTorch reference path,
from the same initial weights on the same batches; their loss curves must match.

    python benchmarks/check_training_gpu.py --steps 60 --out $OUT/training_curves.json

Data: token streams from a random sparse Markov chain (each token has 4 likely successors), so the loss can fall
from ln(vocab) towards the chain's entropy in a few dozen steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.model import Mamba2LMHeadModel


def markov_batches(steps, batch, seqlen, vocab, seed=0, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    probs = torch.tensor([0.55, 0.25, 0.15, 0.05])
    entropy = -(probs * probs.log()).sum().item()
    out = []
    for _ in range(steps):
        toks = torch.empty(batch, seqlen + 1, dtype=torch.long)
        toks[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        choice = torch.multinomial(probs, batch * seqlen, replacement=True, generator=g).view(batch, seqlen)
        for t in range(seqlen):
            toks[:, t + 1] = succ[toks[:, t], choice[:, t]]
        out.append(toks.to(device))
    return out, entropy


def train(model, batches, lr, impl, bf16=True, warmup=10):
    model.set_impl(impl)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    losses = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, toks in enumerate(batches):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(toks[:, :-1], toks[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    torch.cuda.synchronize()
    return [l.item() for l in losses], time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mamba2-130m")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=4096, help="tokens actually used (the embedding stays 50288)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = Mamba2Config.from_name(args.preset)
    base = Mamba2LMHeadModel(cfg).cuda()
    batches, entropy = markov_batches(args.steps, args.batch, args.seqlen, args.vocab)
    # Triton and the reference, both in bf16 autocast; and the reference in float32, whose distance from the bf16
    # reference shows how far bf16 rounding alone moves a loss curve (the yardstick for the first comparison).
    runs = {"triton_bf16": ("triton", True), "torch_bf16": ("torch", True), "torch_fp32": ("torch", False)}
    results = {}
    for name, (impl, bf16) in runs.items():
        model = copy.deepcopy(base)
        losses, seconds = train(model, batches, args.lr, impl, bf16)
        results[name] = dict(losses=losses, seconds=seconds)
        del model
        torch.cuda.empty_cache()

    def gap(a, b):
        d = [abs(x - y) for x, y in zip(results[a]["losses"], results[b]["losses"])]
        return max(d), sum(d) / len(d)

    report = dict(preset=args.preset, device=torch.cuda.get_device_name(), torch_version=torch.__version__,
                  batch=args.batch, seqlen=args.seqlen, steps=args.steps, lr=args.lr, chain_entropy=entropy,
                  ln_vocab=math.log(args.vocab), triton_vs_torch_bf16=gap("triton_bf16", "torch_bf16"),
                  torch_bf16_vs_fp32=gap("torch_bf16", "torch_fp32"), runs=results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    names = list(runs)
    print(f"{'step':>5} " + " ".join(f"{n:>12}" for n in names))
    for i in list(range(0, args.steps, max(1, args.steps // 12))) + [args.steps - 1]:
        print(f"{i:>5} " + " ".join(f"{results[n]['losses'][i]:12.4f}" for n in names))
    print(f"chain entropy {entropy:.4f}, ln(vocab) {math.log(args.vocab):.4f}")
    print("max / mean |Δloss|: triton vs torch (bf16) %.4f / %.4f; torch bf16 vs fp32 %.4f / %.4f"
          % (*report["triton_vs_torch_bf16"], *report["torch_bf16_vs_fp32"]))

if __name__ == "__main__":
    main()
