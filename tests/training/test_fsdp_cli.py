"""`lit-mamba2 pretrain --trainer.strategy fsdp` through torchrun on CPU (gloo): the FSDP2 strategy over a parallel
layout logs what one process with the same global batch logs, writes a sharded checkpoint that resumes on another
world size as the plain checkpoint resumes, and that every reader loads."""

import csv
import sys

import pytest
import torch

from lit_mamba2.checkpoints import is_sharded_checkpoint, load
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.training.data import DataConfig
from lit_mamba2.training.pretrain import (ParallelConfig, TrainerConfig, build_strategy, data_parallel_degree,
                                         gradient_accumulation)

from test_train_cli import _free_port, _run


def args(tmp_path, out, steps, batch, *extra):
    return ["--model.name", "mamba2-test", "--data.max_bytes", "60000", "--data.seq_len", "64",
            "--data.val_fraction", "0.1", "--data.cache_dir", str(tmp_path / "cache"), "--data.batch_size", str(batch),
            "--trainer.max_steps", str(steps), "--trainer.val_every_n_steps", "3", "--trainer.limit_val_batches", "2",
            "--trainer.save_every_n_steps", "3", "--trainer.log_every_n_steps", "1", "--trainer.progress_bar",
            "false", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--optim.warmup_steps", "2",
            "--trainer.gradient_clip_val", "0.05", "--trainer.out_dir", str(tmp_path / out), *extra]


def pretrain(tmp_path, nproc, *argv):
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port())] if nproc > 1 else [sys.executable])
    return _run([*launch, "-m", "lit_mamba2", "pretrain", *argv], tmp_path)


def logged(tmp_path, out, version=0):
    rows = list(csv.DictReader(open(tmp_path / out / "logs" / f"version_{version}" / "metrics.csv")))
    train = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    return train, [float(r["val/loss"]) for r in rows if r.get("val/loss")]


def test_fsdp_logs_one_process_and_resumes_on_any_world_size(tmp_path):
    """One global batch of 4 rows: 2 ranks × 2 rows, 1 process × 2 rows × 2 accumulated (data.global_batch_size
    sets the accumulation), log the same losses; the 2-rank sharded checkpoint resumes on 2, 1 and 4 ranks as the
    plain checkpoint resumes on 1 process (on 4 with activation checkpointing). Gradients are clipped by their
    global norm in every run (gradient_clip_val below their norm)."""
    fsdp = ["--trainer.strategy", "fsdp", "--sample.max_new_tokens", "0"]
    global_batch = ["--data.global_batch_size", "4"]
    out = pretrain(tmp_path, 2, *args(tmp_path, "two", 3, 2, *fsdp, *global_batch, "--parallel.dp_shard", "2"))
    assert "parallel layout: dp_replicate=1 dp_shard=2 cp=1 tp=1 (world 2)" in out
    assert "global batch 4 rows (2 × 2 data-parallel ranks × 1 accumulated)" in out
    # (validation: 2 batches of 2 rows on each of 2 ranks, 4 batches on one process: the same 8 rows)
    out = pretrain(tmp_path, 1, *args(tmp_path, "one", 3, 2, *global_batch, "--sample.max_new_tokens", "0",
                                      "--trainer.limit_val_batches", "4"))
    assert "global batch 4 rows (2 × 1 data-parallel ranks × 2 accumulated)" in out
    (one, one_val), (two, two_val) = logged(tmp_path, "one"), logged(tmp_path, "two")
    assert sorted(two) == [0, 1, 2] and two == pytest.approx(one, rel=1e-5)
    assert two_val == pytest.approx(one_val, rel=1e-5) and len(two_val) == 1
    sharded = tmp_path / "two" / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(sharded)
    assert not list((tmp_path / "two" / "checkpoints").glob(".*"))  # the partial folder was renamed into place

    # resume to step 5 on 2, 1 and 4 ranks (fsdp) and the plain checkpoint on 1 process: the same curve
    import shutil

    for out in ("two_to_one", "two_to_four"):
        shutil.copytree(tmp_path / "two", tmp_path / out)
    pretrain(tmp_path, 2, *args(tmp_path, "two", 5, 2, *fsdp, *global_batch, "--resume", "true"))
    pretrain(tmp_path, 1, *args(tmp_path, "two_to_one", 5, 2, *fsdp, *global_batch, "--resume", "true"))
    pretrain(tmp_path, 4, *args(tmp_path, "two_to_four", 5, 1, *fsdp, *global_batch, "--resume", "true",
                                "--trainer.activation_checkpointing", "true"))
    pretrain(tmp_path, 1, *args(tmp_path, "one", 5, 2, *global_batch, "--resume", "true",
                                "--sample.max_new_tokens", "0", "--trainer.limit_val_batches", "4"))
    plain = logged(tmp_path, "one", 1)[0]
    assert sorted(plain) == [3, 4]
    for out in ("two", "two_to_one", "two_to_four"):
        assert logged(tmp_path, out, 1)[0] == pytest.approx(plain, rel=1e-5), out

    # every reader takes the sharded checkpoint: the weights equal the plain run's
    ids = torch.randint(0, 256, (1, 20))
    a = load(Mamba2LMHeadModel, tmp_path / "one" / "checkpoints" / "last.ckpt").model
    b = load(Mamba2LMHeadModel, sharded)
    assert b.format == "ckpt" and b.tokenizer is not None
    torch.testing.assert_close(b.model(ids), a(ids), rtol=1e-4, atol=1e-5)


def test_a_global_batch_the_layout_cannot_reach_is_named():
    data = DataConfig(batch_size=3, global_batch_size=16)
    with pytest.raises(ValueError, match=r"data.global_batch_size = 16 is not a whole number of data.batch_size = 3 "
                                         r"× 2 data-parallel ranks = 6 rows"):
        gradient_accumulation(data, 1, data_parallel_degree("fsdp", ParallelConfig(dp_shard=-1), 2))
    assert gradient_accumulation(DataConfig(batch_size=2, global_batch_size=16), 1,
                                 data_parallel_degree("fsdp", ParallelConfig(dp_replicate=2), 8)) == 1
    assert gradient_accumulation(DataConfig(batch_size=2, global_batch_size=16), 1,
                                 data_parallel_degree("ddp", ParallelConfig(), 2)) == 4
    with pytest.raises(ValueError, match="give data.global_batch_size or trainer.accumulate_grad_batches, not both"):
        gradient_accumulation(DataConfig(batch_size=2, global_batch_size=16), 2, 1)
    with pytest.raises(ValueError, match="data.global_batch_size must be a positive integer"):
        DataConfig(global_batch_size=0)


def test_parallel_degrees_need_the_fsdp_strategy():
    with pytest.raises(ValueError, match=r"parallel.tp = 2 needs trainer.strategy: fsdp \(got 'ddp'\)"):
        build_strategy(TrainerConfig(strategy="ddp"), ParallelConfig(tp=2))
    assert build_strategy(TrainerConfig(strategy="ddp"), ParallelConfig()) == "ddp"
    assert build_strategy(TrainerConfig(strategy="fsdp"), ParallelConfig(tp=2)).degrees["tp"] == 2
    with pytest.raises(ValueError, match=r"data.seq_len = 100 is not divisible by parallel.cp = 8"):
        build_strategy(TrainerConfig(strategy="fsdp"), ParallelConfig(cp=8), seq_len=100)
