"""`lit-mamba2 prepare`: a corpus tokenized into the token folders that `data.kind: tokens` reads, OUT/train/ and
OUT/val/.

Inputs: JSONL (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`; one JSON object a line, its text under --text_key), Parquet
(the --text_key column), any other file as plain text (one document per file), folders of these (recursively, in
sorted order, hidden files skipped), a Hugging Face dataset saved with `save_to_disk` (its train split), and
`hf:NAME[:CONFIG]`: `datasets.load_dataset(NAME, CONFIG, split="train")` (from the local cache when
HF_DATASETS_OFFLINE=1). A document with no or empty text is skipped. Each document is encoded without special tokens
and ends with eos (the byte tokenizer drops NUL bytes: byte 0 is its eos).

The result depends on the inputs and settings only, never on --workers or timing:
- the inputs are cut into units fixed by the inputs alone: a compressed JSONL or a Parquet file, a byte range of a
  large plain JSONL file, a group of text files, a row range of a dataset;
- a first pass counts each unit's documents; `--val_docs` of them, drawn by `--seed`, are the validation split;
- one worker tokenizes one unit into its own training shards `<unit>-<k>.bin`, each closed at the first document
  end after --shard_tokens tokens, and keeps the unit's validation documents aside; after each shard it writes a
  record to OUT/.prepare/done/ (last: the shard is whole);
- when every unit is done: the validation documents, in corpus order, go to OUT/val/, then each folder's meta.json
  (dtype, eos_id, the tokenizer, the sources, the shards in order with their token and document counts).
An interrupted run, run again, keeps the shards with a record and tokenizes the rest (it reads, but does not encode,
the documents before them). An output folder prepared with another tokenizer or other settings is refused.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np

from lit_mamba2.tokenizers import ByteTokenizer, Tokenizer, _first_line, load_tokenizer, tokenizer_from_state
from lit_mamba2.training.shards import DTYPES, ShardWriter, token_dtype, write_json_atomic, write_token_meta

FORMAT = 1
JSONL_RANGE_BYTES = 256 * 2 ** 20  # a plain .jsonl file is cut into units of this many bytes
TEXT_UNIT_BYTES, TEXT_UNIT_FILES = 64 * 2 ** 20, 10_000  # text files are grouped into units up to these
DATASET_UNIT_ROWS = 50_000
ENCODE_BATCH = 256  # documents encoded in one call


@dataclass
class PrepareConfig:
    """The options of `lit-mamba2 prepare`.

    Args:
        input: what to read (repeat --input for several): a JSONL file (.jsonl, .jsonl.gz, .jsonl.zst), a Parquet
            file, a text file (one document), a folder of these, a Hugging Face dataset folder (save_to_disk), or
            hf:NAME[:CONFIG] (datasets.load_dataset, train split).
        output: the folder written: output/train/ and output/val/ (token folders for data.kind: tokens).
        tokenizer: "byte", a Hugging Face tokenizer name, or a folder with its files.
        workers: tokenizing processes (null: one per CPU core); the result is the same for any number.
        text_key: the JSON key, Parquet column or dataset column that holds a document's text.
        val_docs: documents drawn (by seed) from the whole input into output/val/ (0: no validation split).
        seed: the seed of the validation draw.
        shard_tokens: a training shard is closed at the first document end after this many tokens.
        progress: show progress bars.
    """

    input: Union[str, list[str]] = field(metadata={"repeatable": True})
    output: str
    tokenizer: str
    workers: Optional[int] = None
    text_key: str = "text"
    val_docs: int = 1000
    seed: int = 1234
    shard_tokens: int = 100_000_000
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.input, str):
            self.input = [self.input]
        if not self.input:
            raise ValueError("--input: give at least one file, folder or hf:NAME")
        for name in ("val_docs", "shard_tokens", "workers"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= (0 if name == "val_docs" else 1)):
                raise ValueError(f"--{name} must be a {'non-negative' if name == 'val_docs' else 'positive'} "
                                 f"integer, got {v!r}")


# ---------------------------------------------------------------------------------------------------------------
# the inputs, as units of work
# ---------------------------------------------------------------------------------------------------------------
def _needs(extra_module: str, what: str):
    import importlib

    try:
        return importlib.import_module(extra_module)
    except ImportError:
        package = {"pyarrow.parquet": "pyarrow"}.get(extra_module, extra_module)
        raise ImportError(f"{what} needs {package}: pip install 'lit-mamba2[prepare]'") from None


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def _dataset_units(spec: str, source: int) -> tuple[list[dict], str]:
    """A Hugging Face dataset (a save_to_disk folder, or hf:NAME[:CONFIG]) as row ranges over its arrow files."""
    datasets = _needs("datasets", f"the input {spec!r}")
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split="train")
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds
            raise ValueError(f"--input {spec!r}: datasets.load_dataset({name!r}, {config or None!r}, split='train') "
                             f"failed: {_first_line(e)}") from None
    else:
        ds = datasets.load_from_disk(spec)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"--input {spec!r}: a dataset with splits {sorted(ds)}; prepare reads its 'train' "
                                 "split (save the split you want on its own)")
            ds = ds["train"]
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise ValueError(f"--input {spec!r}: the dataset has no files on disk (save it with save_to_disk)")
    units = [{"source": source, "kind": "dataset", "files": files, "start": s, "stop": min(s + DATASET_UNIT_ROWS,
             len(ds))} for s in range(0, len(ds), DATASET_UNIT_ROWS)]
    return units, f"{spec}|{ds._fingerprint}|{len(ds)}"


def list_units(inputs: list[str]) -> tuple[list[dict], list[dict], str]:
    """(sources, units, fingerprint): the inputs in order, cut into units of work that depend on the inputs alone;
    the fingerprint changes when any input file is added, removed, resized or touched."""
    sources, units, prints = [], [], []
    for i, spec in enumerate(inputs):
        path = Path(os.path.expanduser(spec))
        if spec.startswith("hf:") or _is_saved_dataset(path):
            new, fp = _dataset_units(spec if spec.startswith("hf:") else str(path.resolve()), i)
            units += new
            prints.append(fp)
            sources.append({"input": spec, "kind": "dataset"})
            continue
        if not path.exists():
            raise FileNotFoundError(f"--input {spec!r} does not exist (a file, a folder, or hf:NAME for a Hugging "
                                    "Face dataset)")
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(path).parts))
            if not files:
                raise FileNotFoundError(f"--input {spec!r}: the folder holds no files")
        else:
            files = [path]
        kinds = {}
        text_group, text_bytes = [], 0
        for f in files:
            kind = file_kind(f)
            kinds[kind] = kinds.get(kind, 0) + 1
            prints.append(_fingerprint(f))
            if kind == "text":
                size = f.stat().st_size
                if text_group and (text_bytes + size > TEXT_UNIT_BYTES or len(text_group) >= TEXT_UNIT_FILES):
                    units.append({"source": i, "kind": "text", "files": text_group})
                    text_group, text_bytes = [], 0
                text_group.append(str(f))
                text_bytes += size
                continue
            if text_group:  # the unit order follows the file order
                units.append({"source": i, "kind": "text", "files": text_group})
                text_group, text_bytes = [], 0
            if kind == "jsonl" and f.name.lower().endswith(".jsonl"):
                size = f.stat().st_size
                units += [{"source": i, "kind": "jsonl", "path": str(f), "start": s,
                           "stop": min(s + JSONL_RANGE_BYTES, size)} for s in range(0, max(size, 1),
                                                                                     JSONL_RANGE_BYTES)]
            else:
                units.append({"source": i, "kind": kind, "path": str(f)})
        if text_group:
            units.append({"source": i, "kind": "text", "files": text_group})
        sources.append({"input": spec, "path": str(path.resolve()), "files": kinds})
    digest = hashlib.sha256("\n".join(prints).encode()).hexdigest()[:20]
    return sources, units, digest


def _open_jsonl(path: str):
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".zst"):
        zstandard = _needs("zstandard", f"{path!r} (zstd-compressed)")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _jsonl_documents(unit: dict, text_key: str) -> Iterator[str]:
    path, start, stop = unit["path"], unit.get("start", 0), unit.get("stop")
    with _open_jsonl(path) as f:
        if start > 0:  # a line belongs to the range its first byte lies in
            f.seek(start - 1)
            f.readline()
        pos, line_no = f.tell() if stop is not None else 0, 0
        while stop is None or pos < stop:
            line = f.readline()
            if not line:
                break
            where = f"line {line_no + 1}" if start == 0 else f"the line at byte {pos}"
            pos += len(line)
            line_no += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}, {where}: not JSON ({e})") from None
            if not isinstance(record, dict) or text_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}, {where}: no key {text_key!r} (it has {keys}); set --text_key")
            text = record[text_key]
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise ValueError(f"{path}, {where}: {text_key!r} is a {type(text).__name__}, not a text")
            yield text


def _column_texts(chunks, where: str, text_key: str) -> Iterator[str]:
    for chunk in chunks:
        for text in chunk.to_pylist():
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise ValueError(f"{where}: column {text_key!r} holds {type(text).__name__} values, not texts")
            yield text


def _parquet_documents(unit: dict, text_key: str) -> Iterator[str]:
    pq = _needs("pyarrow.parquet", f"the Parquet file {unit['path']!r}")
    pf = pq.ParquetFile(unit["path"])
    names = pf.schema_arrow.names
    if text_key not in names:
        raise ValueError(f"{unit['path']}: no column {text_key!r} (it has {names}); set --text_key")
    chunks = (b.column(0) for b in pf.iter_batches(batch_size=1024, columns=[text_key]))
    yield from _column_texts(chunks, unit["path"], text_key)


_DATASETS: dict = {}


def _dataset_documents(unit: dict, text_key: str) -> Iterator[str]:
    key = tuple(unit["files"])
    if key not in _DATASETS:
        datasets = _needs("datasets", "a Hugging Face dataset input")
        _DATASETS.clear()
        _DATASETS[key] = datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in unit["files"]])
    ds = _DATASETS[key]
    if text_key not in ds.column_names:
        raise ValueError(f"{unit['files'][0]}: the dataset has no column {text_key!r} (it has {ds.column_names}); "
                         "set --text_key")
    column = ds.data.column(text_key)
    step = 1024
    chunks = (column.slice(s, min(step, unit["stop"] - s)) for s in range(unit["start"], unit["stop"], step))
    yield from _column_texts(chunks, unit["files"][0], text_key)


def _text_documents(unit: dict, text_key: str) -> Iterator[str]:
    for f in unit["files"]:
        if os.path.getsize(f) > 0:
            yield Path(f).read_text(encoding="utf-8", errors="replace")


READERS: dict[str, Callable[[dict, str], Iterator[str]]] = {
    "jsonl": _jsonl_documents, "parquet": _parquet_documents, "dataset": _dataset_documents, "text": _text_documents}


def iter_documents(unit: dict, text_key: str) -> Iterator[str]:
    """A unit's documents, in order (the same on every read)."""
    return READERS[unit["kind"]](unit, text_key)


def count_documents(unit: dict, text_key: str) -> int:
    if unit["kind"] == "text":  # one document per non-empty file: no need to read them
        return sum(os.path.getsize(f) > 0 for f in unit["files"])
    return sum(1 for _ in iter_documents(unit, text_key))


# ---------------------------------------------------------------------------------------------------------------
# one unit, tokenized into its shards
# ---------------------------------------------------------------------------------------------------------------
def shard_name(unit: int, k: int, width: int) -> str:
    return f"{unit:0{width}d}-{k:05d}"


def _records(done_dir: Path, u: int, width: int) -> list[dict]:
    """The finished shards of unit u, in order (a gap ends the list: what follows is redone)."""
    out = []
    while True:
        p = done_dir / f"{shard_name(u, len(out), width)}.json"
        if not p.exists():
            return out
        out.append(json.loads(p.read_text()))
        if out[-1]["final"]:
            return out


def _encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    if isinstance(tokenizer, ByteTokenizer):
        return [np.concatenate([np.frombuffer(tokenizer.encode_bytes(t.encode("utf-8")), dtype=np.uint8)
                                .astype(dtype), eos]) for t in texts]
    return [np.concatenate([np.asarray(ids, dtype=dtype), eos]) for ids in tokenizer.encode_batch(texts)]


def tokenize_unit(u: int, unit: dict, val_local: list[int], out: Path, plan: dict, tokenizer: Tokenizer,
                  report: Callable[[int, int], None]) -> None:
    """Unit u's documents into OUT/train/<u>-<k>.bin (k = 0, 1, ...) and OUT/.prepare/val/<u>-<k>.bin (its
    validation documents among those of shard k), each shard followed by its record in OUT/.prepare/done/."""
    width, dtype, text_key = plan["name_width"], DTYPES[plan["dtype"]], plan["settings"]["text_key"]
    limit = plan["settings"]["shard_tokens"]
    work = out / ".prepare"
    done = _records(work / "done", u, width)
    if done and done[-1]["final"]:
        report(unit["docs"], 0)
        return
    k, first = len(done), (done[-1]["doc_stop"] if done else 0)
    docs = iter_documents(unit, text_key)
    skipped = 0
    for _ in range(first):  # read, not encoded: those documents are in finished shards
        next(docs)
        skipped += 1
    report(skipped, 0)
    val = set(val_local)

    def start_shard():
        return {"writer": ShardWriter(out / "train" / f"{shard_name(u, k, width)}.bin", plan["dtype"]),
                "docs": 0, "val": [], "val_docs": 0, "doc_start": index}

    def finish_shard(shard, final: bool) -> None:
        name = shard_name(u, k, width)
        writer = shard["writer"]
        if writer.tokens:
            writer.commit()
        else:
            writer.abort()
        val_tokens = sum(len(a) for a in shard["val"])
        if shard["val"]:
            vw = ShardWriter(work / "val" / f"{name}.bin", plan["dtype"])
            vw.write(np.concatenate(shard["val"]))
            vw.commit()
        write_json_atomic(work / "done" / f"{name}.json", {
            "unit": u, "shard": k, "file": f"{name}.bin" if writer.tokens else None, "tokens": writer.tokens,
            "docs": shard["docs"], "val_tokens": val_tokens, "val_docs": shard["val_docs"],
            "doc_start": shard["doc_start"], "doc_stop": index, "final": final})

    index = first
    shard = start_shard()
    try:
        while True:
            texts = [t for _, t in zip(range(ENCODE_BATCH), docs)]
            if not texts:
                break
            tokens = 0
            for ids in _encode(tokenizer, texts, dtype):
                if index in val:
                    shard["val"].append(ids)
                    shard["val_docs"] += 1
                else:
                    shard["writer"].write(ids)
                    shard["docs"] += 1
                tokens += len(ids)
                index += 1
                if shard["writer"].tokens >= limit:
                    finish_shard(shard, final=False)
                    k += 1
                    shard = start_shard()
            report(len(texts), tokens)
        finish_shard(shard, final=True)
    except BaseException:
        shard["writer"].abort()
        raise
    if index != unit["docs"]:
        raise RuntimeError(f"{unit.get('path') or unit['files'][0]}: {index} documents read, {unit['docs']} counted "
                           "before: the input changed while it was prepared")


# ---------------------------------------------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer_state: dict, counters) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER["tokenizer"] = tokenizer_from_state(tokenizer_state)
    _WORKER["counters"] = counters


def _report_shared(docs: int, tokens: int) -> None:
    c = _WORKER["counters"]
    with c[0].get_lock():
        c[0].value += docs
    with c[1].get_lock():
        c[1].value += tokens


def _count_job(args) -> tuple[int, int]:
    u, unit, text_key = args
    return u, count_documents(unit, text_key)


def _tokenize_job(args) -> int:
    u, unit, val_local, out, plan = args
    tokenize_unit(u, unit, val_local, Path(out), plan, _WORKER["tokenizer"], _report_shared)
    return u


class _Runner:
    """Jobs run in this process (workers == 1) or in a pool of worker processes; results in any order, with
    progress counters (documents, tokens) that workers add to while they run."""

    def __init__(self, workers: int, tokenizer: Tokenizer):
        self.workers, self.tokenizer, self.pool = workers, tokenizer, None
        if workers > 1:
            ctx = mp.get_context("forkserver")  # not fork: the parent may hold threads (tokenizers, torch)
            # imported once, in the server the workers fork from (a failed import there is skipped)
            hf = [] if isinstance(tokenizer, ByteTokenizer) else [
                "transformers.models.auto.tokenization_auto", "transformers.tokenization_utils_fast"]
            ctx.set_forkserver_preload(["lit_mamba2.training.prepare", *hf])
            self.counters = (ctx.Value("q", 0), ctx.Value("q", 0))
            self.pool = ctx.Pool(workers, _init_worker, (tokenizer.state_dict(), self.counters))
        else:
            self.local = [0, 0]

    def totals(self) -> tuple[int, int]:
        if self.pool is None:
            return tuple(self.local)
        return self.counters[0].value, self.counters[1].value

    def run(self, fn, jobs: list, tick: Callable[[], None]) -> Iterator:
        if self.pool is None:
            def report(docs, tokens):
                self.local[0] += docs
                self.local[1] += tokens
                tick()

            for job in jobs:
                if fn is _tokenize_job:
                    u, unit, val_local, out, plan = job
                    tokenize_unit(u, unit, val_local, Path(out), plan, self.tokenizer, report)
                    yield u
                else:
                    yield fn(job)
                tick()
            return
        results = self.pool.imap_unordered(fn, jobs, chunksize=1)
        for _ in range(len(jobs)):
            while True:
                try:
                    r = results.next(timeout=0.25)
                    break
                except mp.TimeoutError:
                    tick()
            tick()
            yield r

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            (self.pool.close if ok else self.pool.terminate)()
            self.pool.join()


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------
def _tokenizer_entry(tokenizer: Tokenizer, spec: str) -> dict:
    return {"name": spec, "identity": tokenizer.identity, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id}


def _check_output(out: Path, tokenizer: dict, settings: dict) -> Optional[dict]:
    """The plan of an earlier run into `out` (None: a fresh folder); a folder prepared with another tokenizer or
    settings, or one that holds something else, is refused."""
    plan_path = out / ".prepare" / "plan.json"
    meta_path = out / "train" / "meta.json"
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not out.is_dir():
        raise ValueError(f"--output {str(out)!r} is a file, not a folder")
    earlier = json.loads(plan_path.read_text()) if plan_path.exists() else None
    theirs = (earlier or {}).get("tokenizer") or (json.loads(meta_path.read_text()).get("tokenizer")
                                                  if meta_path.exists() else None)
    if theirs is None:
        raise ValueError(f"--output {str(out)!r} is not empty and holds no prepare run; give a new or empty folder")
    if theirs.get("identity") != tokenizer["identity"]:
        raise ValueError(f"--output {str(out)!r} holds shards of another tokenizer ({theirs.get('name')!r}, "
                         f"{theirs.get('identity')}), not of {tokenizer['name']!r} ({tokenizer['identity']}); give "
                         "another --output (or delete that folder)")
    if earlier is None:
        raise ValueError(f"--output {str(out)!r} holds prepared shards without their plan (.prepare/plan.json); "
                         "give another --output (or delete that folder)")
    for k, v in settings.items():
        if earlier["settings"].get(k) != v:
            raise ValueError(f"--output {str(out)!r} was prepared with --{k} {earlier['settings'].get(k)!r}, not "
                             f"{v!r}; give the same, or another --output")
    return earlier


def _choose_validation(total: int, val_docs: int, seed: int) -> np.ndarray:
    if val_docs >= total:
        raise ValueError(f"--val_docs {val_docs} is not less than the {total} documents of the input: lower "
                         "--val_docs (0: no validation split)")
    return np.sort(np.random.default_rng([seed, total]).choice(total, size=val_docs, replace=False))


def _bar(enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


def prepare(cfg: PrepareConfig) -> dict:
    """Tokenize cfg.input into cfg.output/train and cfg.output/val; returns a summary."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.eos_id is None:
        raise ValueError(f"--tokenizer {cfg.tokenizer!r} has no eos token; documents need one to mark their end")
    out = Path(os.path.expanduser(cfg.output))
    tok_entry = _tokenizer_entry(tokenizer, cfg.tokenizer)
    settings = {"text_key": cfg.text_key, "val_docs": cfg.val_docs, "seed": cfg.seed,
                "shard_tokens": cfg.shard_tokens, "input": list(cfg.input)}
    earlier = _check_output(out, tok_entry, settings)
    sources, units, fingerprint = list_units(cfg.input)
    if earlier is not None and earlier["fingerprint"] != fingerprint:
        raise ValueError(f"--output {str(out)!r}: the input files changed (added, removed, resized or touched) since "
                         "this folder was started; give another --output (or delete that folder)")
    if earlier is not None and (out / "train" / "meta.json").exists():
        print(f"{out} is already prepared ({earlier['total_docs']:,} documents)")
        return json.loads((out / "train" / "meta.json").read_text())

    workers = cfg.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    runner = _Runner(max(1, min(workers, len(units))), tokenizer)
    ok = False
    try:
        if earlier is None:
            counts = [0] * len(units)
            with _bar(cfg.progress, total=len(units), desc="counting documents", unit="unit") as bar:
                for u, n in runner.run(_count_job, [(u, unit, cfg.text_key) for u, unit in enumerate(units)],
                                             lambda: None):
                    counts[u] = n
                    bar.update(1)
            for unit, n in zip(units, counts):
                unit["docs"] = n
            plan = {"format": FORMAT, "tokenizer": tok_entry, "settings": settings, "fingerprint": fingerprint,
                    "dtype": token_dtype(tokenizer.vocab_size), "name_width": max(6, len(str(len(units) - 1))),
                    "sources": sources, "units": units, "total_docs": sum(counts)}
            (out / ".prepare").mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / ".prepare" / "plan.json", plan)
        else:
            plan = earlier
        units = plan["units"]
        total = plan["total_docs"]
        if total == 0:
            raise ValueError(f"--input {cfg.input}: no documents (no non-empty {cfg.text_key!r} texts)")
        val = _choose_validation(total, cfg.val_docs, cfg.seed)
        starts = np.cumsum([0] + [unit["docs"] for unit in units])
        for d in ("train", ".prepare/done", ".prepare/val"):
            (out / d).mkdir(parents=True, exist_ok=True)
            for tmp in (out / d).glob(".*.tmp"):  # what a killed run was writing
                tmp.unlink()
        job_plan = {k: plan[k] for k in ("name_width", "dtype", "settings")}
        jobs = []
        for u, unit in enumerate(units):
            lo, hi = bisect.bisect_left(val, starts[u]), bisect.bisect_left(val, starts[u + 1])
            jobs.append((u, unit, [int(i - starts[u]) for i in val[lo:hi]], str(out), job_plan))
        start = time.perf_counter()
        base = runner.totals()
        with _bar(cfg.progress, total=total, desc="tokenizing", unit="doc", unit_scale=True) as bar:
            def tick():
                docs, tokens = runner.totals()
                bar.update(docs - base[0] - bar.n)
                rate = (tokens - base[1]) / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{tokens - base[1]:,} tokens, {rate:,.0f} tokens/s", refresh=False)

            for _ in runner.run(_tokenize_job, jobs, tick):
                pass
        ok = True
    finally:
        runner.close(ok)
    return finalize(out, plan)


def finalize(out: Path, plan: dict) -> dict:
    """Every unit done: OUT/val/ from the validation pieces in corpus order, then val/meta.json and
    train/meta.json (written last: its presence says the folder is whole)."""
    work, width = out / ".prepare", plan["name_width"]
    records = []
    for u in range(len(plan["units"])):
        recs = _records(work / "done", u, width)
        if not recs or not recs[-1]["final"]:
            raise RuntimeError(f"unit {u} of {out} is not finished")
        records += recs
    tok, dtype, limit = plan["tokenizer"], plan["dtype"], plan["settings"]["shard_tokens"]
    sources = [dict(s, docs=sum(unit["docs"] for unit in plan["units"] if unit["source"] == i))
               for i, s in enumerate(plan["sources"])]
    common = {"tokenizer": {k: tok[k] for k in ("name", "identity", "vocab_size")}, "sources": sources}
    if plan["settings"]["val_docs"]:
        val_shards, writer, docs, k = [], None, 0, 0
        for r in records:
            if not r["val_docs"]:
                continue
            if writer is None:
                writer = ShardWriter(out / "val" / f"{k:06d}.bin", dtype)
            ids = np.fromfile(work / "val" / f"{shard_name(r['unit'], r['shard'], width)}.bin", dtype=DTYPES[dtype])
            writer.write(ids)
            docs += r["val_docs"]
            if writer.tokens >= limit:
                writer.commit()
                val_shards.append({"file": writer.path.name, "tokens": writer.tokens, "docs": docs})
                writer, docs, k = None, 0, k + 1
        if writer is not None:
            writer.commit()
            val_shards.append({"file": writer.path.name, "tokens": writer.tokens, "docs": docs})
        write_token_meta(out / "val", dtype, tok["eos_id"], val_shards, split="val", **common)
    train_shards = [{"file": r["file"], "tokens": r["tokens"], "docs": r["docs"]} for r in records if r["tokens"]]
    if not train_shards:
        raise ValueError("no training documents left after the validation split; lower --val_docs")
    write_token_meta(out / "train", dtype, tok["eos_id"], train_shards, split="train", **common)
    for piece in (work / "val").glob("*.bin"):
        piece.unlink()
    meta = json.loads((out / "train" / "meta.json").read_text())
    print(f"wrote {out}/train: {meta['docs']:,} documents, {meta['tokens']:,} tokens in {len(train_shards)} shards "
          f"({dtype})" + (f"; {out}/val: {plan['settings']['val_docs']:,} documents" if plan["settings"]["val_docs"]
                          else ""))
    return meta
