"""The CLI end to end: recipes, errors, a short pretrain run, SIGTERM + resume, torchrun and fabric run."""

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import lit_mamba2
from lit_mamba2.cli import UsageError, main, parse_recipe
from lit_mamba2.launch import apply_launcher_env
from lit_mamba2 import Mamba2Config
from lit_mamba2.checkpoints import load
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.training.pretrain import (ModelArgs, PretrainConfig, TrainerConfig, build_model_config,
                                         build_strategy, pretrain)

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"


def tiny_args(tmp_path, out="run", steps=8):
    """The built-in default, shrunk: a test-sized model on 60 kB of the standard library."""
    return ["--model.name", "mamba2-test", "--data.max_bytes", "60000", "--data.seq_len", "64",
            "--data.batch_size", "4", "--data.val_fraction", "0.1", "--data.cache_dir", str(tmp_path / "cache"),
            "--trainer.max_steps", str(steps), "--trainer.val_every_n_steps", "4", "--trainer.limit_val_batches", "2",
            "--trainer.save_every_n_steps", "4", "--trainer.log_every_n_steps", "1", "--trainer.progress_bar", "false",
            "--trainer.accelerator", "cpu", "--trainer.out_dir", str(tmp_path / out), "--optim.warmup_steps", "2"]


def test_default_recipe_is_the_builtin_default():
    assert parse_recipe(PretrainConfig, ["--config", str(RECIPES / "default.yaml")], "t") == PretrainConfig()
    assert parse_recipe(PretrainConfig, [], "t") == PretrainConfig()


@pytest.mark.parametrize("recipe", ["default.yaml", "mqar.yaml", "pretrain/mamba2-130m.yaml",
                                    "pretrain/mamba2-370m-long.yaml", "pretrain/mamba2attn-2.7b-long.yaml"])
def test_recipes_parse_and_build_their_model(recipe):
    cfg = parse_recipe(PretrainConfig, ["--config", str(RECIPES / recipe)], "t")
    model_config = build_model_config(cfg.model)
    if cfg.data.kind == "mqar":
        assert model_config.vocab_size >= cfg.data.mqar.vocab_size
    if recipe.endswith("130m.yaml"):
        assert model_config.d_model == 768 and model_config.n_layer == 24
        assert cfg.trainer.precision == "bf16-mixed" and cfg.tokenizer == "EleutherAI/gpt-neox-20b"
    if recipe.endswith("-long.yaml"):  # 256K tokens per row, context-parallel over a node's 8 GPUs
        assert cfg.data.seq_len == 262144 and cfg.parallel.cp == 8 and cfg.trainer.strategy == "fsdp"
        assert build_strategy(cfg.trainer, cfg.parallel, cfg.data.seq_len).degrees["cp"] == 8


def test_overrides_apply_over_the_recipe_and_preset():
    cfg = parse_recipe(PretrainConfig, ["--config", str(RECIPES / "default.yaml"), "--trainer.max_steps", "20",
                                        "--model.name", "mamba2-test", "--model.ssm_cfg", "{d_state: 8}"], "t")
    assert cfg.trainer.max_steps == 20
    mc = build_model_config(cfg.model)
    assert mc.d_model == 64 and mc.ssm.d_state == 8 and mc.ssm.headdim == 16  # preset's other keys kept


def test_model_section_is_a_preset_and_the_typed_fields_given_over_it(capsys):
    """model: a preset name and Mamba2Config's fields, typed as the config's own (ssm_cfg / attn_cfg key by key,
    dotted too); only the fields given reach the preset, so a value equal to mamba_ssm's default still overrides."""
    def model(*argv, recipe="default.yaml"):
        return parse_recipe(PretrainConfig, ["--config", str(RECIPES / recipe), *argv], "t").model

    m = model("--model.name", "mamba2-test", "--model.ssm_cfg.d_state", "128", "--model.n_layer", "3")
    assert m.overrides == {"ssm_cfg": {"d_state": 128}, "n_layer": 3}
    assert (m.config.ssm.d_state, m.config.ssm.headdim, m.config.n_layer) == (128, 16, 3)
    assert m.config == Mamba2Config.from_name("mamba2-test", n_layer=3, ssm_cfg={"d_state": 128})
    mqar = model("--model.ssm_cfg.headdim", "16", recipe="mqar.yaml").config  # name: null, the recipe's fields
    assert (mqar.d_model, mqar.ssm.d_state, mqar.ssm.headdim, mqar.ssm.chunk_size, mqar.ssm.ngroups) == (128, 64, 16,
                                                                                                        64, 1)
    hybrid = model("--model.name", "mamba2-test", "--model.n_layer", "3", "--model.attn_layer_idx", "[1]",
                   "--model.attn_cfg", "{num_heads: 4, rotary_emb_dim: 8}").config
    assert (hybrid.attn_layer_idx, hybrid.attn.num_heads_kv, hybrid.attn.head_dim) == ([1], 4, 16)
    assert ModelArgs("mamba2-test", ssm_cfg={"d_state": 8}).config.ssm.d_state == 8  # the same in Python
    for bad, named in ((["--model.ssm_cfg", "{dstate: 8}"], "dstate"), (["--model.ssm_cfg.dstate", "8"], "dstate"),
                       (["--model.n_layr", "3"], "n_layr"), (["--model.n_layer", "three"], "model.n_layer")):
        with pytest.raises(UsageError, match=named):  # one line naming it (the CLI prints it, exit code 2)
            model(*bad)
    # an invalid model is refused while the recipe is read, naming the field
    assert main(["pretrain", "--model.name", "mamba2-test", "--model.ssm_cfg.headdim", "100"]) == 2
    assert "Mamba2Config.ssm_cfg.headdim: d_ssm = 128 is not divisible by headdim = 100" in capsys.readouterr().err


def test_bad_yaml_key_names_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 5\n")
    assert main(["pretrain", "--config", str(bad)]) == 2
    assert "max_stepz" in capsys.readouterr().err


def test_unknown_commands(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["fintune"]) == 2
    assert "unknown command 'fintune' (did you mean 'finetune'?)" in capsys.readouterr().err


def test_missing_data_path_is_a_clear_error(tmp_path, capsys):
    missing = str(tmp_path / "no-such-dir")
    assert main(["pretrain", *tiny_args(tmp_path), "--data.paths", f"[{missing}]"]) == 2
    assert missing in capsys.readouterr().err
    assert main(["pretrain", *tiny_args(tmp_path), "--data.kind", "tokens", "--data.paths", f"[{missing}]"]) == 2
    assert missing in capsys.readouterr().err


def test_recipe_mistakes_are_errors(tmp_path, capsys):
    """A key that is only a prefix of a field, an optimizer setting out of range, and a model with no preset and
    no size are refused naming the key (not run as something else)."""
    assert main(["pretrain", *tiny_args(tmp_path), "--trainer.max_step", "5"]) == 2
    assert "unknown key --trainer.max_step:" in capsys.readouterr().err
    assert main(["pretrain", *tiny_args(tmp_path), "--optim.lr", "-1"]) == 2
    assert "optim.lr must be positive" in capsys.readouterr().err
    assert main(["pretrain", *tiny_args(tmp_path), "--model.name", "null"]) == 2
    assert "model.d_model is not given" in capsys.readouterr().err
    if not torch.cuda.is_available():  # Lightning's MisconfigurationException, as a one-line error
        assert main(["pretrain", *tiny_args(tmp_path), "--trainer.accelerator", "gpu"]) == 2
        assert "lit-mamba2 pretrain: error:" in capsys.readouterr().err


def test_sigterm_exits_nonzero(monkeypatch, capsys):
    """A stopped run must not look like a finished one to `pretrain && convert`."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import lit_mamba2.training.pretrain as pretrain_module

    def stopped(cfg):
        raise SIGTERMException()
    monkeypatch.setattr(pretrain_module, "pretrain", stopped)
    assert main(["pretrain", "--trainer.out_dir", "somewhere"]) == 128 + signal.SIGTERM
    assert "somewhere/checkpoints/last.ckpt" in capsys.readouterr().err


def test_launcher_environment_overrides():
    tc = TrainerConfig(accelerator="cpu", devices=1, num_nodes=1, precision="32-true", strategy="auto")
    assert apply_launcher_env(tc, {}) == tc
    fabric = {"LT_DEVICES": "4", "LT_NUM_NODES": "2", "LT_ACCELERATOR": "cuda", "LT_PRECISION": "bf16-mixed",
              "LT_STRATEGY": "fsdp", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}
    out = apply_launcher_env(tc, fabric)
    assert (out.devices, out.num_nodes, out.accelerator, out.precision, out.strategy) == (4, 2, "cuda", "bf16-mixed",
                                                                                         "fsdp")
    # fabric run always sets LT_DEVICES/LT_NUM_NODES ("auto" if not given): then torchrun's counts decide
    out = apply_launcher_env(tc, {"LT_DEVICES": "auto", "LT_NUM_NODES": "1", "LOCAL_WORLD_SIZE": "2",
                                  "WORLD_SIZE": "2"})
    assert (out.devices, out.num_nodes, out.accelerator, out.precision) == (2, 1, "cpu", "32-true")
    assert apply_launcher_env(tc, {"LT_DEVICES": "0,1"}).devices == "0,1"  # GPU ids pass through
    out = apply_launcher_env(tc, {"LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "32"})  # plain torchrun, 4 nodes
    assert (out.devices, out.num_nodes) == (8, 4)
    slurm = {"SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "train"}
    out = apply_launcher_env(tc, slurm)
    assert (out.devices, out.num_nodes) == (8, 2)
    assert apply_launcher_env(tc, {**slurm, "SLURM_JOB_NAME": "bash"}) == tc  # an interactive shell is no launch


class SigtermAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class KeepCheckpoint(L.Callback):
    """Copies last.ckpt aside one step after it was written (by the periodic save)."""

    def __init__(self, src, dst, step):
        self.src, self.dst, self.step = src, dst, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            shutil.copy(self.src, self.dst)


def assert_same_weights(path_a, path_b):
    a = Mamba2LMHeadModel.from_pretrained(path_a)
    b = Mamba2LMHeadModel.from_pretrained(path_b)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_pretrain_default_checkpoint_sigterm_and_resume(tmp_path, capsys):
    # one uninterrupted run: loss falls, checkpoint and sample written, logs have loss and tokens/s
    full = parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "full"), "--sample.max_new_tokens", "16"], "t")
    summary = pretrain(full)
    out = capsys.readouterr().out
    assert summary["step"] == 8 and "unigram entropy" in out and "sample:" in out
    assert summary["sample"].startswith("def ")
    rows = list(csv.DictReader(open(tmp_path / "full" / "logs" / "version_0" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[-1] < losses[0] and any(r.get("train/tokens_per_s") for r in rows)
    assert any(r.get("val/ppl") for r in rows)
    loaded = load(Mamba2LMHeadModel, summary["checkpoint"])
    assert loaded.model.config.d_model == 64 and loaded.tokenizer.eos_id == 0 and loaded.format == "ckpt"

    # the same run, saved periodically at step 4 and stopped by SIGTERM after step 6
    part = parse_recipe(PretrainConfig, tiny_args(tmp_path, "part"), "t")
    part.sample.max_new_tokens = 0
    last, step4 = tmp_path / "part" / "checkpoints" / "last.ckpt", tmp_path / "step4.ckpt"
    with pytest.raises(SystemExit):
        pretrain(part, callbacks=[KeepCheckpoint(last, step4, 5), SigtermAt(6)])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert torch.load(step4, weights_only=True)["global_step"] == 4
    assert torch.load(last, weights_only=True)["global_step"] == 6
    # resumed from either, it ends exactly where the uninterrupted run ended (same batches, optimizer, schedule)
    part.resume = True
    assert pretrain(part)["step"] == 8
    assert_same_weights(summary["checkpoint"], last)
    again = parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "again"), "--resume", str(step4)], "t")
    again.sample.max_new_tokens = 0
    resumed = pretrain(again)
    assert resumed["step"] == 8
    assert_same_weights(summary["checkpoint"], resumed["checkpoint"])


class SigtermAtBatch(L.Callback):
    def __init__(self, batch_idx):
        self.batch_idx = batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_inside_an_accumulation_window_resumes_exactly(tmp_path):
    """With 2 batches per optimizer step, a SIGTERM after the first batch of step 4: the resumed run redoes that
    step's whole window and ends with the uninterrupted run's weights."""
    args = ["--trainer.accumulate_grad_batches", "2", "--trainer.max_steps", "6", "--sample.max_new_tokens", "0"]
    full = pretrain(parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "full"), *args], "t"))
    part = parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "part"), *args], "t")
    with pytest.raises(SystemExit):
        pretrain(part, callbacks=[SigtermAtBatch(6)])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    part.resume = True
    assert pretrain(part)["step"] == 6
    assert_same_weights(full["checkpoint"], last)


def test_pretrain_with_a_hf_tokenizer_keeps_it_in_the_checkpoint(tmp_path, hf_tokenizer_dir):
    path, vocab = hf_tokenizer_dir
    words = [w for w in vocab if not w.startswith("<")]
    rng = __import__("random").Random(0)
    (tmp_path / "text").mkdir()
    for k in range(3):
        (tmp_path / "text" / f"doc{k}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)))
    cfg = parse_recipe(PretrainConfig, [*tiny_args(tmp_path, steps=3), "--tokenizer", path,
                                        "--data.paths", f"[{tmp_path / 'text'}]", "--data.include", "*.txt",
                                        "--data.seq_len", "16", "--sample.prompt", "def x",
                                        "--sample.max_new_tokens", "5"], "t")
    summary = pretrain(cfg)
    assert summary["sample"].startswith("def x")
    tok = load(Mamba2LMHeadModel, summary["checkpoint"]).tokenizer
    assert tok.encode("return y") == [vocab["return"], vocab["y"]] and tok.eos_id == vocab["<eos>"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_torchrun_two_processes(tmp_path):
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port()), "-m", "lit_mamba2", "pretrain",
                *tiny_args(tmp_path, steps=4), "--trainer.accumulate_grad_batches", "2",
                "--sample.max_new_tokens", "0"], tmp_path)
    assert "world size 2" in out
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # optimizer steps
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 8  # 2 batches a step


def test_fabric_run_two_processes(tmp_path):
    entry = str(Path(lit_mamba2.__file__).parent / "__main__.py")
    # `python -m lightning.fabric.cli` is the `fabric run` command itself (the console script's `run` verb)
    out = _run([sys.executable, "-m", "lightning.fabric.cli", "--accelerator", "cpu", "--devices", "2",
                "--precision", "64-true", "--main-port", str(_free_port()), entry, "pretrain",
                *tiny_args(tmp_path, steps=2), "--trainer.devices", "1", "--trainer.precision", "32-true",
                "--sample.max_new_tokens", "0"], tmp_path)
    assert "world size 2" in out and "precision 64-true" in out  # LT_DEVICES / LT_PRECISION beat the recipe


def test_pretrain_checkpoint_bookkeeping(tmp_path, capsys):
    """last.ckpt holds the final step even when max_steps is no multiple of save_every_n_steps; validation runs
    once per step and the summary keeps the train loss; a fresh run refuses to overwrite an earlier run's
    last.ckpt; a run stopped before its first periodic save resumes into last.ckpt itself (no last-v1.ckpt)."""
    run = parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "a", steps=6), "--sample.max_new_tokens", "0"], "t")
    summary = pretrain(run)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6 and summary["train_loss"] is not None
    rows = list(csv.DictReader(open(tmp_path / "a" / "logs" / "version_0" / "metrics.csv")))
    val_steps = [r["step"] for r in rows if r.get("val/loss")]
    assert len(val_steps) == len(set(val_steps)) == 2, val_steps  # steps 4 and 6, once each
    with pytest.raises(ValueError, match=r"last\.ckpt' exists from an earlier run.*--resume true"):
        pretrain(run)

    stopped = parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "b"), "--sample.max_new_tokens", "0"], "t")
    with pytest.raises(SystemExit):
        pretrain(stopped, callbacks=[SigtermAt(2)])
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    stopped.resume = True
    pretrain(stopped)
    ckpts = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt"] and torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt",
                                                 weights_only=True)["global_step"] == 8


def test_resume_refuses_another_model_or_a_foreign_file(tmp_path):
    run = parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "a", steps=2), "--sample.max_new_tokens", "0"], "t")
    pretrain(run)
    other = parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "a", steps=4), "--resume", "true",
                                          "--model.n_layer", "3"], "t")
    with pytest.raises(ValueError, match=r"holds a different model: model\.n_layer is 2 there and 3"):
        pretrain(other)
    smaller = parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "a", steps=4), "--resume", "true",
                                            "--data.batch_size", "2", "--sample.max_new_tokens", "0"], "t")
    with pytest.warns(UserWarning, match=r"resuming with other global batch \(4 rows, now 2\) than the checkpoint"):
        assert pretrain(smaller)["step"] == 4
    torch.save({"x": torch.zeros(1)}, tmp_path / "weights.bin")
    foreign = parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "c"), "--resume", str(tmp_path / "weights.bin")],
                           "t")
    with pytest.raises(ValueError, match=r"not a checkpoint written by lit-mamba2 pretrain"):
        pretrain(foreign)


def test_slurm_script_starts_then_resumes_by_itself(tmp_path):
    """recipes/slurm/pretrain.sbatch run twice (as a requeued job is), with srun and scontrol stand-ins: the first
    run starts, the second continues from the first's last.ckpt (--resume auto)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"  # one task: drop srun's own options, run the command
    srun.write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("trainer: {progress_bar: false}\n")
    script = Path(__file__).parents[2] / "recipes" / "slurm" / "pretrain.sbatch"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECIPE": str(recipe), "SLURM_JOB_ID": "1",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_PER_TASK": "1"}
    env.pop("SLURM_NTASKS", None)

    def job(steps):
        proc = subprocess.run(["bash", str(script), *tiny_args(tmp_path, steps=steps), "--sample.max_new_tokens", "0"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    job(4)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    out = job(6)
    assert "Restoring states from the checkpoint" in out or "Restored all states" in out
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


class DrawEachBatch(L.Callback):
    """Draws from torch's, numpy's and Python's generators at every batch (as dropout or a sampler would)."""

    def __init__(self):
        self.draws = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import random

        import numpy as np

        self.draws[trainer.global_step] = (torch.rand(1).item(), np.random.rand(), random.random())


def test_a_resumed_run_draws_what_the_uninterrupted_run_draws(tmp_path):
    """The checkpoint holds the random generators' states: after resuming at step 4, steps 4 and 5 draw the
    numbers the uninterrupted run drew there."""
    full, part = DrawEachBatch(), DrawEachBatch()
    pretrain(parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "full", steps=6), "--sample.max_new_tokens", "0"],
                          "t"), callbacks=[full])
    cfg = parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "part", steps=4), "--sample.max_new_tokens", "0"], "t")
    pretrain(cfg, callbacks=[DrawEachBatch()])
    cfg = parse_recipe(PretrainConfig, [*tiny_args(tmp_path, "part", steps=6), "--sample.max_new_tokens", "0",
                                        "--resume", "true"], "t")
    pretrain(cfg, callbacks=[part])
    assert sorted(part.draws) == [4, 5]
    assert [part.draws[s] for s in (4, 5)] == [full.draws[s] for s in (4, 5)]
