import os

import pytest
import torch

# Under pytest-xdist each worker gets one intra-op thread: two workers on two cores, instead of four threads
# fighting over them (which made some training tests 30x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def word_tokenizer():
    """A word-level Hugging Face tokenizer built here (no download): <eos> 0, [UNK] 1, w0..w39 = 2..41."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<eos>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(40)}},
                                     unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]")
