"""`lit-mamba2 finetune` end to end on CPU: a tiny mamba_ssm-format checkpoint written here (config.json +
pytorch_model.bin + tokenizer files, as the published ones), an instruction set written here; full fine-tuning
lowers the response loss (computed directly on the validation records, base vs exported model); LoRA trains the
adapters only, its merged export (read by transformers) equals PEFT's adapter on transformers' model of the base
weights. Recipes parse."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.checkpoints import convert, load
from lit_mamba2.cli import main, parse_recipe
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.training.finetune import FinetuneConfig

pytest.importorskip("transformers")
RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "finetune"


def write_base(folder: Path, tokenizer) -> Path:
    """mamba_ssm's layout, written by hand: MambaConfig's fields and the state dict; the tokenizer's files."""
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test", vocab_size=48))
    folder.mkdir()
    c = model.config.to_dict()
    (folder / "config.json").write_text(json.dumps({k: c[k] for k in (
        "d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg", "rms_norm",
        "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")}))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tokenizer.save_pretrained(folder)
    return folder


def records(n, seed):
    """A task a small model learns in a few steps: the response repeats the instruction's last word twice."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = rng.integers(0, 40, 2)
        out.append({"messages": [{"role": "user", "content": f"w{a} w{b}"},
                                 {"role": "assistant", "content": f"w{b} w{b}"}]})
    return out


@pytest.fixture
def setup(tmp_path, word_tokenizer):
    base = write_base(tmp_path / "base", word_tokenizer)
    for name, n, seed in (("train", 64, 0), ("val", 8, 1)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(n, seed)))
    return tmp_path, base


def args(tmp_path, base, out, *more):
    return ["finetune", "--checkpoint", str(base), "--data.train", f"[{tmp_path / 'train.jsonl'}]",
            "--data.val", f"[{tmp_path / 'val.jsonl'}]", "--data.seq_len", "64", "--data.batch_size", "4",
            "--trainer.max_steps", "16", "--trainer.val_every_n_steps", "8", "--trainer.save_every_n_steps", "8",
            "--trainer.log_every_n_steps", "1", "--trainer.progress_bar", "false", "--trainer.accelerator", "cpu",
            "--trainer.out_dir", str(tmp_path / out), "--optim.warmup_steps", "2", *more]


def response_loss(model, tokenizer, recs) -> float:
    """Mean negative log-likelihood of the responses (their words and eos) after the built-in chat prompt,
    computed here from a forward pass per record."""
    total, count = 0.0, 0
    with torch.no_grad():
        for r in recs:
            user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
            prompt = tokenizer.encode(f"### User:\n{user}\n\n### Assistant:\n")
            response = tokenizer.encode(answer) + [tokenizer.eos_id]
            logp = torch.log_softmax(model(torch.tensor([prompt + response]))[0, :-1].double(), dim=-1)
            at = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
            total -= logp[at, torch.tensor(response)].sum().item()
            count += len(response)
    return total / count


def test_full_finetuning_lowers_the_response_loss_and_exports_the_best(setup, capsys):
    tmp_path, base = setup
    assert main(args(tmp_path, base, "full", "--optim.lr", "3e-3", "--export.format", "mamba_ssm")) == 0
    out = capsys.readouterr().out
    assert "64 records -> " in out and "template: built-in" in out and "best checkpoint:" in out
    run = tmp_path / "full"
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    before, after = load(Mamba2LMHeadModel, base), load(Mamba2LMHeadModel, run / "best")
    assert after.format == "mamba_ssm" and after.tokenizer.vocab_size == before.tokenizer.vocab_size
    val = records(8, 1)
    loss_before, loss_after = (response_loss(m.model, before.tokenizer, val) for m in (before, after))
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    print(f"response loss {loss_before:.3f} -> {loss_after:.3f}")
    # validation ran during training (loss and perplexity logged); the export is best.ckpt's weights
    rows = list(csv.DictReader(open(next((run / "logs").rglob("metrics.csv")))))
    val = [(float(r["val/loss"]), float(r["val/ppl"])) for r in rows if r.get("val/loss")]
    assert len(val) == 2 and val[-1][0] < val[0][0] and all(abs(math.exp(v) - p) < 1e-3 * p for v, p in val)
    best = load(Mamba2LMHeadModel, run / "checkpoints" / "best.ckpt").model
    for (k, v), w in zip(best.state_dict().items(), after.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_lora_trains_adapters_only_and_its_peft_adapter_matches_the_merged_export(setup, capsys):
    peft = pytest.importorskip("peft")
    from transformers import Mamba2ForCausalLM

    tmp_path, base = setup
    assert main(args(tmp_path, base, "lora", "--method", "lora", "--lora.targets", "[in_proj]", "--lora.rank", "4",
                     "--optim.lr", "1e-2")) == 0
    out = capsys.readouterr().out
    assert "PEFT adapter:" in out
    run = tmp_path / "lora"
    # only adapters moved: every base weight in the last checkpoint is the base checkpoint's
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    base_sd = torch.load(base / "pytorch_model.bin", weights_only=True)
    adapters = [k for k in sd if k.endswith(("lora_A", "lora_B"))]
    assert len(adapters) == 4 and ckpt["lora"]["rank"] == 4
    for k, v in base_sd.items():
        assert torch.equal(sd[k], v), k
    assert any(sd[k].abs().max() > 0 for k in adapters if k.endswith("lora_B"))
    # transformers reads the merged export; PEFT's LoRA on transformers' model of the base gives the same logits
    convert(Mamba2LMHeadModel, base, tmp_path / "base-hf", "hf")
    merged = Mamba2ForCausalLM.from_pretrained(run / "best").eval()
    adapted = peft.PeftModel.from_pretrained(Mamba2ForCausalLM.from_pretrained(tmp_path / "base-hf"),
                                             run / "best-peft").eval()
    plain = Mamba2ForCausalLM.from_pretrained(tmp_path / "base-hf").eval()
    x = torch.randint(0, 42, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = merged(x).logits
        assert (adapted(x).logits - want).abs().max() < 1e-4
        assert (plain(x).logits - want).abs().max() > 1e-3
        ours = load(Mamba2LMHeadModel, run / "checkpoints" / "best.ckpt").model  # merged on load
        assert (ours(x)[..., :want.shape[-1]] - want).abs().max() < 1e-4


def test_lora_on_out_proj_is_exported_merged_without_a_peft_adapter(setup, capsys):
    tmp_path, base = setup
    assert main(args(tmp_path, base, "lora2", "--method", "lora", "--lora.targets", "[in_proj, out_proj]",
                     "--trainer.max_steps", "4", "--trainer.val_every_n_steps", "4")) == 0
    assert "no PEFT adapter: PEFT accepts LoRA on in_proj only" in capsys.readouterr().out
    assert (tmp_path / "lora2" / "best" / "model.safetensors").is_file()
    assert not (tmp_path / "lora2" / "best-peft").exists()
    # a fresh run refuses the folder; --resume continues the adapters from last.ckpt
    assert main(args(tmp_path, base, "lora2", "--method", "lora")) == 2
    assert "exists from an earlier run" in capsys.readouterr().err
    first = torch.load(tmp_path / "lora2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert main(args(tmp_path, base, "lora2", "--method", "lora", "--lora.targets", "[in_proj, out_proj]",
                     "--trainer.max_steps", "6", "--trainer.val_every_n_steps", "4", "--resume", "true")) == 0
    second = torch.load(tmp_path / "lora2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (first["global_step"], second["global_step"]) == (4, 6)
    for k, v in first["state_dict"].items():
        assert torch.equal(second["state_dict"][k], v) != k.endswith(("lora_A", "lora_B")), k


def test_a_malformed_record_stops_the_verb_before_training(setup, capsys):
    tmp_path, base = setup
    (tmp_path / "train.jsonl").write_text('{"instruction": "w1", "output": "w2"}\n{"instruction": "w1"}\n')
    assert main(args(tmp_path, base, "bad")) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"lit-mamba2 finetune: error: {tmp_path / 'train.jsonl'}, line 2, field 'output': "
                           "missing")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipes_parse(recipe):
    cfg = parse_recipe(FinetuneConfig, ["--config", str(RECIPES / recipe)], "t")
    assert cfg.checkpoint.startswith("state-spaces/mamba2-") and cfg.data.train
    assert cfg.method == ("lora" if "lora" in recipe else "full")
    if "2.7b" in recipe:
        assert cfg.trainer.strategy == "fsdp"


def test_lora_under_fsdp2_on_two_ranks(setup):
    """torchrun, 2 ranks on gloo, trainer.strategy fsdp: every step's loss is one process's with the same global
    batch (the ranks count different numbers of response tokens: the gradient is still the mean over all of
    them); the base weights stay frozen; the sharded best checkpoint exports merged and as PEFT's adapter."""
    import sys

    from test_train_cli import _free_port, _run

    tmp_path, base = setup
    common = args(tmp_path, base, "fsdp", "--method", "lora", "--lora.targets", "[in_proj]", "--lora.rank", "4",
                  "--trainer.max_steps", "3", "--trainer.val_every_n_steps", "3", "--trainer.precision", "32-true")[1:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(_free_port()), "-m", "lit_mamba2", "finetune"]
    _run([*launch, *common, "--trainer.strategy", "fsdp", "--data.batch_size", "2"], tmp_path)
    assert main(["finetune", *common[:-2], "--trainer.out_dir", str(tmp_path / "one"), "--data.batch_size",
                 "4"]) == 0

    def losses(out):
        rows = list(csv.DictReader(open(next((tmp_path / out / "logs").rglob("metrics.csv")))))
        return [float(r["train/loss"]) for r in rows if r.get("train/loss")]

    # (rel 1e-4 from the third step: LoRA's B starts at zero, so A's first gradients are float noise that Adam
    # normalises to ±lr, and the two runs' noise differs)
    assert len(losses("one")) == 3 and losses("fsdp") == pytest.approx(losses("one"), rel=1e-4)
    assert losses("fsdp")[:2] == pytest.approx(losses("one")[:2], rel=1e-5)
    run = tmp_path / "fsdp"
    merged = load(Mamba2LMHeadModel, run / "best").model
    ours = load(Mamba2LMHeadModel, run / "checkpoints" / "best.ckpt").model  # sharded: read whole, merged
    base_model = load(Mamba2LMHeadModel, base).model
    x = torch.randint(0, 42, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), ours(x), rtol=1e-5, atol=1e-5)
        assert (merged(x) - base_model(x)).abs().max() > 1e-4
    assert (run / "best-peft" / "adapter_model.safetensors").is_file()
