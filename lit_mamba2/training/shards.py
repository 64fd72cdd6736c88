"""The token-shard format: writing shards and reading a folder of them as one stream.

A token folder holds shards `*.bin` of raw little-endian uint16 or uint32 token ids (no header) and one `meta.json`:
{"dtype": "uint16" | "uint32", "eos_id": <int>}; every document ends with eos_id. `lit-mamba2 prepare` also writes
"shards": [{"file", "tokens", "docs"}, ...] (the stream's order) with the tokenizer, the sources and the totals;
a folder whose meta.json lists its shards is read without touching them at setup. Without that list, the shards
are the folder's `*.bin` files in name order, sized by their length on disk.

This module needs numpy only (no torch, no Lightning): `prepare`'s worker processes import it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int) -> str:
    """The narrowest shard dtype that holds every id below vocab_size (len(tokenizer): added tokens counted)."""
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


def _temp_name(path: Path) -> Path:
    """A name beside `path` that no other process writes: concurrent writers of one cache entry (runs sharing
    the cache, every node's rank 0) each write their own file and move it into place whole."""
    return path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = _temp_name(path)
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class ShardWriter:
    """One shard written piece by piece into a temporary file and moved into place whole by commit(): a crash
    leaves no partial shard under the final name."""

    def __init__(self, path: str | os.PathLike, dtype: str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.path, self.dtype = Path(path), dtype
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _temp_name(self.path)
        self.file = open(self.tmp, "wb")
        self.tokens = 0

    def write(self, ids) -> None:
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(DTYPES[self.dtype]).max):
            raise ValueError(f"token ids in [{arr.min()}, {arr.max()}] do not fit {self.dtype}")
        arr.astype(DTYPES[self.dtype], copy=False).tofile(self.file)
        self.tokens += arr.size

    def commit(self) -> Path:
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_token_shard(directory: str | os.PathLike, name: str, ids, dtype: str, eos_id: int) -> Path:
    """Write ids as one shard `<directory>/<name>.bin` (and meta.json). Atomic: a crash leaves no partial shard."""
    writer = ShardWriter(Path(directory) / f"{name}.bin", dtype)
    try:
        writer.write(ids)
    except BaseException:
        writer.abort()
        raise
    path = writer.commit()
    write_json_atomic(Path(directory) / "meta.json", {"dtype": dtype, "eos_id": int(eos_id)})
    return path


def read_meta(meta_path: Path) -> dict:
    if not meta_path.exists():
        raise FileNotFoundError(f"{str(meta_path)!r} is missing: token shards need a meta.json beside them "
                                f'giving {{"dtype": "uint16" or "uint32", "eos_id": <int>}}')
    meta = json.loads(meta_path.read_text())
    if meta.get("dtype") not in DTYPES or not isinstance(meta.get("eos_id"), int):
        raise ValueError(f"{meta_path}: needs dtype in {sorted(DTYPES)} and an integer eos_id, got "
                         f"{ {k: meta.get(k) for k in ('dtype', 'eos_id')} }")
    return meta


class TokenStream:
    """Token folders (or single shard files) read as one stream, in order.

    Setup reads each folder's meta.json and lists the folder, nothing more when meta.json gives the shards' token
    counts. A shard is opened (np.memmap) when first read; at most `max_open` stay open, the least recently read
    closed first, so a stream of thousands of shards holds a bounded number of open files."""

    def __init__(self, paths: list[str | os.PathLike], max_open: int = 64):
        files, lengths, metas = [], [], set()
        for p in map(lambda p: Path(os.path.expanduser(str(p))), paths):
            if not p.exists():
                raise FileNotFoundError(f"data path {str(p)!r} does not exist")
            folder = p if p.is_dir() else p.parent
            on_disk = sorted(folder.glob("*.bin")) if p.is_dir() else [p]
            if not on_disk:
                raise FileNotFoundError(f"no token shards (*.bin) in {str(p)!r}")
            meta = read_meta(folder / "meta.json")
            metas.add((meta["dtype"], meta["eos_id"]))
            itemsize = DTYPES[meta["dtype"]].itemsize
            listed = {s["file"]: int(s["tokens"]) for s in meta.get("shards", ())}
            if listed:
                if p.is_dir():
                    names = {f.name for f in on_disk}
                    unlisted = sorted(names - set(listed))
                    missing = [name for name in listed if name not in names]
                    if unlisted:
                        raise ValueError(f"{str(folder / unlisted[0])!r} is not listed in {folder / 'meta.json'} "
                                         "(a shard added by hand? list it there, or move it to its own folder)")
                    if missing:
                        raise FileNotFoundError(f"{str(folder / missing[0])!r} is listed in "
                                                f"{folder / 'meta.json'} but missing")
                    chosen = [(folder / name, n) for name, n in listed.items()]
                elif p.name in listed:
                    chosen = [(p, listed[p.name])]
                else:
                    raise ValueError(f"{str(p)!r} is not listed in {folder / 'meta.json'}")
            else:  # a folder written by hand: its files, sized on disk
                chosen = []
                for f in on_disk:
                    size = os.path.getsize(f)
                    if size % itemsize:
                        raise ValueError(f"{str(f)!r}: {size} bytes is not a whole number of {meta['dtype']} "
                                         "token ids (truncated, or written with another dtype than meta.json says)")
                    chosen.append((f, size // itemsize))
            for f, n in chosen:
                if n > 0:
                    files.append(f)
                    lengths.append(n)
        if len(metas) > 1:
            raise ValueError(f"token shards disagree on dtype/eos_id: {sorted(metas)}")
        (dtype, self.eos_id), = metas
        self.dtype = DTYPES[dtype]
        self.files, self.max_open = files, max_open
        self.offsets = np.cumsum([0] + lengths)
        self._open: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict:  # DataLoader workers open their own maps
        return {**self.__dict__, "_open": OrderedDict()}

    def shard(self, k: int) -> np.memmap:
        """Shard k's tokens (opened now if it is not open; the least recently read one is closed if too many)."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        f, n = self.files[k], int(self.offsets[k + 1] - self.offsets[k])
        size = os.path.getsize(f) if f.exists() else None
        if size != n * self.dtype.itemsize:
            raise ValueError(f"{str(f)!r}: {'missing' if size is None else f'{size} bytes'}, but meta.json says "
                             f"{n} tokens ({n * self.dtype.itemsize} bytes)")
        while len(self._open) >= self.max_open:
            self._open.popitem(last=False)
        self._open[k] = np.memmap(f, dtype=self.dtype, mode="r", shape=(n,))
        return self._open[k]

    def read(self, start: int, stop: int) -> np.ndarray:
        """stream[start:stop] as int64, across shard boundaries."""
        parts = []
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for k in range(first, len(self.files)):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            if lo >= stop:
                break
            parts.append(np.array(self.shard(k)[max(start - lo, 0): min(stop, hi) - lo], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def write_token_meta(directory: str | os.PathLike, dtype: str, eos_id: int, shards: Optional[list[dict]] = None,
                     **info) -> None:
    """meta.json for a folder of shards: dtype, eos_id, and (prepare) the shards in order and what else is given."""
    meta = {"dtype": dtype, "eos_id": int(eos_id), **info}
    if shards is not None:
        meta["shards"] = shards
        meta["tokens"] = sum(s["tokens"] for s in shards)
        if all("docs" in s for s in shards):
            meta["docs"] = sum(s["docs"] for s in shards)
    write_json_atomic(Path(directory) / "meta.json", meta)
