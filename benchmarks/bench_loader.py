"""Does the token loader keep the GPU fed? The tokens/s of `data.kind: tokens` batches (LMDataModule's DataLoader over
prepared shards, as pretrain builds it) beside the tokens/s of a training step of the model at the same batch shape,
in one run on one GPU.

    python benchmarks/bench_loader.py --out loader.json                     # synthetic shards in --scratch
    python benchmarks/bench_loader.py --data /data/pile-neox/train --out loader.json

Loader: for each data.num_workers in --workers, the tokens/s of batches drawn through the DataLoader and copied to
the GPU (after --warmup batches: worker start-up excluded), from shards in the page cache ("warm") and from shards
evicted from it first ("cold", posix_fadvise DONTNEED; a real corpus larger than memory reads like this), for one
token folder and for a blend of three. Step: the median time of one optimizer step (loss, backward, AdamW) of the
--model preset under bf16 autocast at data.batch_size x data.seq_len, with the loader's seq_idx. The loader keeps
up when its tokens/s exceeds the step's: `ratio` > 1 (each data-parallel rank has its own loader and GPU, so the
per-GPU comparison is the one that matters).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lit_mamba2.training.data import DataConfig, LMDataModule  # noqa: E402
from lit_mamba2.training.shards import ShardWriter, write_token_meta  # noqa: E402


def synthesize(folder: Path, shards: int, shard_tokens: int, vocab: int, seed: int) -> Path:
    """A token folder as prepare writes it: uint16 ids, documents of ~1,000 tokens ending with eos 0."""
    if (folder / "meta.json").exists():
        return folder
    rng = np.random.default_rng(seed)
    entries = []
    for k in range(shards):
        ids = rng.integers(1, vocab, size=shard_tokens, dtype=np.int64)
        ends = np.cumsum(rng.integers(200, 2000, size=shard_tokens // 200))
        ids[ends[ends < shard_tokens]] = 0
        ids[-1] = 0
        w = ShardWriter(folder / f"{k:06d}.bin", "uint16")
        w.write(ids)
        w.commit()
        entries.append({"file": f"{k:06d}.bin", "tokens": shard_tokens, "docs": int((ids == 0).sum())})
    write_token_meta(folder, "uint16", 0, entries, split="train")
    return folder


def evict(folders: list[Path]) -> None:
    """Drop the shards from the page cache (clean pages; no root needed)."""
    for folder in folders:
        for f in folder.glob("*.bin"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def loader_rate(cfg: DataConfig, batches: int, warmup: int) -> dict:
    dm = LMDataModule(cfg, tokenizer=None, max_steps=batches + warmup)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(warmup):
        next(it)["input_ids"].cuda(non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        for k in ("input_ids", "labels", "seq_idx"):
            b[k].cuda(non_blocking=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - start
    return {"tokens_per_s": batches * cfg.batch_size * cfg.seq_len / dt, "batches": batches, "seconds": dt}


def step_rate(model_name: str, batch: dict, iters: int) -> dict:
    from lit_mamba2 import Mamba2Config
    from lit_mamba2.model import Mamba2LMHeadModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Mamba2LMHeadModel(Mamba2Config.from_name(model_name)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids, labels, seq_idx = (batch[k].cuda() for k in ("input_ids", "labels", "seq_idx"))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids, labels, seq_idx=seq_idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = sorted(times)[len(times) // 2]
    return {"step_ms": ms, "tokens_per_s": ids.numel() / ms * 1e3}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=None, help="a token folder (default: synthetic shards in --scratch)")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/bench_loader"))
    p.add_argument("--shards", type=int, default=48, help="synthetic shards per folder")
    p.add_argument("--shard-tokens", type=int, default=16_000_000)
    p.add_argument("--model", default="mamba2-130m")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    if args.data is not None:
        folders = [args.data]
    else:
        folders = [synthesize(args.scratch / f"src{s}", args.shards, args.shard_tokens, 50277, s) for s in range(3)]
    base = dict(kind="tokens", seq_len=args.seq_len, batch_size=args.batch_size, val_fraction=0.0, seed=1)
    layouts = {"one folder": DataConfig(**base, paths=[str(folders[0])])}
    if len(folders) == 3:
        layouts["blend of 3"] = DataConfig(**base, paths=[], blend=[
            {"path": str(f), "weight": w} for f, w in zip(folders, (0.5, 0.3, 0.2))])

    sample = LMDataModule(layouts["one folder"], tokenizer=None, max_steps=1)
    sample.setup("fit")
    first = next(iter(sample.train_dataloader()))
    step = step_rate(args.model, first, args.iters)
    print(f"{args.model} training step, batch {args.batch_size} x {args.seq_len}: {step['step_ms']:.1f} ms, "
          f"{step['tokens_per_s']:,.0f} tokens/s", flush=True)

    rows = []
    for name, cfg in layouts.items():
        for cache in ("warm", "cold"):
            for w in args.workers:
                if cache == "cold":
                    evict(folders)
                cfg.num_workers = w
                r = loader_rate(cfg, args.batches, args.warmup)
                row = dict(layout=name, page_cache=cache, num_workers=w, **r,
                           ratio=r["tokens_per_s"] / step["tokens_per_s"])
                rows.append(row)
                print(f"loader {name:<11} {cache} cache, num_workers={w}: {r['tokens_per_s']:>14,.0f} tokens/s "
                      f"= {row['ratio']:.1f}x the step", flush=True)
    result = {"device": torch.cuda.get_device_name(), "model": args.model, "seq_len": args.seq_len,
              "batch_size": args.batch_size, "step": step, "loader": rows,
              "data": str(args.data) if args.data else f"synthetic: 3 folders x {args.shards} shards x "
                                                        f"{args.shard_tokens:,} tokens"}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
