"""lit-mamba2 from a user's own Lightning code (lit_mamba2.lightning): LanguageModel in a plain L.Trainer fed by a
DataLoader of dicts, on one process and under strategy="lit_mamba2_fsdp" on 2 gloo processes; the model config as a
Mamba2Config, a preset or a dict, or a saved checkpoint to start from; bad batches refused by name. The loss is
computed directly (cross-entropy of the model's logits), not read from the module's own logs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_mamba2.checkpoints import save
from lit_mamba2.config import Mamba2Config
from lit_mamba2.lightning import LanguageModel, check_batch
from lit_mamba2.model import Mamba2LMHeadModel

from test_train_cli import _free_port

ROOT = Path(__file__).resolve().parents[2]

# A user's script: rows that repeat an 8-token motif (learnable in a few steps), a DataLoader of dicts, a plain
# Trainer; the loss over every row is computed with F.cross_entropy before and after fit.
USER_SCRIPT = '''
import sys
import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from lit_mamba2.lightning import LanguageModel

strategy, devices = sys.argv[1], int(sys.argv[2])
L.seed_everything(0)
rows = torch.randint(0, 256, (16, 8), generator=torch.Generator().manual_seed(0)).repeat(1, 4)
data = [{"input_ids": r[:-1].clone(), "labels": r[1:].clone()} for r in rows]
every = {k: torch.stack([d[k] for d in data]) for k in data[0]}

class DirectLoss(L.Callback):
    def measure(self, module):
        with torch.no_grad():
            logits = module(every["input_ids"])
            return F.cross_entropy(logits.float().flatten(0, 1), every["labels"].flatten()).item()

    def on_train_start(self, trainer, module):
        self.before = self.measure(module)

    def on_train_end(self, trainer, module):
        after = self.measure(module)
        if trainer.global_rank == 0:
            print(f"LOSS {self.before:.4f} {after:.4f}", flush=True)

model = LanguageModel("mamba2-test", optim={"lr": 3e-3, "warmup_steps": 2, "schedule": "constant"})
trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, max_steps=25, precision="32-true",
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[DirectLoss()])
trainer.fit(model, DataLoader(data, batch_size=4, shuffle=True))
'''


def run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def losses(out):
    line = next(l for l in out.splitlines() if l.startswith("LOSS "))
    return tuple(map(float, line.split()[1:]))


def test_user_trainer_with_a_dataloader_of_dicts(tmp_path):
    (tmp_path / "user.py").write_text(USER_SCRIPT)
    before, after = losses(run([sys.executable, "user.py", "auto", "1"], tmp_path))
    assert before > 5.0 and after < 0.7 * before


def test_user_trainer_with_the_registered_strategy_on_two_processes(tmp_path):
    (tmp_path / "user.py").write_text(USER_SCRIPT)
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "user.py", "lit_mamba2_fsdp", "2"], tmp_path)
    assert "parallel layout: dp_replicate=1 dp_shard=2 cp=1 tp=1 (world 2)" in out
    before, after = losses(out)
    assert before > 5.0 and after < 0.7 * before


def test_model_config_forms():
    preset = Mamba2Config.from_name("mamba2-test")
    for given in ("mamba2-test", preset, preset.to_dict()):
        module = LanguageModel(given)
        assert module.config.to_dict() == preset.to_dict()
        assert module.hparams["model_config"] == preset.to_dict()  # what a checkpoint stores, reloadable
    with pytest.raises(Exception, match="unknown model preset 'nope'"):
        LanguageModel("nope")
    with pytest.raises(TypeError, match="model_config"):
        LanguageModel()


def test_pretrained_folder_is_the_starting_model(tmp_path):
    torch.manual_seed(1)
    saved = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test"))
    save(saved, tmp_path / "base", format="mamba_ssm")
    module = LanguageModel(pretrained=str(tmp_path / "base"))
    assert module.config.to_dict() == saved.config.to_dict()
    module.configure_model()
    for (name, p), q in zip(module.model.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(p, q), name
    assert module.model.training
    with pytest.raises(ValueError, match="differs from the config of pretrained"):
        LanguageModel(Mamba2Config.from_name("mamba2attn-test"), pretrained=str(tmp_path / "base"))


def test_bad_batches_name_the_key():
    ids = torch.zeros(2, 8, dtype=torch.long)
    check_batch({"input_ids": ids, "labels": ids, "seq_idx": ids.int()})  # a good batch passes
    with pytest.raises(KeyError, match="batch has no 'labels'"):
        check_batch({"input_ids": ids})
    with pytest.raises(TypeError, match=r"batch\['input_ids'\] must hold integers"):
        check_batch({"input_ids": ids.float(), "labels": ids})
    with pytest.raises(ValueError, match=r"batch\['labels'\] has shape \(2, 7\)"):
        check_batch({"input_ids": ids, "labels": ids[:, 1:]})
    with pytest.raises(ValueError, match=r"batch\['positions'\] has shape \(8,\)"):
        check_batch({"input_ids": ids, "labels": ids, "positions": torch.arange(8)})
    with pytest.raises(TypeError, match="must be a dict"):
        check_batch((ids, ids))
    module = LanguageModel("mamba2-test")
    module.configure_model()
    with pytest.raises(KeyError, match="batch has no 'labels'"):
        module.training_step({"input_ids": ids}, 0)


# A user's LightningCLI main.py with our classes, a callback of their own (the directly computed loss on a
# validation batch, before and after fit) and `fit --config`.
CLI_MAIN = '''
from lightning.pytorch.cli import LightningCLI
from lit_mamba2.lightning import LanguageModel, LMDataModule

if __name__ == "__main__":
    LightningCLI(LanguageModel, LMDataModule)
'''

DIRECT_LOSS = '''
import lightning as L
import torch
import torch.nn.functional as F


class DirectLoss(L.Callback):
    def measure(self, module, batch):
        with torch.no_grad():
            logits = module(batch["input_ids"]).float()
        keep = batch["labels"] != -100
        return F.cross_entropy(logits[keep], batch["labels"][keep]).item()

    def on_train_start(self, trainer, module):
        self.batch = next(iter(trainer.datamodule.val_dataloader()))
        self.before = self.measure(module, self.batch)

    def on_train_end(self, trainer, module):
        print(f"LOSS {self.before:.4f} {self.measure(module, self.batch):.4f}", flush=True)
'''

CLI_CONFIG = '''
trainer:
  accelerator: cpu
  max_steps: 30
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: out
  callbacks: [{class_path: direct_loss.DirectLoss}]
model:
  model_config: mamba2-test
  optim: {lr: 0.01, warmup_steps: 2, schedule: constant}
data:
  config:
    kind: mqar
    seq_len: 64
    batch_size: 8
    mqar: {vocab_size: 256, num_kv_pairs: 4, num_train: 256, num_val: 32}
'''


def test_lightning_cli_fit_config(tmp_path):
    (tmp_path / "main.py").write_text(CLI_MAIN)
    (tmp_path / "direct_loss.py").write_text(DIRECT_LOSS)
    (tmp_path / "config.yaml").write_text(CLI_CONFIG)
    before, after = losses(run([sys.executable, "main.py", "fit", "--config", "config.yaml"], tmp_path))
    assert after < before - 0.2
    # type-checked: a model key of the wrong type and an unknown data key are refused before training
    for bad, named in ((["--model.accuracy", "maybe"], "accuracy"), (["--data.config.seq_lenn", "64"], "seq_lenn")):
        proc = subprocess.run([sys.executable, "main.py", "fit", "--config", "config.yaml", *bad], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0 and named in proc.stderr


def test_fabric_loop():
    """The model and its loss in a lightning.Fabric loop (the README's example), with the module's optimizer
    groups; the loss, computed with F.cross_entropy, falls."""
    import lightning as L
    import torch.nn.functional as F

    from lit_mamba2.training.module import param_groups

    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.seed_everything(0)
    rows = torch.randint(0, 256, (16, 8), generator=torch.Generator().manual_seed(0)).repeat(1, 4)
    batches = [{"input_ids": r[:, :-1], "labels": r[:, 1:]} for r in rows.split(4)]
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test"))
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=3e-3)
    model, optimizer = fabric.setup(model, optimizer)
    model.mark_forward_method("loss")

    def direct():
        with torch.no_grad():
            return sum(F.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["labels"].flatten()).item()
                       for b in batches) / len(batches)

    before = direct()
    for step in range(25):
        batch = batches[step % len(batches)]
        check_batch(batch)
        loss = model.loss(batch["input_ids"], batch["labels"])
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    assert before > 5.0 and direct() < 0.7 * before
