"""The `lit-mamba2` verbs that wrap checkpoints and generation route to them (the verbs' own behaviour is tested in
test_checkpoints.py and test_generation.py)."""

import pytest
import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.cli import main
from lit_mamba2.model import Mamba2LMHeadModel


def test_convert_and_generate_verbs(tmp_path, capsys):
    import transformers

    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")).eval()
    model.save_pretrained(tmp_path / "ms", format="mamba_ssm")
    assert main(["convert", str(tmp_path / "ms"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    theirs = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        expect = model(ids)[..., :256]
        got = theirs(ids).logits[..., :256]
    assert (got - expect).abs().max() < 1e-4

    assert main(["generate", "--checkpoint", str(tmp_path / "ms"), "--tokenizer", "byte", "--prompt", "def ",
                 "--max-new-tokens", "5", "--temperature", "0", "--device", "cpu"]) == 0
    assert "def " in capsys.readouterr().out


def test_convert_reports_a_missing_source(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out"), "--to", "hf"])
    assert e.value.code == 2
    assert "nothing: not a checkpoint folder" in capsys.readouterr().err
