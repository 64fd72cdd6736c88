import json
import os

import numpy as np
import pytest


@pytest.fixture
def hf_tokenizer_dir(tmp_path_factory):
    """A tiny word-level Hugging Face tokenizer built here and saved to disk (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", "def", "return", "x", "y", "=", "(", ")", ":", "+", "print", "hello", "world"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    d = tmp_path_factory.mktemp("hf_tok")
    hf.save_pretrained(d)
    return str(d), {w: i for i, w in enumerate(words)}


@pytest.fixture
def write_raw_shard():
    return _write_raw_shard


def _write_raw_shard(directory, name, ids, dtype, eos_id):
    """Independent of lit_mamba2: raw little-endian ids, no header, plus meta.json."""
    os.makedirs(directory, exist_ok=True)
    np.asarray(ids, dtype={"uint16": "<u2", "uint32": "<u4"}[dtype]).tofile(os.path.join(directory, f"{name}.bin"))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"dtype": dtype, "eos_id": eos_id}, f)
