import io
import math

import lightning as L
import pytest
import torch

from lit_mamba2.config import Mamba2Config
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.training.data import DataConfig, LMDataModule, MQARConfig
from lit_mamba2.training.module import LanguageModel, OptimConfig, lr_factor, param_groups
from lit_mamba2.tokenizers import ByteTokenizer, check_vocab_fits, load_tokenizer, tokenizer_from_state


def test_no_weight_decay_on_A_log_D_dt_bias_norms_and_biases():
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2attn-test"))  # attention has qkv/out biases
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    expect_no_decay = {id(p) for name, p in model.named_parameters()
                       if name.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias", "bias") or "norm" in name}
    assert {n for n, p in model.named_parameters() if n.endswith(".bias") and "attn" not in n}  # conv1d biases
    assert ids(no_decay) == expect_no_decay
    assert ids(decay) == {id(p) for p in model.parameters()} - expect_no_decay
    assert any("in_proj.weight" in n for n, p in model.named_parameters() if id(p) in ids(decay))


def test_schedules():
    cos = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, 100, cos) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # non-increasing after warmup
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_factor(100, 100, cos) == pytest.approx(0.1)
    wsd = OptimConfig(schedule="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    g = [lr_factor(s, 100, wsd) for s in range(101)]
    assert all(v == 1.0 for v in g[10:80]) and g[90] == pytest.approx(0.5) and g[100] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="linear")


def test_validation_perplexity_and_accuracy_are_token_weighted():
    torch.manual_seed(0)
    module = LanguageModel(Mamba2Config.from_name("mamba2-test").to_dict(), accuracy=True)
    module.configure_model()
    module.eval()
    batches = []
    for b, L_, keep in [(2, 12, 1.0), (3, 8, 0.3), (1, 20, 0.7)]:  # very different counted-token numbers
        x = torch.randint(0, 256, (b, L_))
        y = torch.randint(0, 256, (b, L_))
        y[torch.rand(b, L_) > keep] = -100
        batches.append((x, y))
    nll, count, correct = 0.0, 0, 0
    with torch.no_grad():
        for i, (x, y) in enumerate(batches):
            module.validation_step({"input_ids": x, "labels": y}, i)
            logp = torch.log_softmax(module.model(x).double(), dim=-1)
            for bi in range(x.shape[0]):
                for t in range(x.shape[1]):
                    if y[bi, t] != -100:
                        nll -= logp[bi, t, y[bi, t]].item()
                        correct += int(logp[bi, t].argmax().item() == y[bi, t].item())
                        count += 1
    mean = module.val_loss.compute()
    assert mean.item() == pytest.approx(nll / count, rel=1e-5)
    assert mean.exp().item() == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert module.val_acc.compute().item() == pytest.approx(correct / count, abs=1e-6)


def test_mqar_training_drives_the_loss_down(tmp_path):
    L.seed_everything(0, verbose=False)
    data = DataConfig(kind="mqar", seq_len=32, batch_size=16,
                      mqar=MQARConfig(vocab_size=64, num_kv_pairs=4, num_train=2048, num_val=32))
    dm = LMDataModule(data, max_steps=60)
    dm.setup("fit")
    fixed = {k: torch.stack([dm.val_set[i][k] for i in range(32)]) for k in ("input_ids", "labels")}
    module = LanguageModel(Mamba2Config.from_name("mamba2-test").to_dict(),
                           optim={"lr": 3e-3, "warmup_steps": 5, "schedule": "constant"}, accuracy=True)
    module.configure_model()
    with torch.no_grad():
        before = module.model.loss(fixed["input_ids"], fixed["labels"]).item()
    trainer = L.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        use_distributed_sampler=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    with torch.no_grad():
        after = module.model.loss(fixed["input_ids"], fixed["labels"]).item()
    assert before > math.log(32)  # untrained: no better than a guess among the 32 values
    assert after < before - 1.0, (before, after)


def test_byte_tokenizer_roundtrip_and_checkpoint_state():
    tok = ByteTokenizer()
    text = "héllo\nworld"
    assert tok.encode(text) == list(text.encode("utf-8")) and tok.decode(tok.encode(text)) == text
    assert tok.eos_id == 0 and tok.vocab_size == 256
    assert isinstance(tokenizer_from_state(tok.state_dict()), ByteTokenizer)


def test_hf_tokenizer_by_path_and_from_checkpoint_state(hf_tokenizer_dir):
    path, vocab = hf_tokenizer_dir
    tok = load_tokenizer(path)
    assert tok.encode("def x ( ) : return y") == [vocab[w] for w in "def x ( ) : return y".split()]
    assert tok.eos_id == vocab["<eos>"] and tok.vocab_size == len(vocab)
    buffer = io.BytesIO()
    torch.save({"tokenizer": tok.state_dict()}, buffer)  # as inside a checkpoint
    buffer.seek(0)
    rebuilt = tokenizer_from_state(torch.load(buffer, weights_only=True)["tokenizer"])
    assert rebuilt.encode("print hello world") == [vocab["print"], vocab["hello"], vocab["world"]]
    assert rebuilt.identity == tok.identity
    check_vocab_fits(tok, 16)
    with pytest.raises(ValueError, match="model.vocab_size"):
        check_vocab_fits(tok, 8)
    with pytest.raises(ValueError, match="cannot load the tokenizer"):
        load_tokenizer(str(hf_tokenizer_dir[0]) + "-missing")
