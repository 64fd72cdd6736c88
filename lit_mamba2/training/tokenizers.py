"""Tokenizers: a built-in byte-level one and any Hugging Face tokenizer, behind one small interface.

A tokenizer turns text into a list of ids and back, has an end-of-document id (`eos_id`), a size, an `identity`
string that changes whenever its mapping could change (it keys the token cache), and a `state_dict()` that a
checkpoint stores so that `tokenizer_from_state(...)` rebuilds it with nothing else at hand.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class ByteTokenizer:
    """Token id = byte value (vocabulary 256, UTF-8 bytes). Byte 0 (NUL) ends a document: it never occurs in text."""

    vocab_size = 256
    eos_id = 0
    identity = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> bytes:
        """Raw file contents are already token ids; NUL bytes would read as document ends, so they are dropped."""
        return data.replace(b"\x00", b"")

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")

    def state_dict(self) -> dict:
        return {"kind": "byte"}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256, eos_id=0)"


class HFTokenizer:
    """Any tokenizer that `transformers.AutoTokenizer.from_pretrained` loads (a Hub name or a local directory)."""

    def __init__(self, name_or_path: str, *, _hf=None):
        if _hf is None:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ImportError(f"tokenizer {name_or_path!r} needs transformers: pip install 'lit-mamba2[hf]'") from None
            try:
                _hf = AutoTokenizer.from_pretrained(name_or_path)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot load tokenizer {name_or_path!r} (a Hugging Face name, or a directory with "
                                 f"tokenizer files): {e}") from None
        self.name = name_or_path
        self.hf = _hf
        self.hf.model_max_length = 2 ** 62  # whole files are encoded and then packed: no per-text length limit
        eos = _hf.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {name_or_path!r} has no eos token; documents need one to mark their end")
        self.eos_id = int(eos)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)  # includes added tokens, unlike hf.vocab_size

    @property
    def identity(self) -> str:
        files = self._files()
        digest = hashlib.sha256()
        for fname in sorted(files):
            digest.update(fname.encode())
            digest.update(files[fname])
        return f"hf:{digest.hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])

    def _files(self) -> dict[str, bytes]:
        if not hasattr(self, "_file_cache"):
            with tempfile.TemporaryDirectory() as d:
                self.hf.save_pretrained(d)
                self._file_cache = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
        return self._file_cache

    def state_dict(self) -> dict:
        return {"kind": "hf", "name": self.name, "files": self._files()}

    @classmethod
    def from_files(cls, name: str, files: dict[str, bytes]) -> "HFTokenizer":
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as d:
            for fname, data in files.items():
                Path(d, fname).write_bytes(data)
            hf = AutoTokenizer.from_pretrained(d)
        return cls(name, _hf=hf)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte" is the built-in byte tokenizer; anything else is a Hugging Face tokenizer name or directory."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(os.path.expanduser(spec) if spec.startswith("~") else spec)


def tokenizer_from_state(state: dict) -> Tokenizer:
    """Rebuild a tokenizer from its `state_dict()` (as stored in a checkpoint), without network access."""
    kind = state.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        return HFTokenizer.from_files(state["name"], state["files"])
    raise ValueError(f"unknown tokenizer kind {kind!r} in checkpoint (expected 'byte' or 'hf')")


def check_vocab_fits(tokenizer: Tokenizer, vocab_size: int, what: str = "model.vocab_size") -> None:
    """Every id the tokenizer can produce must have an embedding row."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{what} = {vocab_size} is smaller than the tokenizer's size {tokenizer.vocab_size} "
                         f"({tokenizer!r}); set {what} to at least {tokenizer.vocab_size}")

