"""Tensor parallelism on one GPU: what it adds to a layer and to the loss, and that the tp = 1 path is unchanged.

    python benchmarks/bench_tensor_parallel.py --out tp.json [--bandwidth 400e9 --latency 10e-6]

1. tp = 1 unchanged: a whole mamba2-130m / 370m training step (loss + backward, bf16 autocast, 8 × 2048) through
   `model.loss` as it is now, beside the same step through the call it made before tensor parallelism existed
   (backbone, then ops.linear_cross_entropy without vocab_group), interleaved in one process. Ratio ~1.00 expected.
2. Per layer at mamba2-2.7b's shape (d_model 2560, 80 heads, ngroups 1), 8 × 2048 tokens per rank, tp = 2, 4, 8:
   rank 0's local layer (the real apply_tensor_parallel on a one-rank group: its compute and its collectives'
   launches, no transfer) forward + backward, with the gated norm split across ranks (PyTorch, sum of squares
   all-reduced) and with the Triton norm kernel over the same local channels (what the layer costs without the
   split); then the transfers, computed: ring all-reduce time = latency + 2 (tp - 1) / tp · bytes / bandwidth for
   the block's all-reduces (forward: out_proj's output; backward: in_proj's input gradient; bf16 b·L·d_model
   each), the norm's (float32 b·L per local group, forward and backward) and the loss's (forward: max, then
   sum of exps and label logit, float32 per token; backward: d hidden, b·L·d_model).
3. The loss over vocabulary shards (PyTorch, `vocab_parallel_cross_entropy`, chunked, logits recomputed in the
   backward) at V / tp, beside the fused Triton kernel at V / tp (what a vocabulary-parallel kernel would cost)
   and at the whole V (tp = 1).

Bandwidth and latency default to an H100 node's NVLink as NCCL's all-reduce bus bandwidth reaches it (~400 GB/s)
and a small-message all-reduce (~10 µs); pass the measured ones (nccl-tests all_reduce_perf) to refine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import time_ms  # noqa: E402

from lit_mamba2 import Mamba2Config, Mamba2LMHeadModel, ops  # noqa: E402
from lit_mamba2.model import GatedRMSNorm  # noqa: E402
from lit_mamba2.parallel.tensor import apply_tensor_parallel, vocab_parallel_cross_entropy  # noqa: E402

B, L = 8, 2048


class OneRankOfTP:
    """Rank 0 of a tp group of `tp` ranks, for apply_tensor_parallel, whose collectives run on a one-rank group:
    the local layer's compute and the collectives' launches, without their transfers."""

    def __init__(self, tp: int, group):
        self.tp, self.group = tp, group

    def size(self):
        return self.tp

    def get_local_rank(self):
        return 0

    def get_group(self):
        return self.group

    def _unflatten(self, dim, sizes, names):
        return {names[1]: self}


def step_fn(model, ids, labels, before: bool):
    params = [p for p in model.parameters()]

    def step():
        for p in params:
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if before:  # Mamba2LMHeadModel.loss's fused path before tensor parallelism
                hidden = model.backbone(ids).to(model.lm_head.weight.dtype)
                loss = ops.linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, labels.flatten())
            else:
                loss = model.loss(ids, labels)
        loss.backward()

    return step


def tp1_unchanged(presets):
    out = {}
    for name in presets:
        torch.manual_seed(0)
        model = Mamba2LMHeadModel(Mamba2Config.from_name(name)).cuda()
        ids = torch.randint(0, model.config.vocab_size, (B, L + 1), device="cuda")
        ids, labels = ids[:, :-1], ids[:, 1:].contiguous()
        now, before = step_fn(model, ids, labels, False), step_fn(model, ids, labels, True)
        times = {"now": [], "before": []}
        for _ in range(3):  # interleaved, so that drift hits both
            times["now"].append(time_ms(now))
            times["before"].append(time_ms(before))
        t_now, t_before = min(times["now"]), min(times["before"])
        out[name] = {"step_ms_now": t_now, "step_ms_before": t_before, "ratio": t_now / t_before}
        print(f"tp=1 {name}: step {t_now:.2f} ms now, {t_before:.2f} ms by the earlier call: ratio "
              f"{t_now / t_before:.3f}", flush=True)
        del model
        torch.cuda.empty_cache()
    return out


def allreduce_s(nbytes: float, tp: int, bandwidth: float, latency: float) -> float:
    return latency + 2 * (tp - 1) / tp * nbytes / bandwidth


def layer_fn(block, x, g):
    def run():
        for p in block.parameters():
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden, _ = block(x)
        hidden.backward(g)

    return run


def per_layer(tps, group, bandwidth, latency):
    out = {}
    cfg = Mamba2Config.from_name("mamba2-2.7b", n_layer=1)
    d = cfg.d_model
    for tp in tps:
        torch.manual_seed(0)
        model = apply_tensor_parallel(Mamba2LMHeadModel(cfg), OneRankOfTP(tp, group)).cuda()
        block = model.backbone.layers[0]
        x = torch.randn(B, L, d, device="cuda", requires_grad=True)
        g = torch.randn(B, L, d, device="cuda")
        split_ms = time_ms(layer_fn(block, x, g))
        norm = block.mixer.norm  # the same local channels through the Triton norm, as one group
        norm.__class__ = GatedRMSNorm
        norm.group_size = norm.weight.shape[0]
        plain_ms = time_ms(layer_fn(block, x, g))
        tokens = B * L
        block_ar = 2 * allreduce_s(tokens * d * 2, tp, bandwidth, latency) * 1e3
        norm_ar = 2 * allreduce_s(tokens * 4, tp, bandwidth, latency) * 1e3
        out[tp] = {"layer_ms_split_norm": split_ms, "layer_ms_triton_norm": plain_ms,
                   "block_allreduce_ms": block_ar, "norm_allreduce_ms": norm_ar,
                   "norm_allreduce_share_of_layer": norm_ar / (split_ms + block_ar + norm_ar)}
        print(f"2.7b layer, tp={tp}: local fwd+bwd {split_ms:.3f} ms (split norm) / {plain_ms:.3f} ms (Triton norm); "
              f"transfers: block all-reduces {block_ar:.3f} ms, norm all-reduces {norm_ar:.3f} ms "
              f"({100 * out[tp]['norm_allreduce_share_of_layer']:.1f}% of the layer)", flush=True)
        del model, block
        torch.cuda.empty_cache()
    return out


def loss_costs(tps, group, bandwidth, latency):
    out = {}
    cfg = Mamba2Config.from_name("mamba2-2.7b")
    V, d, N = cfg.padded_vocab_size, cfg.d_model, B * L
    hidden = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, V, (N,), device="cuda")
    for tp in (1, *tps):
        w = (torch.randn(V // tp, d, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
        local = labels.clamp(max=V // tp - 1)

        def fused():
            hidden.grad = w.grad = None
            ops.linear_cross_entropy(hidden, w, local).backward()

        def sharded():
            hidden.grad = w.grad = None
            vocab_parallel_cross_entropy(hidden, w, labels, group=group).backward()

        row = {"fused_ms": time_ms(fused)}
        if tp > 1:
            row["vocab_parallel_ms"] = time_ms(sharded)
            row["allreduce_ms"] = (allreduce_s(N * 4, tp, bandwidth, latency)
                                   + allreduce_s(2 * N * 4, tp, bandwidth, latency)
                                   + allreduce_s(N * d * 2, tp, bandwidth, latency)) * 1e3
            row["logits_allgather_ms_avoided"] = (latency + (tp - 1) / tp * N * V * 2 / bandwidth) * 1e3
        out[tp] = row
        print(f"loss, V/{tp} = {V // tp}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
        del w
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tp.json")
    ap.add_argument("--bandwidth", type=float, default=400e9, help="all-reduce bus bandwidth, bytes/s")
    ap.add_argument("--latency", type=float, default=10e-6, help="small all-reduce latency, s")
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--presets", nargs="+", default=["mamba2-130m", "mamba2-370m"])
    args = ap.parse_args()
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    group = dist.new_group([0])
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": [B, L],
              "bandwidth": args.bandwidth, "latency": args.latency,
              "tp1_unchanged": tp1_unchanged(args.presets),
              "per_layer_2.7b": per_layer(args.tp, group, args.bandwidth, args.latency),
              "loss_2.7b": loss_costs(args.tp, group, args.bandwidth, args.latency)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
