import os
import socket

# The Triton kernels' tests run them under the interpreter on CPU tensors (tests/kernels/kernel_testing.py). Triton
# reads TRITON_INTERPRET when a kernel module is imported: set it before any test module imports one, whatever the
# order in which pytest (and each xdist worker) collects them. TRITON_INTERPRET=0 on a GPU machine is kept.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A Hub served on 127.0.0.1 (tests/fake_hub.py) as HF_ENDPOINT, a token in HF_TOKEN, the legacy LFS upload
    (no Xet), and no connection from this process anywhere but 127.0.0.1."""
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants

    from fake_hub import TOKEN, FakeHub

    real_connect = socket.socket.connect

    def loopback_only(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a connection outside loopback: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # (test modules set it to 1 for the datasets they read)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_stored_login"))
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server
    assert server.unknown == [], f"endpoints the fake Hub does not serve were called: {server.unknown}"
