"""`lit-mamba2 prepare`: every input format round-trips token for token against the tokenizer applied directly;
the result is the same for any number of workers and after a killed run; other tokenizers' folders are refused."""

import gzip
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lit_mamba2.cli import main
from lit_mamba2.training import prepare as prep
from lit_mamba2.training.prepare import PrepareConfig, prepare
from lit_mamba2.training.shards import TokenStream

REPO = Path(__file__).resolve().parents[2]


def make_docs(n, seed, offset=0):
    """n distinct documents of the word tokenizer's words (w0..w39), some with newlines."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(offset, offset + n):
        words = [f"w{i % 40}", f"w{(i // 40) % 40}", f"w{(i // 1600) % 40}"]
        words += [f"w{j}" for j in rng.integers(0, 40, size=rng.integers(0, 30))]
        docs.append(" ".join(words) + ("\nw1 w2" if i % 3 == 0 else ""))
    return docs


def write_jsonl(path, docs, opener=open, extra=None):
    with opener(path, "wt") as f:
        for d in docs:
            f.write(json.dumps({"id": 7, "text": d, **(extra or {})}) + "\n")
            if len(d) % 5 == 0:
                f.write("\n")  # blank lines are not documents
        f.write(json.dumps({"text": ""}) + "\n")  # nor are empty texts


def read_split(folder):
    """(dtype, documents as id lists) of a prepared folder, read from the raw files in meta.json's order; checks
    each shard's counts and that it ends with eos."""
    meta = json.loads((folder / "meta.json").read_text())
    np_dtype = {"uint16": "<u2", "uint32": "<u4"}[meta["dtype"]]
    eos, docs = meta["eos_id"], []
    for s in meta["shards"]:
        ids = np.fromfile(folder / s["file"], dtype=np_dtype).tolist()
        assert len(ids) == s["tokens"] and ids.count(eos) == s["docs"] and ids[-1] == eos
        cut = [-1] + [i for i, t in enumerate(ids) if t == eos]
        docs += [ids[a + 1:b + 1] for a, b in zip(cut, cut[1:])]
    assert meta["tokens"] == sum(len(d) for d in docs) and meta["docs"] == len(docs)
    return meta, docs


def check_round_trip(out, docs, encode, eos, val_docs):
    """train + val hold every document once, each equal to encode(text) + [eos]; val's are `val_docs` of them,
    both in corpus order."""
    expected = [encode(d) + [eos] for d in docs]
    meta, train = read_split(out / "train")
    vmeta, val = read_split(out / "val") if val_docs else (None, [])
    assert len(val) == val_docs and len(train) + len(val) == len(docs)
    position = {tuple(e): i for i, e in enumerate(expected)}
    assert len(position) == len(docs)  # distinct documents: each output document names its input
    val_at = [position[tuple(d)] for d in val]
    assert val_at == sorted(set(val_at))
    assert train == [e for i, e in enumerate(expected) if i not in set(val_at)]
    stream = TokenStream([out / "train"])  # usable as data.kind: tokens
    assert stream.read(0, len(stream)).tolist() == sum(train, [])
    return meta, val_at


@pytest.fixture
def word_tok_dir(word_tokenizer, tmp_path):
    d = tmp_path / "tok"
    word_tokenizer.save_pretrained(d)
    return d


def hf_encode(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    return lambda text: hf.encode(text, add_special_tokens=False), hf.eos_token_id


def test_every_input_format_round_trips(tmp_path, word_tok_dir, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    zstandard = pytest.importorskip("zstandard")
    datasets = pytest.importorskip("datasets")
    jsonl, corpus = tmp_path / "jsonl", tmp_path / "corpus"
    jsonl.mkdir()
    (corpus / "e").mkdir(parents=True)
    parts = [make_docs(30, 1, 0), make_docs(20, 2, 100), make_docs(25, 3, 200), make_docs(40, 4, 300),
             make_docs(12, 5, 400), make_docs(35, 6, 500)]
    write_jsonl(jsonl / "a.jsonl", parts[0], extra={"meta": {"x": [1, 2]}})
    write_jsonl(jsonl / "b.jsonl.gz", parts[1], opener=gzip.open)
    with zstandard.open(jsonl / "c.jsonl.zst", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in parts[2])
    pq.write_table(pa.table({"text": parts[3], "n": list(range(40))}), corpus / "d.parquet", row_group_size=7)
    for i, d in enumerate(parts[4]):  # a text file is one document
        (corpus / "e" / f"{i:02d}.txt").write_text(d)
    (corpus / "e" / "99-empty.txt").write_text("")  # not a document
    (corpus / ".hidden").write_text("w1 w1 w1")  # skipped
    datasets.Dataset.from_dict({"text": parts[5]}).save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setattr(prep, "JSONL_RANGE_BYTES", 200)  # a.jsonl in several byte ranges, lines across their ends
    monkeypatch.setattr(prep, "TEXT_UNIT_FILES", 5)
    monkeypatch.setattr(prep, "DATASET_UNIT_ROWS", 8)

    out = tmp_path / "out"
    summary = prepare(PrepareConfig(input=[str(jsonl), str(corpus), str(tmp_path / "saved")], output=str(out),
                                    tokenizer=str(word_tok_dir), workers=1, val_docs=17, shard_tokens=300,
                                    progress=False))
    docs = sum(parts, [])
    encode, eos = hf_encode(word_tok_dir)
    meta, _ = check_round_trip(out, docs, encode, eos, val_docs=17)
    assert meta["dtype"] == "uint16" and meta["eos_id"] == eos and summary["docs"] == len(docs) - 17
    assert meta["tokenizer"]["vocab_size"] == 42 and meta["tokenizer"]["identity"].startswith("hf:")
    assert [s["docs"] for s in meta["sources"]] == [75, 52, 35]  # the JSONL folder, the other folder, the dataset
    assert len(meta["shards"]) > 10  # several per unit; units of byte ranges, text-file groups, row ranges

    with pytest.raises(ValueError, match=r"a\.jsonl, line 1: no key 'content' \(it has \['id', 'meta', 'text'\]\)"):
        prepare(PrepareConfig(input=[str(jsonl)], output=str(tmp_path / "o2"), tokenizer="byte",
                              text_key="content", workers=1, progress=False))
    with pytest.raises(ValueError, match=r"d\.parquet: no column 'content' \(it has \['text', 'n'\]\)"):
        prepare(PrepareConfig(input=[str(corpus / "d.parquet")], output=str(tmp_path / "o3"), tokenizer="byte",
                              text_key="content", workers=1, progress=False))


def test_one_and_four_workers_write_the_same_bytes(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(6):
        write_jsonl(corpus / f"part{k}.jsonl", make_docs(40, k, 40 * k))
    outs = []
    for workers in (1, 4):
        out = tmp_path / f"out{workers}"
        prepare(PrepareConfig(input=[str(corpus)], output=str(out), tokenizer="byte", workers=workers, val_docs=9,
                              shard_tokens=2000, progress=False))
        outs.append({p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
                     if p.is_file() and ".prepare" not in p.parts})
    assert outs[0] == outs[1] and len([f for f in outs[0] if f.endswith(".bin")]) > 6
    docs = sum((make_docs(40, k, 40 * k) for k in range(6)), [])
    check_round_trip(tmp_path / "out4", docs, lambda t: list(t.encode()), 0, val_docs=9)


KILL_AFTER_TWO_SHARDS = """
import os, signal, sys
from lit_mamba2.training import shards
commit, n = shards.ShardWriter.commit, [0]
def dying_commit(self):
    n[0] += self.path.parent.name == "train"
    if n[0] == 3:  # the third training shard never lands: killed while writing it
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(self)
shards.ShardWriter.commit = dying_commit
from lit_mamba2.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_rerun_keeps_its_shards_and_gives_the_same_result(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(3):
        write_jsonl(corpus / f"part{k}.jsonl", make_docs(60, k, 60 * k))
    args = ["prepare", "--input", str(corpus), "--tokenizer", "byte", "--val_docs", "7", "--shard_tokens", "1500",
            "--progress", "false"]
    reference = tmp_path / "reference"
    assert main(args + ["--output", str(reference), "--workers", "1"]) == 0

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_SHARDS, *args, "--output", str(out), "--workers",
                           "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    kept = sorted((out / "train").glob("*.bin"))
    assert len(kept) == 2 and not (out / "train" / "meta.json").exists()
    assert list((out / "train").glob(".*.tmp"))  # the shard being written when it died
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept}

    assert main(args + ["--output", str(out), "--workers", "4"]) == 0
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == stamps  # kept, not rewritten
    assert not list((out / "train").glob(".*.tmp"))
    for split in ("train", "val"):
        files = sorted(p.name for p in (reference / split).iterdir())
        assert files == sorted(p.name for p in (out / split).iterdir())
        assert all((reference / split / f).read_bytes() == (out / split / f).read_bytes() for f in files)


def test_another_tokenizers_folder_and_other_settings_are_refused(tmp_path, word_tok_dir, capsys):
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, make_docs(20, 0))
    out = tmp_path / "out"
    base = ["prepare", "--input", str(corpus), "--output", str(out), "--workers", "1", "--val_docs", "2",
            "--progress", "false"]
    assert main(base + ["--tokenizer", "byte"]) == 0
    capsys.readouterr()
    assert main(base + ["--tokenizer", str(word_tok_dir)]) == 2
    err = capsys.readouterr().err
    assert "holds shards of another tokenizer ('byte', byte-v1)" in err and len(err.strip().splitlines()) == 1
    assert main(base + ["--tokenizer", "byte", "--seed", "5"]) == 2
    assert "was prepared with --seed 1234, not 5" in capsys.readouterr().err
    assert main(base + ["--tokenizer", "byte"]) == 0  # the same again: already done
    assert "already prepared" in capsys.readouterr().out
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    fresh = base[:3] + ["--workers", "1", "--progress", "false", "--tokenizer", "byte"]
    assert main(fresh + ["--output", str(tmp_path / "other")]) == 2
    assert "is not empty and holds no prepare run" in capsys.readouterr().err
    assert main(fresh + ["--output", str(tmp_path / "o2"), "--val_docs", "20"]) == 2
    assert "--val_docs 20 is not less than the 20 documents" in capsys.readouterr().err


def test_added_tokens_count_toward_the_dtype(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "[UNK]": 1, **{f"v{i}": i + 2 for i in range(65_530)}}  # 65,532 ids: fits uint16
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]")
    hf.add_tokens([f"added{i}" for i in range(10)])  # ... but not with these: 65,542
    hf.save_pretrained(tmp_path / "tok")
    docs = [f"v{i} added9 v65529 added{i % 10} v{i * 7}" for i in range(12)]
    write_jsonl(tmp_path / "c.jsonl", docs)
    prepare(PrepareConfig(input=[str(tmp_path / "c.jsonl")], output=str(tmp_path / "out"),
                          tokenizer=str(tmp_path / "tok"), workers=1, val_docs=2, progress=False))
    meta, _ = check_round_trip(tmp_path / "out", docs, lambda t: hf.encode(t, add_special_tokens=False), 0, 2)
    assert len(hf) == 65_542 and meta["dtype"] == "uint32" and meta["tokenizer"]["vocab_size"] == 65_542
    assert max(TokenStream([tmp_path / "out" / "train"]).read(0, 10**6)) == 65_541


def test_a_named_dataset_through_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "csvdata"
    folder.mkdir()
    docs = make_docs(15, 3)
    import csv

    with open(folder / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["body", "n"])
        w.writerows([d, i] for i, d in enumerate(docs))
    assert datasets  # a local folder of CSV files: datasets' csv builder, offline
    prepare(PrepareConfig(input=[f"hf:{folder}"], output=str(tmp_path / "out"), tokenizer="byte", text_key="body",
                          workers=1, val_docs=3, progress=False))
    check_round_trip(tmp_path / "out", docs, lambda t: list(t.encode()), 0, val_docs=3)


def test_prepared_folders_train_as_a_blend_with_their_validation_sets(tmp_path, capsys):
    """prepare, then pretrain on a blend of two prepared corpora, validated on their val/ folders (the CLI path)."""
    for name, seed in (("web", 0), ("code", 1)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "c.jsonl", make_docs(80, seed))
        assert main(["prepare", "--input", str(tmp_path / name), "--output", str(tmp_path / f"{name}-tok"),
                     "--tokenizer", "byte", "--val_docs", "20", "--workers", "1", "--progress", "false"]) == 0
    blend = f"[{{path: {tmp_path}/web-tok/train, weight: 0.7}}, {{path: {tmp_path}/code-tok/train, weight: 0.3}}]"
    code = main(["pretrain", "--model.name", "mamba2-test", "--tokenizer", "byte", "--data.kind", "tokens",
                 "--data.paths", "[]", "--data.blend", blend,
                 "--data.val_paths", f"[{tmp_path}/web-tok/val, {tmp_path}/code-tok/val]",
                 "--data.seq_len", "32", "--data.batch_size", "2", "--trainer.max_steps", "2",
                 "--trainer.val_every_n_steps", "2", "--trainer.limit_val_batches", "1",
                 "--trainer.accelerator", "cpu", "--trainer.progress_bar", "false", "--sample.max_new_tokens", "0",
                 "--trainer.out_dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0 and "finished at step 2" in out and "val loss n/a" not in out
