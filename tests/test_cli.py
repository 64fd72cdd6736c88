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


@pytest.mark.parametrize("args,message", [
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--top-p", "1.5"], "--top-p must lie in (0, 1]"),
    (["--stop", ""], "--stop needs a text or #ID"),
    (["--stop", "#99999"], "--stop #99999: the model's token ids end at 255"),
    (["--device", "tpu"], "--device:"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--top-k", "-3"], "--"),
])
def test_generate_refuses_bad_options(tmp_path, capsys, args, message):
    Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")).save_pretrained(tmp_path / "ms", format="mamba_ssm")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", str(tmp_path / "ms"), "--tokenizer", "byte", "--prompt", "x",
              "--max-new-tokens", "2", *(["--device", "cpu"] if "--device" not in args else []), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_generate_names_a_missing_ckpt_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--checkpoint", str(tmp_path / "absent.ckpt"), "--prompt", "x"])
    assert e.value.code == 2 and "absent.ckpt: no such file" in capsys.readouterr().err
