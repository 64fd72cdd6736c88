"""FSDP2 on one GPU against the same model without it: tokens/s and peak memory of a training step (zero grads,
loss under bf16 autocast, backward, global-norm clipping, AdamW step), with activation checkpointing off and on,
and FSDP's two mixed-precision layouts (the matrices as bf16 units beside float32 SSM scalars, or one bf16 unit
per block), for mamba2-1.3b and mamba2-2.7b at sequence length 2048.

    python benchmarks/bench_fsdp.py --out benchmarks/results/fsdp.json [--models mamba2-1.3b mamba2-2.7b]

The model is what `lit_mamba2.parallel.parallelize` makes of it (what `trainer.strategy: fsdp` trains): FSDP2 on a
1-rank mesh (NCCL) still gathers, casts and reduces, so the ratio to the plain model is FSDP2's own cost on one
device. The weights are random (drawn on the GPU: speed does not depend on them). A configuration that does not fit
is reported as "OOM".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.parallel import ParallelDims, ShardingPolicy, parallelize
from lit_mamba2.training.module import param_groups


def measure(name: str, batch: int, seqlen: int, fsdp: bool, checkpointing: bool, fp32_scalars: bool, mesh,
            steps: int) -> dict:
    cfg = Mamba2Config.from_name(name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Mamba2LMHeadModel(cfg)
    policy = ShardingPolicy(param_dtype=torch.bfloat16, fp32_scalars=fp32_scalars)
    model = parallelize(model, mesh if fsdp else None, policy, activation_checkpointing=checkpointing)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (batch, seqlen + 1), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    row = dict(model=name, batch=batch, seqlen=seqlen, fsdp=fsdp, activation_checkpointing=checkpointing,
               fp32_scalars=fp32_scalars if fsdp else None)
    try:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            loss = step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1e3
        row.update(step_ms=ms, tokens_per_s=batch * seqlen / ms * 1e3,
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30, loss=float(loss))
    except torch.OutOfMemoryError:
        row.update(step_ms=None, tokens_per_s=None, peak_gib=None, oom=True)
    del model, opt
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mamba2-1.3b", "mamba2-2.7b"])
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 2], help="per model")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out")
    a = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    mesh = ParallelDims.resolve(1).build_mesh("cuda").fsdp
    rows = []
    for name, batch in zip(a.models, a.batch):
        for fsdp, fp32_scalars in ((False, True), (True, True), (True, False)):
            for checkpointing in (False, True):
                rows.append(measure(name, batch, a.seqlen, fsdp, checkpointing, fp32_scalars, mesh, a.steps))
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
