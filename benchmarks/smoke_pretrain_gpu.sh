#!/usr/bin/env bash
# GPU smoke run of the real recipe path: recipes/pretrain/mamba2-130m.yaml through `python -m lit_mamba2 pretrain`
# (Lightning, bf16-mixed, the Triton kernels, token shards, periodic checkpoints, resume) on synthetic token shards.
# The data is a random sparse Markov chain over 50,000 ids (4 likely successors each), so the loss can fall far below
# ln(50277) = 10.8 within a few dozen steps.
# Usage: bash benchmarks/smoke_pretrain_gpu.sh [workdir [extra overrides...]]
set -euo pipefail
work=${1:-/tmp/lit-mamba2-smoke}
extra=("${@:2}")
rm -rf "$work" && mkdir -p "$work"
python3 - "$work/shards" <<'EOF'
import sys
import numpy as np
from lit_mamba2.training.data import write_token_shard
rng = np.random.default_rng(0)
vocab, n = 50000, 3_000_000
succ = rng.integers(1, vocab, size=(vocab, 4))
choice = rng.choice(4, size=n, p=[0.55, 0.25, 0.15, 0.05])
ids = np.empty(n, dtype=np.int64)
ids[0] = 1
for t in range(1, n):
    ids[t] = succ[ids[t - 1], choice[t]]
ids[rng.choice(n, size=n // 4000, replace=False)] = 0  # document ends (eos = 0)
write_token_shard(sys.argv[1], "train0", ids, "uint16", 0)
print(f"wrote {n:,} tokens")
EOF
common=(--config recipes/pretrain/mamba2-130m.yaml --tokenizer byte --data.paths "[$work/shards]" --data.val_paths "[]"
        --data.global_batch_size null --data.val_fraction 0.02 --trainer.devices 1 --trainer.num_nodes 1
        --data.batch_size 8 --trainer.accumulate_grad_batches 1 --optim.warmup_steps 10
        --trainer.val_every_n_steps 20 --trainer.limit_val_batches 4 --trainer.save_every_n_steps 20
        --trainer.log_every_n_steps 5 --trainer.out_dir "$work/run" --trainer.progress_bar false
        --sample.max_new_tokens 16 --sample.prompt "ab" --data.num_workers 2 --trainer.strategy auto "${extra[@]}")
python3 -m lit_mamba2 pretrain "${common[@]}" --trainer.max_steps 40
echo "--- resume from step 40 to 60"
python3 -m lit_mamba2 pretrain "${common[@]}" --trainer.max_steps 60 --resume true
python3 - "$work/run" <<'EOF'
import csv, glob, sys
rows = [r for f in sorted(glob.glob(sys.argv[1] + "/logs/*/metrics.csv")) for r in csv.DictReader(open(f))]
for r in rows:
    if r.get("train/loss") or r.get("val/loss"):
        print({k: v for k, v in r.items() if v and k in ("step", "train/loss", "val/loss", "train/tokens_per_s")})
EOF
