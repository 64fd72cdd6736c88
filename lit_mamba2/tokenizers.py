"""Tokenizers: the built-in byte-level one and any Hugging Face tokenizer, behind one interface.

Training, checkpoints and generation all use these two classes. A tokenizer

- turns text into ids and back: `encode(text) -> list[int]` (no special tokens added), `decode(ids) -> str`,
  `encode_batch(texts)` (encode of each);
- has `vocab_size` (every id it can produce is below it), `eos_id` (the end-of-document id; None for a
  Hugging Face tokenizer without one) and `bos_id` / `pad_id` (None where it has none);
- has an `identity` string that changes whenever its mapping could change (it keys the token cache);
- has a `state_dict()` that a training checkpoint stores; `tokenizer_from_state(state)` rebuilds an equal
  tokenizer from it with nothing else at hand (no network);
- writes its files for other tools with `save_pretrained(folder)` (the byte tokenizer has none).

`load_tokenizer(spec)` makes one from what a user names: "byte", a Hugging Face name or folder, or a transformers
tokenizer object (wrapped).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional, Union


class Tokenizer:
    """The interface; ByteTokenizer and HFTokenizer are its two implementations."""

    vocab_size: int
    eos_id: Optional[int]
    bos_id: Optional[int] = None
    pad_id: Optional[int] = None

    @property
    def identity(self) -> str:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text (a Hugging Face fast tokenizer does them in one call)."""
        return [self.encode(t) for t in texts]

    def state_dict(self) -> dict:
        raise NotImplementedError

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> list[str]:
        """Write the files another tool reads this tokenizer from; returns their names."""
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """Token id = byte value (vocabulary 256, UTF-8 bytes). Byte 0 (NUL) ends a document: it never occurs in text."""

    vocab_size = 256
    eos_id = 0

    @property
    def identity(self) -> str:
        return "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> bytes:
        """Raw file contents are already token ids; NUL bytes would read as document ends, so they are dropped."""
        return data.replace(b"\x00", b"")

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")

    def state_dict(self) -> dict:
        return {"kind": "byte"}

    def save_pretrained(self, folder) -> list[str]:
        return []  # nothing for transformers to read: a reader passes "byte" again

    def __eq__(self, other) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256, eos_id=0)"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class HFTokenizer(Tokenizer):
    """Any tokenizer that `transformers.AutoTokenizer.from_pretrained` loads (a Hub name or a local folder), or a
    transformers tokenizer object (`HFTokenizer.wrap`). `.hf` is the transformers tokenizer."""

    def __init__(self, name_or_path: Union[str, os.PathLike], *, _hf=None):
        name = str(name_or_path)
        if _hf is None:
            name = os.path.expanduser(name)
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ImportError(f"the tokenizer {name!r} needs transformers: pip install 'lit-mamba2[hf]'") from None
            try:
                _hf = AutoTokenizer.from_pretrained(name)
            except Exception as e:  # noqa: BLE001 - OSError, ValueError, ... from transformers and tokenizers
                raise ValueError(f"cannot load the tokenizer {name!r} (a Hugging Face name, or a folder with "
                                 f"tokenizer files): {_first_line(e)}") from None
        self.name = name
        self.hf = _hf
        self.hf.model_max_length = 2 ** 62  # whole files are encoded and then packed: no per-text length limit

    @classmethod
    def wrap(cls, hf, name: Optional[str] = None) -> "HFTokenizer":
        """A transformers tokenizer object, as it is."""
        return cls(name or getattr(hf, "name_or_path", None) or type(hf).__name__, _hf=hf)

    @classmethod
    def from_files(cls, name: str, files: dict[str, bytes]) -> "HFTokenizer":
        """From the files `save_pretrained` writes ({file name: contents}), e.g. as a checkpoint stores them."""
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError(f"the tokenizer {name!r} needs transformers: pip install 'lit-mamba2[hf]'") from None
        with tempfile.TemporaryDirectory() as d:
            for fname, data in files.items():
                if Path(fname).name != fname:
                    raise ValueError(f"tokenizer {name!r}: file name {fname!r} is not a plain file name")
                Path(d, fname).write_bytes(data if isinstance(data, bytes) else str(data).encode())
            try:
                hf = AutoTokenizer.from_pretrained(d)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"cannot rebuild the tokenizer {name!r} from its stored files: "
                                 f"{_first_line(e)}") from None
        tok = cls(name, _hf=hf)
        tok._file_cache = dict(files)  # the same files again: the same identity and state as the original's
        return tok

    @property
    def vocab_size(self) -> int:
        return len(self.hf)  # includes added tokens, unlike hf.vocab_size

    @property
    def eos_id(self) -> Optional[int]:
        return None if self.hf.eos_token_id is None else int(self.hf.eos_token_id)

    @property
    def bos_id(self) -> Optional[int]:
        return None if self.hf.bos_token_id is None else int(self.hf.bos_token_id)

    @property
    def pad_id(self) -> Optional[int]:
        return None if self.hf.pad_token_id is None else int(self.hf.pad_token_id)

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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.hf(list(texts), add_special_tokens=False, return_attention_mask=False,
                       return_token_type_ids=False)["input_ids"]

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

    def save_pretrained(self, folder) -> list[str]:
        return [Path(f).name for f in self.hf.save_pretrained(str(folder))]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def load_tokenizer(spec) -> Tokenizer:
    """What a user names as a tokenizer: "byte" (the built-in byte tokenizer), a Hugging Face tokenizer name or
    folder, a Tokenizer (returned as it is), or a transformers tokenizer object (wrapped)."""
    if isinstance(spec, Tokenizer):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return ByteTokenizer() if str(spec) == "byte" else HFTokenizer(spec)
    if callable(getattr(spec, "encode", None)) and callable(getattr(spec, "save_pretrained", None)):
        return HFTokenizer.wrap(spec)
    raise TypeError(f"a tokenizer is 'byte', a Hugging Face name or folder, or a tokenizer object; got "
                    f"{type(spec).__name__}")


def tokenizer_from_state(state) -> Optional[Tokenizer]:
    """The one rebuild of a tokenizer from what a checkpoint stores: its `state_dict()` ({"kind": "byte"} or
    {"kind": "hf", "name": ..., "files": {file name: bytes}}; no network needed), a name ("byte" or a Hugging
    Face name / folder, loaded as `load_tokenizer` does), or None (no tokenizer: None)."""
    if state is None:
        return None
    if isinstance(state, str):
        return load_tokenizer(state)
    if isinstance(state, dict):
        kind = state.get("kind")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "hf" and state.get("files"):
            return HFTokenizer.from_files(str(state.get("name") or "stored tokenizer"), dict(state["files"]))
        if kind == "hf" and state.get("name"):
            return HFTokenizer(state["name"])
        raise ValueError(f"unknown tokenizer entry {kind=!r} (expected 'byte', or 'hf' with its files or name)")
    raise ValueError(f"unknown tokenizer entry: a {type(state).__name__} (expected a dict from state_dict())")


def check_vocab_fits(tokenizer: Tokenizer, rows: int, what: str = "model.vocab_size",
                     hint: Optional[str] = None) -> None:
    """Every id the tokenizer can produce must have an embedding row: `rows` (`what`) >= its vocab_size."""
    if tokenizer.vocab_size > rows:
        raise ValueError(f"{what} = {rows} is smaller than the tokenizer's size {tokenizer.vocab_size} "
                         f"({tokenizer!r}); {hint or f'set {what} to at least {tokenizer.vocab_size}'}")
