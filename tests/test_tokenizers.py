"""One tokenizer interface for training, checkpoints and generation: a tokenizer stored by training comes back,
from the checkpoint alone, encoding and decoding as the original; the same rebuild serves the Lightning module,
`checkpoints.load` and the generate verb."""

import ast
import io
from pathlib import Path

import pytest
import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.checkpoints import load
from lit_mamba2.cli import main
from lit_mamba2.model import Mamba2LMHeadModel
from lit_mamba2.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, tokenizer_from_state

pytest.importorskip("transformers")
TEXTS = ["w3 w5 w7", "w1 nope w2", "", "w39 w0 w0"]


def through_a_checkpoint(state):
    """As a checkpoint stores it: torch.save, then torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save({"tokenizer": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["tokenizer"]


def assert_same_tokenizer(a: Tokenizer, b: Tokenizer, texts, identity=True):
    """Same ids both ways; `identity`: also the same cache key (which a rebuild from a state keeps)."""
    assert (a.vocab_size, a.eos_id, a.bos_id, a.pad_id) == (b.vocab_size, b.eos_id, b.bos_id, b.pad_id)
    assert not identity or a.identity == b.identity
    for text in texts:
        assert a.encode(text) == b.encode(text)
        assert a.decode(a.encode(text)) == b.decode(b.encode(text))


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_rebuilt_from_its_state_it_encodes_as_the_original(kind, word_tokenizer):
    tok = ByteTokenizer() if kind == "byte" else HFTokenizer.wrap(word_tokenizer, "words")
    texts = TEXTS + ["héllo\n\tworld"] if kind == "byte" else TEXTS
    rebuilt = tokenizer_from_state(through_a_checkpoint(tok.state_dict()))
    assert type(rebuilt) is type(tok)
    assert_same_tokenizer(rebuilt, tok, texts)
    if kind == "hf":
        assert tok.encode("w3 w5 w7") == [5, 7, 9] and tok.eos_id == 0


def test_one_interface_from_every_spelling(tmp_path, word_tokenizer):
    hf = word_tokenizer
    hf.save_pretrained(tmp_path / "tok")
    wrapped = load_tokenizer(hf)  # a transformers object
    assert isinstance(wrapped, HFTokenizer)
    assert load_tokenizer(wrapped) is wrapped  # a Tokenizer as it is
    from_folder = load_tokenizer(str(tmp_path / "tok"))  # a folder (a Hub name loads the same way)
    assert_same_tokenizer(from_folder, wrapped, TEXTS, identity=False)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    # what a checkpoint may hold instead of a state: a name
    assert_same_tokenizer(tokenizer_from_state(str(tmp_path / "tok")), from_folder, TEXTS)
    assert tokenizer_from_state(None) is None
    with pytest.raises(ValueError, match="unknown tokenizer entry kind='sentencepiece'"):
        tokenizer_from_state({"kind": "sentencepiece"})
    # written for other tools and read back from the folder
    wrapped.save_pretrained(tmp_path / "again")
    assert_same_tokenizer(load_tokenizer(tmp_path / "again"), wrapped, TEXTS, identity=False)


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_the_tokenizer_training_stores_comes_back_everywhere(tmp_path, capsys, kind, word_tokenizer):
    """LanguageModel writes the checkpoint; its own resume path, checkpoints.load and the generate verb each get
    the tokenizer back from it alone, encoding as the original."""
    from lit_mamba2.training.module import LanguageModel

    tok = ByteTokenizer() if kind == "byte" else HFTokenizer.wrap(word_tokenizer, "words")
    config = Mamba2Config.from_name("mamba2-test")
    module = LanguageModel(config.to_dict(), tokenizer=tok)
    module.configure_model()
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "last.ckpt")

    resumed = LanguageModel(config.to_dict())
    resumed.on_load_checkpoint(torch.load(tmp_path / "last.ckpt", weights_only=True))
    assert_same_tokenizer(resumed.tokenizer, tok, TEXTS)

    loaded = load(Mamba2LMHeadModel, tmp_path / "last.ckpt")
    assert loaded.format == "ckpt" and loaded.path == tmp_path / "last.ckpt"
    assert_same_tokenizer(loaded.tokenizer, tok, TEXTS)
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), module.model.eval()(x), rtol=0, atol=0)

    prompt = "w3 w5" if kind == "hf" else "def "
    assert main(["generate", "--checkpoint", str(tmp_path / "last.ckpt"), "--prompt", prompt,
                 "--max_new_tokens", "3", "--temperature", "0", "--device", "cpu"]) == 0
    from lit_mamba2.generation import generate

    new = generate(loaded.model, [tok.encode(prompt)], 3, temperature=0, stop_tokens=[tok.eos_id])[0]
    assert capsys.readouterr().out == prompt + tok.decode([t for t in new if t != tok.eos_id]) + "\n"


def test_checkpoints_and_tokenizers_do_not_import_the_model():
    """model -> checkpoints is the only direction: checkpoints builds the class it is given."""
    root = Path(__file__).resolve().parents[1] / "lit_mamba2"
    for name in ("checkpoints.py", "tokenizers.py"):
        tree = ast.parse((root / name).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        assert not {m for m in imported if m and m.startswith(("lit_mamba2.model", "lit_mamba2.training",
                                                               "lit_mamba2.generation"))}, name
