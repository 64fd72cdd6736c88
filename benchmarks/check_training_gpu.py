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


def train(model, batches, lr, impl):
    model.set_impl(impl)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    losses = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, toks in enumerate(batches):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(toks[:, :-1], toks[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
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
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = Mamba2Config.from_name(args.preset)
    base = Mamba2LMHeadModel(cfg).cuda()
    batches, entropy = markov_batches(args.steps, args.batch, args.seqlen, args.vocab)
    results = {}
    for impl in ("triton", "torch"):
        model = copy.deepcopy(base)
        losses, seconds = train(model, batches, args.lr, impl)
        results[impl] = dict(losses=losses, seconds=seconds,
                             tokens_per_s=args.steps * args.batch * args.seqlen / seconds)
        del model
        torch.cuda.empty_cache()
    a, b = results["triton"]["losses"], results["torch"]["losses"]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    report = dict(preset=args.preset, device=torch.cuda.get_device_name(), torch_version=torch.__version__,
                  batch=args.batch, seqlen=args.seqlen, steps=args.steps, chain_entropy=entropy,
                  ln_vocab=math.log(args.vocab), max_abs_loss_diff=max(diffs),
                  mean_abs_loss_diff=sum(diffs) / len(diffs), runs=results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"{'step':>5} {'triton':>9} {'torch':>9}")
    for i in list(range(0, args.steps, max(1, args.steps // 12))) + [args.steps - 1]:
        print(f"{i:>5} {a[i]:9.4f} {b[i]:9.4f}")
    print(f"chain entropy {entropy:.4f}, ln(vocab) {math.log(args.vocab):.4f}; max |Δloss| {max(diffs):.4f}, "
          f"mean {report['mean_abs_loss_diff']:.4f}")
    print(f"tokens/s: triton {results['triton']['tokens_per_s']:.0f}, torch reference {results['torch']['tokens_per_s']:.0f}")


if __name__ == "__main__":
    main()
