"""`lit-mamba2 pretrain --trainer.strategy fsdp --parallel.cp N` through torchrun on CPU (gloo): a hybrid model
(Mamba-2 and attention layers) trained on rows cut into cp slices logs what one process with the same global batch
logs, with cp alone and with dp_shard × cp (and activation checkpointing), and its checkpoint resumes without context
parallelism."""

import shutil

import pytest

from test_fsdp_cli import args, logged, pretrain

ONE = ["--model.name", "mamba2attn-test", "--sample.max_new_tokens", "0"]  # one process, Lightning's default
FSDP = [*ONE, "--trainer.strategy", "fsdp"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: 3 steps on one process, batch 4 (the global batch of every layout below)."""
    tmp_path = tmp_path_factory.mktemp("cp_cli")
    pretrain(tmp_path, 1, *args(tmp_path, "one", 3, 4, *ONE))
    return tmp_path


def test_cp_two_ranks_log_one_process_and_resume_with_cp_one(tmp_path, one_process):
    out = pretrain(tmp_path, 2, *args(tmp_path, "cp", 3, 4, *FSDP, "--parallel.cp", "2", "--parallel.dp_shard", "1"))
    assert "parallel layout: dp_replicate=1 dp_shard=1 cp=2 tp=1 (world 2), tokens per rank 32 of 64 per row" in out
    (one, one_val), (cp, cp_val) = logged(one_process, "one"), logged(tmp_path, "cp")
    assert sorted(cp) == [0, 1, 2] and cp == pytest.approx(one, rel=1e-5)
    assert len(cp_val) == 1 and cp_val == pytest.approx(one_val, rel=1e-5)

    # the cp = 2 run's checkpoint continues on one process (cp = 1) as the one-process run's own checkpoint does
    shutil.copytree(one_process / "one", tmp_path / "one")
    pretrain(tmp_path, 1, *args(tmp_path, "cp", 5, 4, *FSDP, "--resume", "true"))
    pretrain(tmp_path, 1, *args(tmp_path, "one", 5, 4, *ONE, "--resume", "true"))
    continued = logged(tmp_path, "one", 1)[0]
    assert sorted(continued) == [3, 4]
    assert logged(tmp_path, "cp", 1)[0] == pytest.approx(continued, rel=1e-5)


def test_dp_shard_times_cp_logs_one_process(tmp_path, one_process):
    # (with activation checkpointing: the blocks' recomputation in backward exchanges the states again)
    pretrain(tmp_path, 4, *args(tmp_path, "dpcp", 3, 2, *FSDP, "--parallel.cp", "2", "--parallel.dp_shard", "2",
                                "--trainer.activation_checkpointing", "true"))
    (one, one_val), (dpcp, dpcp_val) = logged(one_process, "one"), logged(tmp_path, "dpcp")
    assert sorted(dpcp) == [0, 1, 2] and dpcp == pytest.approx(one, rel=1e-5)
    assert dpcp_val == pytest.approx(one_val, rel=1e-5)
