"""Data for causal-LM training: packed token streams (pre-tokenized shards or cached text) and synthetic MQAR.

On-disk token format (training/shards.py): a folder of shards `*.bin` of raw little-endian uint16 or uint32 token
ids and a `meta.json` ({"dtype", "eos_id"}, and from `lit-mamba2 prepare` the shards in order with their token
counts); every document ends with eos_id. The shards are read as one stream, opened lazily.

Packing: the stream is cut into rows of seq_len + 1 tokens that overlap by one: row i covers stream[i*L : i*L + L + 1],
input_ids = its first L tokens, labels = its last L (so a row's last position takes the next token of the stream).
seq_idx numbers the documents inside a row from 0: the position after an eos starts a new document. The last rows
of the stream are the validation split, unless data.val_paths names a separate validation set.

Training order: one seeded permutation of the training rows per pass, passes concatenated; rank r of w takes every
w-th sample. The sampler starts where a resumed run left off, so a resumed run sees exactly the batches it would have.
A blend (data.blend) draws the global samples from several token folders in proportion to their weights
(BlendSampler); each source's last val_fraction of rows is held out for validation, as for a single stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import warnings
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from lit_mamba2.tokenizers import ByteTokenizer, Tokenizer
from lit_mamba2.training.shards import DTYPES, TokenStream, token_dtype, write_json_atomic, write_token_shard

IGNORE_INDEX = -100
CACHE_FORMAT = 1


@dataclass
class MQARConfig:
    """Multi-query associative recall (Zoology; Mamba-2 paper §9.1): key-value pairs, then the keys are queried."""

    vocab_size: int = 8192  # keys come from [1, vocab/2), values from [vocab/2, vocab); 0 fills the gaps
    num_kv_pairs: int = 16
    num_train: int = 100_000
    num_val: int = 1_000


@dataclass
class BlendSource:
    """One source of a blend: a token folder (e.g. `lit-mamba2 prepare`'s OUT/train) and its share of the rows."""

    path: str
    weight: float = 1.0


@dataclass
class DataConfig:
    kind: str = "text"  # "text": raw text files, tokenized once and cached; "tokens": token shards; "mqar": synthetic
    paths: list = field(default_factory=lambda: ["{stdlib}"])  # files or directories; "{stdlib}" = Python's stdlib
    # tokens: rows drawn from several token folders in proportion to their weights (instead of data.paths)
    blend: list[BlendSource] = field(default_factory=list)
    # tokens: a separate validation set (token folders, e.g. prepare's OUT/val): all its rows; val_fraction unused
    val_paths: list = field(default_factory=list)
    include: str = "*.py"  # text: which files inside directories are read
    exclude: list = field(default_factory=lambda: ["site-packages/*", "test/*", "idlelib/*", "lib2to3/*"])
    max_bytes: Optional[int] = 3_000_000  # text: read whole files in sorted order until this many bytes
    cache_dir: str = "~/.cache/lit-mamba2/tokens"
    seq_len: int = 256
    batch_size: int = 8  # per data-parallel rank
    global_batch_size: Optional[int] = None  # rows per optimizer step over all ranks: sets the gradient accumulation
    val_fraction: float = 0.02  # of the packed rows, taken from the end of the stream
    seed: int = 1234
    num_workers: int = 0
    mqar: MQARConfig = field(default_factory=MQARConfig)

    def __post_init__(self):
        if self.kind not in ("text", "tokens", "mqar"):
            raise ValueError(f"data.kind must be 'text', 'tokens' or 'mqar', got {self.kind!r}")
        for name in ("seq_len", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"data.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.global_batch_size is not None and not (isinstance(self.global_batch_size, int)
                                                       and self.global_batch_size > 0):
            raise ValueError(f"data.global_batch_size must be a positive integer or null, got "
                             f"{self.global_batch_size!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.max_bytes is not None and not (isinstance(self.max_bytes, int) and self.max_bytes > 0):
            raise ValueError(f"data.max_bytes must be a positive integer or null (no limit), got {self.max_bytes!r}")
        self.blend = [b if isinstance(b, BlendSource) else BlendSource(**b) for b in self.blend]
        if (self.blend or self.val_paths) and self.kind != "tokens":
            raise ValueError(f"data.{'blend' if self.blend else 'val_paths'} needs data.kind: tokens "
                             f"(got {self.kind!r})")
        if self.blend and self.paths not in ([], ["{stdlib}"]):
            raise ValueError("data.blend and data.paths both name training data: give one (data.paths: [])")
        for i, b in enumerate(self.blend):
            if not (isinstance(b.weight, (int, float)) and b.weight > 0):
                raise ValueError(f"data.blend[{i}].weight must be a positive number, got {b.weight!r}")


# ---- packing ---------------------------------------------------------------------------------------------------------

class PackedRows(Dataset):
    """Rows [row_start, row_stop) of a packed stream: {input_ids, labels, seq_idx}."""

    def __init__(self, stream: TokenStream, seq_len: int, row_start: int, row_stop: int,
                 vocab_size: Optional[int] = None):
        self.stream, self.seq_len, self.row_start, self.row_stop = stream, seq_len, row_start, row_stop
        self.vocab_size = vocab_size  # ids at or above it are refused here, not as an IndexError inside the model

    def __len__(self) -> int:
        return self.row_stop - self.row_start

    def __getitem__(self, i: int) -> dict:
        L = self.seq_len
        start = (self.row_start + i) * L
        x = self.stream.read(start, start + L + 1)
        if self.vocab_size is not None and x.max() >= self.vocab_size:
            at = start + int(np.argmax(x >= self.vocab_size))
            raise ValueError(f"token id {int(x.max())} at position {at:,} of the token stream is outside the model's "
                             f"vocabulary (model.vocab_size = {self.vocab_size}): the data was tokenized for "
                             "another vocabulary")
        inputs = x[:-1]
        seq_idx = np.zeros(L, dtype=np.int32)
        seq_idx[1:] = np.cumsum(inputs[:-1] == self.stream.eos_id)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(x[1:].copy()),
                "seq_idx": torch.from_numpy(seq_idx)}


def split_rows(num_tokens: int, seq_len: int, val_fraction: float) -> tuple[range, range]:
    rows = (num_tokens - 1) // seq_len
    n_val = 0 if val_fraction == 0 else max(1, int(rows * val_fraction))
    if rows - n_val < 1:
        raise ValueError(f"{num_tokens} tokens give {rows} rows of seq_len={seq_len}: too few for a training split "
                         f"and {n_val} validation rows; add data or lower data.seq_len")
    return range(0, rows - n_val), range(rows - n_val, rows)


def unigram_entropy(ids: np.ndarray) -> float:
    """Entropy (nats) of the token frequencies in ids: the loss of the best model that ignores context."""
    counts = np.bincount(np.asarray(ids).ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ---- raw text, tokenized once and cached ---------------------------------------------------------------------------

def expand_path(p: str) -> Path:
    """`{stdlib}` is Python's standard library; other braces are part of the path."""
    return Path(os.path.expanduser(p.replace("{stdlib}", sysconfig.get_paths()["stdlib"])))


def find_text_files(paths: list[str], include: str, exclude: list[str], max_bytes: Optional[int]) -> list[Path]:
    """Files named directly, plus those under directories matching `include` and no `exclude` pattern (relative
    paths), in sorted order, whole files until max_bytes is reached."""
    files = []
    for raw in paths:
        p = expand_path(raw)
        if not p.exists():
            raise FileNotFoundError(f"data path {raw!r} ({str(p)!r}) does not exist")
        if p.is_file():
            files.append(p)
            continue
        for f in sorted(p.rglob(include)):
            rel = f.relative_to(p).as_posix()
            if f.is_file() and not any(fnmatch(rel, pat) for pat in exclude):
                files.append(f)
    if not files:
        raise FileNotFoundError(f"no files matching {include!r} under data.paths {paths}")
    if max_bytes is not None:
        chosen, total = [], 0
        for f in files:
            if total >= max_bytes:
                break
            chosen.append(f)
            total += f.stat().st_size
        files = chosen
    return files


def text_cache_key(files: list[Path], tokenizer: Tokenizer) -> str:
    """Changes when any file is added, removed, resized or touched, or when the tokenizer changes."""
    h = hashlib.sha256(f"format={CACHE_FORMAT};tokenizer={tokenizer.identity}".encode())
    for f in files:
        st = f.stat()
        h.update(f"\n{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def tokenize_text_files(files: list[Path], tokenizer: Tokenizer, cache_dir: str | os.PathLike,
                        progress: bool = True) -> Path:
    """Tokenize the files (one document each, eos-terminated) into `<cache_dir>/<key>/`, unless already there.
    Returns that directory, a valid token-shard directory."""
    out = Path(os.path.expanduser(str(cache_dir))) / text_cache_key(files, tokenizer)
    if (out / "meta.json").exists():
        return out
    from tqdm.auto import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    chunks = []
    for f in tqdm(files, desc=f"tokenizing {len(files)} files", unit="file", disable=not progress):
        if isinstance(tokenizer, ByteTokenizer):
            ids = np.frombuffer(tokenizer.encode_bytes(f.read_bytes()), dtype=np.uint8)
        else:
            ids = np.asarray(tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")), dtype=np.int64)
        chunks += [ids.astype(DTYPES[dtype]), np.array([tokenizer.eos_id], dtype=DTYPES[dtype])]
    write_token_shard(out, "tokens", np.concatenate(chunks), dtype, tokenizer.eos_id)
    write_json_atomic(out / "sources.json", {"tokenizer": tokenizer.identity, "files": [str(f) for f in files]})
    return out


# ---- MQAR -----------------------------------------------------------------------------------------------------------

class MQARDataset(Dataset):
    """Example i (of a split) is a pure function of (seed, split, i): [k1 v1 ... kN vN | queries], where each key
    is queried once at a random even offset of the query region followed by its value. Labels are the values at the
    query positions and ignore_index elsewhere, so the loss and accuracy count recall only."""

    def __init__(self, num_examples: int, seq_len: int, cfg: MQARConfig, seed: int, split: int):
        n, V = cfg.num_kv_pairs, cfg.vocab_size
        if seq_len < 4 * n:
            raise ValueError(f"data.seq_len = {seq_len} is too short for {n} key-value pairs (needs >= {4 * n})")
        if V // 2 - 1 < n:
            raise ValueError(f"data.mqar.vocab_size = {V} has too few keys for {n} pairs (needs >= {2 * n + 2})")
        self.num_examples, self.seq_len, self.cfg, self.seed, self.split = num_examples, seq_len, cfg, seed, split

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict:
        n, V, L = self.cfg.num_kv_pairs, self.cfg.vocab_size, self.seq_len
        rng = np.random.default_rng([self.seed, self.split, i])
        keys = rng.choice(np.arange(1, V // 2), size=n, replace=False)
        values = rng.integers(V // 2, V, size=n)
        x = np.zeros(L + 1, dtype=np.int64)
        x[0: 2 * n: 2], x[1: 2 * n: 2] = keys, values
        slots = rng.choice((L + 1 - 2 * n) // 2, size=n, replace=False)
        pos = 2 * n + 2 * slots
        order = rng.permutation(n)
        x[pos], x[pos + 1] = keys[order], values[order]
        labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
        keep = pos < L  # a query whose answer falls at position L (the next row) is dropped
        labels[pos[keep]] = values[order][keep]
        return {"input_ids": torch.from_numpy(x[:L]), "labels": torch.from_numpy(labels)}


def data_parallel_rank_and_size(trainer) -> tuple[int, int]:
    """This process's data-parallel rank and the data-parallel degree (ranks of one cp or tp group read the same
    samples): the FSDP2 strategy's dp mesh, else every rank of the trainer (no trainer: one process)."""
    if trainer is None:
        return 0, 1
    mesh = getattr(trainer.strategy, "parallel_mesh", None)
    if mesh is not None:
        return mesh.dp.get_local_rank(), mesh.dp.size()
    return trainer.global_rank, trainer.world_size


# ---- sampling and the DataModule ------------------------------------------------------------------------------------

class ResumableSampler(Sampler[int]):
    """Rank `rank`'s share of an endless, seeded sequence of permutations of range(n), from sample `start` on.

    `__len__` is the full length, also when resuming: Lightning counts the batches it restored as already fetched."""

    def __init__(self, n: int, length: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n, self.length, self.seed, self.rank, self.world_size, self.start = n, length, seed, rank, world_size, start
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perm_cache[epoch]

    def _index(self, g: int) -> int:
        """The dataset index of global sample g."""
        return int(self._perm(g // self.n)[g % self.n])

    def __iter__(self) -> Iterator[int]:
        for p in range(self.start, self.length):
            yield self._index(p * self.world_size + self.rank)

    def __len__(self) -> int:
        return self.length


class BlendSampler(ResumableSampler):
    """The global-sample sampler over several sources (a ConcatDataset of `sizes`) drawn in proportion to `weights`.

    Global samples come in blocks of BLOCK: every block holds the same number of samples of each source (the
    weights' shares of BLOCK, largest remainders first) at positions shuffled by (seed, block), so source s's j-th
    sample is found from g alone. It is row j mod n_s of source s's pass j // n_s, a seeded permutation per pass: a
    source that runs out starts a new, reshuffled pass. Like ResumableSampler, any (rank, world_size, start) that
    reaches the same global samples reads the same rows."""

    BLOCK = 8192

    def __init__(self, sizes: list[int], weights: list[float], length: int, seed: int, rank: int = 0,
                 world_size: int = 1, start: int = 0, names: Optional[list[str]] = None):
        super().__init__(sum(sizes), length, seed, rank, world_size, start)
        self.sizes, self.offsets = list(sizes), np.cumsum([0] + list(sizes))
        self.names = names or [f"source {i}" for i in range(len(sizes))]
        share = np.asarray(weights, dtype=np.float64) / sum(weights) * self.BLOCK
        counts = np.floor(share).astype(np.int64)
        counts[np.argsort(-(share - counts), kind="stable")[: self.BLOCK - counts.sum()]] += 1
        if (counts == 0).any():
            i = int(np.argmax(counts == 0))
            raise ValueError(f"data.blend: {self.names[i]}'s weight is below 1/{self.BLOCK} of the total: it would "
                             "never be drawn")
        self.counts = counts
        self._layout = np.repeat(np.arange(len(sizes)), counts)
        self._block_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pass_cache: dict[tuple[int, int], np.ndarray] = {}
        self._seen_pass: dict[int, int] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b: each position's source, and how many samples of that source precede it in the block."""
        if b not in self._block_cache:
            source = self._layout[np.random.default_rng([self.seed, 1, b]).permutation(self.BLOCK)]
            order = np.argsort(source, kind="stable")
            within = np.empty(self.BLOCK, dtype=np.int64)
            within[order] = np.arange(self.BLOCK) - np.repeat(np.cumsum(self.counts) - self.counts, self.counts)
            self._block_cache = {b: (source, within)}
        return self._block_cache[b]

    def _source_pass(self, s: int, p: int) -> np.ndarray:
        if (s, p) not in self._pass_cache:
            self._pass_cache = {k: v for k, v in self._pass_cache.items() if k[0] != s}
            self._pass_cache[(s, p)] = np.random.default_rng([self.seed, 2, s, p]).permutation(self.sizes[s])
        if p > self._seen_pass.setdefault(s, p):
            self._seen_pass[s] = p
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"data.blend: {self.names[s]} ran out of its {self.sizes[s]:,} rows; pass {p + 1} over "
                           "them starts, reshuffled")
        return self._pass_cache[(s, p)]

    def _index(self, g: int) -> int:
        b, i = divmod(g, self.BLOCK)
        source, within = self._block(b)
        s = int(source[i])
        p, r = divmod(b * int(self.counts[s]) + int(within[i]), self.sizes[s])
        return int(self.offsets[s] + self._source_pass(s, p)[r])


class ShardSampler(Sampler[int]):
    """Validation: rank r takes rows r, r + w, r + 2w, ... in order."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class LMDataModule(L.LightningDataModule):
    """Text, token shards or MQAR, as DataConfig.kind says; batches of {input_ids, labels[, seq_idx]}."""

    def __init__(self, config: DataConfig, tokenizer: Optional[Tokenizer] = None, max_steps: Optional[int] = None,
                 accumulate_grad_batches: Optional[int] = None, vocab_size: Optional[int] = None):
        """max_steps, accumulate_grad_batches: the run's length, which the training loader's one pass covers;
        None: the trainer's (a user's own L.Trainer or LightningCLI)."""
        super().__init__()
        self.config, self.tokenizer, self.vocab_size = config, tokenizer, vocab_size
        self._max_steps, self._accumulate = max_steps, accumulate_grad_batches
        self.train_set = self.val_set = None
        if config.kind == "text" and tokenizer is None:
            raise ValueError("data.kind 'text' needs a tokenizer")

    @property
    def max_steps(self) -> int:
        if self._max_steps is not None:
            return self._max_steps
        steps = self.trainer.max_steps if self.trainer is not None else 1
        if steps is None or steps < 1:
            raise ValueError("LMDataModule draws a run's rows in advance: give the trainer max_steps (or the "
                             "data module max_steps)")
        return steps

    @property
    def accumulate(self) -> int:
        if self._accumulate is not None:
            return self._accumulate
        return self.trainer.accumulate_grad_batches if self.trainer is not None else 1

    @accumulate.setter
    def accumulate(self, value: int) -> None:
        self._accumulate = value

    @max_steps.setter
    def max_steps(self, value: int) -> None:
        self._max_steps = value

    # what decides which rows a step trains on: a resumed run with other values no longer sees "exactly the
    # batches an uninterrupted run would have" (it is allowed, e.g. to change the batch size on purpose, but said)
    # (the rows per optimizer step count, not how they are split over ranks and micro-batches: the position in
    # the sample sequence is steps × global batch on any layout)
    _ORDER_FIELDS = ("kind", "paths", "blend", "val_paths", "include", "exclude", "max_bytes", "seq_len",
                     "val_fraction", "seed", "mqar")

    def state_dict(self) -> dict:
        order = {k: v for k, v in asdict(self.config).items() if k in self._ORDER_FIELDS}
        return {"data": json.loads(json.dumps(order)),
                "global_batch": self.config.batch_size * self._rank_world()[1] * self.accumulate}

    def load_state_dict(self, state: dict) -> None:
        now = self.state_dict()
        changed = [f"data.{k}" for k, v in state.get("data", {}).items()
                   if k in self._ORDER_FIELDS and now["data"].get(k) != v]
        if state.get("global_batch", now["global_batch"]) != now["global_batch"]:
            changed.append(f"global batch ({state['global_batch']} rows, now {now['global_batch']})")
        if changed:
            warnings.warn(f"resuming with other {', '.join(changed)} than the checkpoint's run: training goes on, "
                          "but not over the batches the uninterrupted run would have seen")

    # text is tokenized once per node (rank 0 of each node; the others wait), into a cache keyed by content
    def prepare_data(self) -> None:
        if self.config.kind == "text":
            self.token_dir()

    def token_dir(self) -> Path:
        c = self.config
        files = find_text_files(c.paths, c.include, c.exclude, c.max_bytes)
        return tokenize_text_files(files, self.tokenizer, c.cache_dir)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        c = self.config
        if c.kind == "mqar":
            self.train_set = MQARDataset(c.mqar.num_train, c.seq_len, c.mqar, c.seed, split=0)
            self.val_set = MQARDataset(c.mqar.num_val, c.seq_len, c.mqar, c.seed, split=1)
            return
        if c.blend:
            streams = [self._stream([b.path], f"data.blend[{i}]") for i, b in enumerate(c.blend)]
        else:
            streams = [self._stream([self.token_dir()] if c.kind == "text" else c.paths, "data.paths")]
        val_fraction = 0.0 if c.val_paths else c.val_fraction  # a separate validation set: train on every row
        train, val = [], []
        for stream in streams:
            train_rows, val_rows = split_rows(len(stream), c.seq_len, val_fraction)
            train.append(PackedRows(stream, c.seq_len, train_rows.start, train_rows.stop, self.vocab_size))
            if len(val_rows):
                val.append(PackedRows(stream, c.seq_len, val_rows.start, val_rows.stop, self.vocab_size))
        if c.val_paths:
            stream = self._stream(c.val_paths, "data.val_paths")
            rows = (len(stream) - 1) // c.seq_len
            if rows < 1:
                raise ValueError(f"data.val_paths hold {len(stream)} tokens: not one row of seq_len={c.seq_len}")
            val = [PackedRows(stream, c.seq_len, 0, rows, self.vocab_size)]
        self.train_set = train[0] if len(train) == 1 else ConcatDataset(train)
        self.val_set = None if not val else val[0] if len(val) == 1 else ConcatDataset(val)

    def _stream(self, paths: list, what: str) -> TokenStream:
        stream = TokenStream(paths)
        if self.tokenizer is not None and stream.eos_id != self.tokenizer.eos_id:
            raise ValueError(f"{what}: token shards end documents with eos_id {stream.eos_id}, but the tokenizer's "
                             f"eos is {self.tokenizer.eos_id}")
        return stream

    def _rank_world(self) -> tuple[int, int]:
        return data_parallel_rank_and_size(self.trainer)

    def _generator(self) -> torch.Generator:
        """A loader's own generator (for its workers' seeds): loaders are made at other points of a resumed run
        than of an uninterrupted one, and must not draw from torch's global generator."""
        return torch.Generator().manual_seed(self.config.seed)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        c = self.config
        batches = self.max_steps * self.accumulate  # per rank: the whole run is one pass of this loader
        # batches already trained when resuming ("processed": a checkpoint written in on_train_batch_end has not
        # counted its batch as completed yet; Lightning does that only after this loader is built)
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer is not None else 0
        if c.batch_size * world > len(self.train_set):  # a batch would hold the same row twice
            raise ValueError(f"data.batch_size = {c.batch_size} x {world} processes is more than the "
                             f"{len(self.train_set)} training rows; add data, or lower data.batch_size or seq_len")
        if getattr(c, "blend", None):  # (a fine-tuning DataConfig has none)
            sampler = BlendSampler([len(d) for d in self.train_set.datasets] if isinstance(
                self.train_set, ConcatDataset) else [len(self.train_set)], [b.weight for b in c.blend],
                batches * c.batch_size, c.seed, rank, world, start=done * c.batch_size,
                names=[f"data.blend[{i}] ({b.path})" for i, b in enumerate(c.blend)])
        else:
            sampler = ResumableSampler(len(self.train_set), batches * c.batch_size, c.seed, rank, world,
                                       start=done * c.batch_size)
        return DataLoader(self.train_set, batch_size=c.batch_size, sampler=sampler, num_workers=c.num_workers,
                          drop_last=True, persistent_workers=c.num_workers > 0, generator=self._generator())

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            return []
        rank, world = self._rank_world()
        if len(self.val_set) < world:  # a process with no rows would stop the others' validation
            what = "data.val_paths hold" if getattr(self.config, "val_paths", None) else "data.val_fraction gives"
            raise ValueError(f"{what} {len(self.val_set)} validation rows for {world} processes; "
                             "raise data.val_fraction (or set it to 0: no validation)")
        return DataLoader(self.val_set, batch_size=self.config.batch_size, generator=self._generator(),
                          sampler=ShardSampler(len(self.val_set), rank, world), num_workers=self.config.num_workers)

    def val_tokens(self) -> np.ndarray:
        """The validation split's input tokens (for the unigram-entropy baseline)."""
        if self.val_set is None or isinstance(self.val_set, MQARDataset):
            return np.zeros(0, dtype=np.int64)
        L = self.config.seq_len
        parts = self.val_set.datasets if isinstance(self.val_set, ConcatDataset) else [self.val_set]
        return np.concatenate([d.stream.read(d.row_start * L, d.row_stop * L) for d in parts])
