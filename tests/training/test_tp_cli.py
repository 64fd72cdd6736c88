"""`lit-mamba2 pretrain --trainer.strategy fsdp --parallel.tp 2` through torchrun on CPU (gloo): tensor parallelism
inside FSDP2 logs the losses of one plain process (gradient clipping on), writes a sharded checkpoint of whole
tensors that resumes with tp = 2 and with tp = 1 as the uninterrupted run continues, and that converts to
transformers' format with the logits of transformers' own Mamba2ForCausalLM."""

import shutil

import pytest
import torch

from lit_mamba2.checkpoints import convert, is_sharded_checkpoint, load
from lit_mamba2.model import Mamba2LMHeadModel

from test_fsdp_cli import args, logged, pretrain

# ngroups 1: B, C shared by both ranks and the gated norm's sums all-reduced (the published checkpoints' case)
MODEL = ["--model.ssm_cfg.ngroups", "1", "--optim.schedule", "constant", "--sample.max_new_tokens", "0"]
TP = ["--trainer.strategy", "fsdp", "--parallel.dp_shard", "1"]


def test_tp2_logs_one_process_resumes_on_tp1_and_converts(tmp_path):
    pretrain(tmp_path, 1, *args(tmp_path, "one", 5, 4, *MODEL))
    out = pretrain(tmp_path, 2, *args(tmp_path, "tp2", 3, 4, *MODEL, *TP, "--parallel.tp", "2"))
    assert "parallel layout: dp_replicate=1 dp_shard=1 cp=1 tp=2 (world 2)" in out
    (one, one_val), (tp2, tp2_val) = logged(tmp_path, "one"), logged(tmp_path, "tp2")
    assert sorted(tp2) == [0, 1, 2] and tp2 == pytest.approx({s: one[s] for s in tp2}, rel=1e-5)
    assert tp2_val == pytest.approx(one_val[:1], rel=1e-5) and len(tp2_val) == 1
    sharded = tmp_path / "tp2" / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(sharded)

    # the whole tensors are written (mamba_ssm's names and shapes): converted to transformers' format before the
    # resumes below replace the checkpoint
    convert(Mamba2LMHeadModel, sharded, tmp_path / "hf", "hf")
    ours = load(Mamba2LMHeadModel, sharded).model
    from transformers import Mamba2ForCausalLM

    theirs = Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)

    # resume to step 5 with tp = 2 and, from a copy, with tp = 1 (one process): both continue the plain run
    shutil.copytree(tmp_path / "tp2", tmp_path / "tp2_to_1")
    pretrain(tmp_path, 2, *args(tmp_path, "tp2", 5, 4, *MODEL, *TP, "--parallel.tp", "2", "--resume", "true"))
    pretrain(tmp_path, 1, *args(tmp_path, "tp2_to_1", 5, 4, *MODEL, *TP, "--resume", "true"))
    for out in ("tp2", "tp2_to_1"):
        resumed = logged(tmp_path, out, 1)[0]
        assert sorted(resumed) == [3, 4] and resumed == pytest.approx({s: one[s] for s in resumed}, rel=1e-5), out


def test_the_tp2_recipe_parses_and_splits_its_model():
    from lit_mamba2.cli import parse_recipe
    from lit_mamba2.parallel import ParallelDims
    from lit_mamba2.parallel.tensor import check_tensor_parallel
    from lit_mamba2.training.pretrain import PretrainConfig, build_model_config

    from test_train_cli import RECIPES

    cfg = parse_recipe(PretrainConfig, ["--config", str(RECIPES / "pretrain" / "mamba2-2.7b-tp2.yaml")], "t")
    model_config = build_model_config(cfg.model)
    assert model_config.n_layer == 64 and model_config.ssm.ngroups == 1 and cfg.trainer.strategy == "fsdp"
    check_tensor_parallel(model_config, cfg.parallel.tp)
    dims = ParallelDims.resolve(cfg.trainer.devices * cfg.trainer.num_nodes, **vars(cfg.parallel))
    assert (dims.tp, dims.dp) == (2, 32)
    assert cfg.data.global_batch_size == 256 and 256 % (dims.dp * cfg.data.batch_size) == 0
