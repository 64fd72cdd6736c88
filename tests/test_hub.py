"""`lit-mamba2 push` against a Hub served on 127.0.0.1 by the test (tests/fake_hub.py): what arrives is read back
and checked against the exported folder byte for byte, the weights against the original model's forward, and the
card's metadata parsed back with huggingface_hub's own ModelCard / eval-results parsers. No traffic leaves
loopback: any other connection fails the test."""

import json

import pytest
import torch
import yaml

pytest.importorskip("huggingface_hub")
from huggingface_hub import ModelCard, parse_eval_result_entries  # noqa: E402

from fake_hub import TOKEN  # noqa: E402
from lit_mamba2 import Mamba2Config  # noqa: E402
from lit_mamba2.checkpoints import load  # noqa: E402
from lit_mamba2.cli import main  # noqa: E402
from lit_mamba2.model import Mamba2LMHeadModel  # noqa: E402
from lit_mamba2.tokenizers import HFTokenizer  # noqa: E402


@pytest.fixture
def trained(tmp_path, word_tokenizer):
    """A training checkpoint as `lit-mamba2 pretrain` writes it: weights, model config, tokenizer, recipe, step."""
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")).eval()
    tok = HFTokenizer.wrap(word_tokenizer)
    recipe = {"model": {"name": "mamba2-test"}, "tokenizer": "word-level", "optim": {"lr": 0.003},
              "trainer": {"max_steps": 7}}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "model_config": model.config.to_dict(), "tokenizer": tok.state_dict(), "recipe": recipe,
                "global_step": 7}, path)
    return model, path, recipe


def results_file(tmp_path):
    """A results.json as `lit-mamba2 evaluate` writes it: one task on a Hub dataset, one on local JSON files."""
    record = {
        "checkpoint": "last.ckpt", "paper_model": None,
        "results": {"hellaswag": {"alias": "hellaswag", "acc,none": 0.31, "acc_stderr,none": 0.01,
                                  "acc_norm,none": 0.345, "acc_norm_stderr,none": 0.012},
                    "toy_mc": {"alias": "toy_mc", "acc,none": 0.75, "acc_stderr,none": 0.25}},
        "n-shot": {"hellaswag": 0, "toy_mc": 0},
        "configs": {"hellaswag": {"dataset_path": "Rowan/hellaswag", "validation_split": "validation",
                                  "num_fewshot": 0, "output_type": "multiple_choice"},
                    "toy_mc": {"dataset_path": "json", "test_split": "test", "num_fewshot": 0}},
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(record))
    return path


def files_under(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_the_export_with_its_card_and_eval_results(tmp_path, fake_hub, trained, capsys):
    model, ckpt, recipe = trained
    export = tmp_path / "export"
    assert main(["push", "--checkpoint", str(ckpt), "--repo_id", "tester/tiny-mamba2", "--private", "true",
                 "--results", str(results_file(tmp_path)), "--card.datasets", "org/corpus",
                 "--card.base_model", "state-spaces/mamba2-130m", "--folder", str(export)]) == 0
    assert f"pushed to {fake_hub.url}/tester/tiny-mamba2" in capsys.readouterr().out
    repo = fake_hub.repos["tester/tiny-mamba2"]
    assert repo.private and len(repo.commits) == 1
    arrived, written = repo.branches["main"], files_under(export)
    assert arrived == written  # every file, byte for byte
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", ".eval_results/hellaswag.yaml"):
        assert name in arrived, name
    assert any(b == arrived["model.safetensors"] for b in fake_hub.lfs.values())  # through the LFS batch API

    # the weights that arrived are the model's: a forward of the folder read back equals the original's
    received = tmp_path / "received"
    for name, data in arrived.items():
        (received / name).parent.mkdir(parents=True, exist_ok=True)
        (received / name).write_bytes(data)
    back = load(Mamba2LMHeadModel, received)
    assert isinstance(back.tokenizer, HFTokenizer) and back.tokenizer.encode("w3 w5") == [5, 7]
    ids = torch.randint(0, 40, (2, 12))
    torch.testing.assert_close(back.model(ids), model(ids))

    # the card's metadata, parsed back by huggingface_hub
    card = ModelCard(arrived["README.md"].decode())
    assert card.data.license == "apache-2.0" and card.data.datasets == ["org/corpus"]
    assert card.data.base_model == "state-spaces/mamba2-130m" and card.data.library_name == "transformers"
    assert {"mamba2", "lit-mamba2"} <= set(card.data.tags) and card.data.model_name == "tiny-mamba2"
    got = {(r.dataset_name, r.metric_type): r for r in card.data.eval_results}
    assert set(got) == {("hellaswag", "acc_norm"), ("toy_mc", "acc")}  # hellaswag: the paper's metric only
    assert got["hellaswag", "acc_norm"].metric_value == 0.345
    assert got["hellaswag", "acc_norm"].dataset_type == "Rowan/hellaswag"
    assert got["hellaswag", "acc_norm"].dataset_split == "validation"
    assert got["toy_mc", "acc"].metric_value == 0.75
    # the body: the recipe as stored in the checkpoint, and the results table
    assert yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0]) == recipe
    assert "for 7 optimizer steps" in card.text and "| hellaswag | acc_norm | 34.5 | 1.2 |" in card.text

    # .eval_results: the Hub's newer format, for the task on a Hub dataset only
    assert [k for k in arrived if k.startswith(".eval_results/")] == [".eval_results/hellaswag.yaml"]
    (entry,) = parse_eval_result_entries(yaml.safe_load(arrived[".eval_results/hellaswag.yaml"]))
    assert (entry.dataset_id, entry.task_id, entry.value) == ("Rowan/hellaswag", "hellaswag", 0.345)
    assert entry.notes.startswith("acc_norm, 0-shot")


def test_push_to_a_branch_in_the_other_format_replaces_the_weights(tmp_path, fake_hub, trained):
    model, ckpt, _ = trained
    assert main(["push", "--checkpoint", str(ckpt), "--repo_id", "tiny"]) == 0  # own namespace (whoami)
    main_files = dict(fake_hub.repos["tester/tiny"].branches["main"])
    assert "model.safetensors" in main_files and "README.md" in main_files
    assert main(["push", "--checkpoint", str(ckpt), "--repo_id", "tester/tiny", "--revision", "dev",
                 "--format", "mamba_ssm", "--commit_message", "mamba_ssm weights", "--tokenizer", "byte"]) == 0
    repo = fake_hub.repos["tester/tiny"]
    assert not repo.private and repo.branches["main"] == main_files  # main untouched
    dev = repo.branches["dev"]
    assert "pytorch_model.bin" in dev and "model.safetensors" not in dev  # the old format's weights deleted
    assert "tokenizer.json" in main_files and "tokenizer.json" not in dev  # ... and the old tokenizer's files
    assert repo.commits[-1]["branch"] == "dev" and repo.commits[-1]["summary"] == "mamba_ssm weights"
    assert "model.safetensors" in repo.commits[-1]["deleted"]
    received = tmp_path / "dev"
    received.mkdir()
    for name, data in dev.items():
        (received / name).write_bytes(data)
    assert json.loads(dev["config.json"])["d_model"] == model.config.d_model  # mamba_ssm's config
    ids = torch.randint(0, 40, (1, 9))
    torch.testing.assert_close(load(Mamba2LMHeadModel, received).model(ids), model(ids))
    assert ModelCard(dev["README.md"].decode()).data.library_name is None


def test_push_errors_are_one_line_before_any_upload(tmp_path, fake_hub, trained, monkeypatch, capsys):
    _, ckpt, _ = trained
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", "--checkpoint", str(ckpt), "--repo_id", "tester/x"]) == 2
    assert "no Hugging Face token: set HF_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", "--checkpoint", str(ckpt), "--repo_id", "a/b/c"]) == 2
    assert "--repo_id: 'a/b/c' is not a Hub repo id" in capsys.readouterr().err
    assert main(["push", "--checkpoint", str(ckpt), "--repo_id", "tester/x", "--results", "nope.json"]) == 2
    assert "--results nope.json: no such file" in capsys.readouterr().err
    assert main(["push", "--checkpoint", str(ckpt), "--repo_id", "tester/x", "--formt", "hf"]) == 2
    assert "did you mean --format" in capsys.readouterr().err
    hybrid = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2attn-test"))
    hybrid.save_pretrained(tmp_path / "hybrid", format="mamba_ssm")
    assert main(["push", "--checkpoint", str(tmp_path / "hybrid"), "--repo_id", "tester/x", "--tokenizer",
                 "byte"]) == 2  # format hf cannot hold attention layers
    assert "cannot express this model" in capsys.readouterr().err
    assert fake_hub.repos == {} and not fake_hub.calls  # nothing reached the Hub
