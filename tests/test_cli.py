"""The `lit-mamba2` verbs that wrap checkpoints and generation, and what every verb shares: one argument style
(--config file and --key value, parsed from the verb's dataclass) and config errors whose first line names the
cause. (The verbs' own behaviour is tested in test_checkpoints.py and test_generation.py.)"""

import os
import stat

import pytest
import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.cli import main
from lit_mamba2.model import Mamba2LMHeadModel


@pytest.fixture
def byte_model_dir(tmp_path):
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")).eval()
    model.save_pretrained(tmp_path / "ms", format="mamba_ssm")
    return model, tmp_path / "ms"


def test_convert_and_generate_verbs(tmp_path, capsys, byte_model_dir):
    import transformers

    model, ms = byte_model_dir
    assert main(["convert", "--src", str(ms), "--dst", str(tmp_path / "hf"), "--to", "hf"]) == 0
    theirs = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        expect = model(ids)[..., :256]
        got = theirs(ids).logits[..., :256]
    assert (got - expect).abs().max() < 1e-4

    assert main(["generate", "--checkpoint", str(ms), "--tokenizer", "byte", "--prompt", "def ",
                 "--max_new_tokens", "5", "--temperature", "0", "--device", "cpu"]) == 0
    assert "def " in capsys.readouterr().out


def test_generate_takes_several_prompts_as_they_are_and_a_config_file(tmp_path, capsys, byte_model_dir):
    """A batch is --prompt repeated (or a list in the config file); each text is taken as it is, even where YAML
    would read it otherwise ("- x" a list, "#5" a comment, "null" nothing); --stop #ID is a token id."""
    from lit_mamba2.generation import generate

    model, ms = byte_model_dir
    prompts = ["- x", "#5", "null", "def f(x): return 1"]
    args = [a for p in prompts for a in ("--prompt", p)]
    assert main(["generate", "--checkpoint", str(ms), "--tokenizer", "byte", *args, "--max_new_tokens", "4",
                 "--temperature", "0", "--stop", "#255", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    want = generate(model, [list(p.encode()) for p in prompts], 4, temperature=0, stop_tokens=[255])
    for p, w in zip(prompts, want):
        text = bytes(t for t in w if 0 < t < 255).decode("utf-8", errors="replace")
        assert f"--- {p!r}\n{p}{text}\n" in out
    config = tmp_path / "gen.yaml"
    config.write_text(f"checkpoint: {ms}\ntokenizer: byte\nprompt: [ab, cd]\nmax_new_tokens: 2\ntemperature: 0\n"
                      "device: cpu\n")
    assert main(["generate", "--config", str(config)]) == 0
    assert capsys.readouterr().out.count("--- ") == 2
    assert main(["generate", "--config", str(config), "--prompt", "one"]) == 0  # the command line replaces
    out = capsys.readouterr().out
    assert out.startswith("one") and "--- " not in out


def test_convert_reports_a_missing_source(tmp_path, capsys):
    assert main(["convert", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "nothing: not a checkpoint folder" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--top_k", "0"], "--top_k must be at least 1"),
    (["--top_p", "1.5"], "--top_p must lie in (0, 1]"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--row_groups", "4"], "--row_groups must be 0, 1, 2 or 3"),
    (["--stop", ""], "--stop needs a text or #ID"),
    (["--stop", "#99999"], "--stop #99999: the model's token ids end at 255"),
    (["--device", "tpu"], "--device:"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--top_k", "-3"], "--"),
])
def test_generate_refuses_bad_options(capsys, byte_model_dir, args, message):
    _, ms = byte_model_dir
    assert main(["generate", "--checkpoint", str(ms), "--tokenizer", "byte", "--prompt", "x",
                 "--max_new_tokens", "2", *(["--device", "cpu"] if "--device" not in args else []), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lit-mamba2 generate: error: ") and message in err.splitlines()[0]


def test_generate_names_a_missing_ckpt_file(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "absent.ckpt"), "--prompt", "x"]) == 2
    assert "absent.ckpt: no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# config errors: the cause first, in one line, with the closest valid key
# ---------------------------------------------------------------------------------------------------------------
GENERATE = ["--checkpoint", "some/where", "--prompt", "x"]
CONVERT = ["--src", "a", "--dst", "b", "--to", "hf"]
CONFIG_ERRORS = [
    # misspelled key
    ("pretrain", ["--trainer.max_stepz", "5"],
     "unknown key --trainer.max_stepz: section 'trainer' has no 'max_stepz' (did you mean --trainer.max_steps?)"),
    ("generate", [*GENERATE, "--temprature", "0"], "unknown option --temprature (did you mean --temperature?)"),
    ("generate", [*GENERATE, "--max-new-tokens", "5"],
     "unknown option --max-new-tokens (did you mean --max_new_tokens?)"),
    ("generate", [*GENERATE, "--no-cuda-graph"], "unknown option --no-cuda-graph (did you mean --cuda_graph false?)"),
    ("convert", [*CONVERT, "--dtyp", "bfloat16"], "unknown option --dtyp (did you mean --dtype?)"),
    # misspelled section (named as the section, not as its child key)
    ("pretrain", ["--trainr.max_steps", "5"],
     "unknown section 'trainr' in --trainr.max_steps (did you mean --trainer.max_steps?)"),
    ("generate", [*GENERATE, "--sampling.top_k", "5"],
     "unknown section 'sampling' in --sampling.top_k (did you mean --top_k?)"),
    ("convert", [*CONVERT, "--output.dtype", "bfloat16"],
     "unknown section 'output' in --output.dtype (did you mean --dtype?)"),
    # a value of the wrong type
    ("pretrain", ["--trainer.max_steps", "many"], "--trainer.max_steps: expected an integer, got 'many'"),
    ("generate", [*GENERATE, "--temperature", "hot"], "--temperature: expected a number, got 'hot'"),
    ("generate", [*GENERATE, "--top_k", "some"], "--top_k: expected an integer, got 'some'"),
    ("generate", [*GENERATE, "--pdl", "maybe"], "--pdl: expected true or false, got 'maybe'"),
    ("convert", ["--src", "a", "--dst", "b", "--to", "tf"], "--to: expected one of 'hf', 'mamba_ssm', got 'tf'"),
    # stray words and missing options
    ("convert", ["a", "b", "--to", "hf"], "unexpected argument 'a': every option is given as --key value "
                                          "(e.g. --src a)"),
    ("generate", ["--prompt", "x"], "missing --checkpoint (required)"),
]


@pytest.mark.parametrize("verb,args,first", CONFIG_ERRORS)
def test_config_errors_name_the_cause_first(capsys, verb, args, first):
    assert main([verb, *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"lit-mamba2 {verb}: error: {first}"
    assert len(err) <= 2  # the cause and where to look, not the whole usage


@pytest.mark.parametrize("yaml_text,first", [
    ("trainer:\n  max_stepz: 5\n",
     "unknown key 'trainer.max_stepz': section 'trainer' has no 'max_stepz' (did you mean 'trainer.max_steps'?)"),
    ("trainr:\n  max_steps: 5\n", "unknown section 'trainr' (did you mean 'trainer'?)"),
    ("data:\n  mqr:\n    vocab_size: 5\n", "unknown section 'data.mqr' (did you mean 'data.mqar'?)"),
    ("trainer:\n  max_steps: many\n", "'trainer.max_steps': expected an integer, got 'many'"),
    ("", "the file holds no YAML mapping of sections (it is empty, or not YAML)"),
    ("- trainer\n", "the file holds no YAML mapping of sections (it is empty, or not YAML)"),
])
def test_config_file_errors_name_the_cause_first(tmp_path, capsys, yaml_text, first):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml_text)
    assert main(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err.splitlines()
    where = "" if "expected" in first else f"--config {config}: " if "no YAML" in first else f"{config}: "
    assert err[0].startswith(f"lit-mamba2 pretrain: error: {where}{first}")


def test_generate_and_convert_config_files_are_checked_too(tmp_path, capsys):
    (tmp_path / "g.yaml").write_text("checkpoint: x\nprompt: hi\ntop_kk: 3\n")
    assert main(["generate", "--config", str(tmp_path / "g.yaml")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (f"lit-mamba2 generate: error: {tmp_path / 'g.yaml'}: "
                                                       "unknown option 'top_kk' (did you mean 'top_k'?)")
    (tmp_path / "c.yaml").write_text("src: a\ndst: b\nto: hf\ndtype: 16\n")
    assert main(["convert", "--config", str(tmp_path / "c.yaml")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "lit-mamba2 convert: error: 'dtype': expected one of 'float32', 'bfloat16', 'float16', got '16'")


def test_help_still_lists_every_option(capsys):
    for verb, option in [("pretrain", "--trainer.max_steps"), ("generate", "--max_new_tokens"),
                         ("convert", "--src")]:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0 and option in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# files written for users
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_have_ordinary_permissions(tmp_path, umask, byte_model_dir):
    """Every file save_pretrained and convert write gets the mode an ordinary open() gives under the umask
    (safetensors alone would leave model.safetensors 0600)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model, ms = byte_model_dir
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<eos>": 0, "a": 1}, unk_token="a")),
                                  eos_token="<eos>", unk_token="a")
    old = os.umask(umask)
    try:
        for fmt in ("hf", "mamba_ssm"):
            model.save_pretrained(tmp_path / fmt, format=fmt, tokenizer=tok)
        assert main(["convert", "--src", str(ms), "--dst", str(tmp_path / "converted"), "--to", "hf"]) == 0
    finally:
        os.umask(old)
    files = [p for d in ("hf", "mamba_ssm", "converted") for p in (tmp_path / d).iterdir()]
    assert {"model.safetensors", "pytorch_model.bin", "config.json", "tokenizer.json"} <= {p.name for p in files}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
