import os
import time

import numpy as np
import pytest
import torch

from lit_mamba2.training.data import (
    DataConfig, LMDataModule, MQARConfig, MQARDataset, PackedRows, ResumableSampler, TokenStream, find_text_files,
    split_rows, tokenize_text_files,
)
from lit_mamba2.tokenizers import ByteTokenizer, load_tokenizer


def naive_rows(stream, L, eos):
    """Row i: inputs stream[iL:(i+1)L], labels shifted by one, seq_idx counting eos tokens seen before t."""
    rows = []
    for i in range((len(stream) - 1) // L):
        inputs = stream[i * L:(i + 1) * L]
        labels = stream[i * L + 1:(i + 1) * L + 1]
        seq_idx, doc = [], 0
        for t in inputs:
            seq_idx.append(doc)
            if t == eos:
                doc += 1
        rows.append((inputs, labels, seq_idx))
    return rows


def random_documents(rng, n_docs, vocab, eos, max_len=40):
    out = []
    for _ in range(n_docs):
        doc = rng.integers(0, vocab, size=rng.integers(1, max_len)).tolist()
        out += [t for t in doc if t != eos] + [eos]
    return out


@pytest.mark.parametrize("dtype,vocab,eos", [("uint16", 65535, 7), ("uint32", 200_000, 150_001)])
def test_token_shards_pack_like_naive_construction(tmp_path, write_raw_shard, dtype, vocab, eos):
    rng = np.random.default_rng(0)
    shards = [random_documents(rng, 12, vocab, eos) for _ in range(3)]
    shards[1] = shards[1][:-1]  # a document may continue across a shard boundary
    for k, ids in enumerate(shards):
        write_raw_shard(tmp_path, f"part{k:02d}", ids, dtype, eos)
    stream_list = sum(shards, [])
    stream = TokenStream([tmp_path])
    assert len(stream) == len(stream_list) and stream.eos_id == eos
    assert stream.read(0, len(stream)).tolist() == stream_list
    if dtype == "uint32":
        assert max(stream_list) > 65535  # really exercises 32-bit ids
    L = 16
    expected = naive_rows(stream_list, L, eos)
    ds = PackedRows(stream, L, 0, len(expected))
    assert len(ds) == len(expected)
    for i, (inputs, labels, seq_idx) in enumerate(expected):
        row = ds[i]
        assert row["input_ids"].tolist() == inputs
        assert row["labels"].tolist() == labels
        assert row["seq_idx"].dtype == torch.int32 and row["seq_idx"].tolist() == seq_idx


def test_split_takes_validation_rows_from_the_end():
    train, val = split_rows(num_tokens=1001, seq_len=10, val_fraction=0.1)
    assert (train.start, train.stop, val.start, val.stop) == (0, 90, 90, 100)
    with pytest.raises(ValueError, match="seq_len"):
        split_rows(num_tokens=15, seq_len=10, val_fraction=0.1)


def test_missing_data_paths_are_named(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        TokenStream([missing])
    with pytest.raises(FileNotFoundError, match="nope"):
        find_text_files([missing], "*.txt", [], None)
    os.makedirs(tmp_path / "shards")
    np.zeros(4, dtype="<u2").tofile(tmp_path / "shards" / "a.bin")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenStream([tmp_path / "shards"])


def test_text_cache_reuse_and_invalidation(tmp_path, hf_tokenizer_dir):
    src = tmp_path / "src"
    src.mkdir()
    texts = {"a.txt": "def x ( ) :\n", "b.txt": "return y + x\n", "c.md": "skip me"}
    for name, t in texts.items():
        (src / name).write_text(t)
    byte = ByteTokenizer()
    files = find_text_files([str(src)], "*.txt", [], None)
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    d1 = tokenize_text_files(files, byte, tmp_path / "cache", progress=False)
    expected = list(b"def x ( ) :\n") + [0] + list(b"return y + x\n") + [0]
    assert TokenStream([d1]).read(0, len(expected) + 1).tolist() == expected
    stamp = os.stat(d1 / "tokens.bin").st_mtime_ns
    time.sleep(0.01)
    again = tokenize_text_files(find_text_files([str(src)], "*.txt", [], None), byte, tmp_path / "cache", False)
    assert again == d1 and os.stat(d1 / "tokens.bin").st_mtime_ns == stamp  # reused, not rewritten

    (src / "b.txt").write_text("return y + y + x\n")  # content (and size) change
    d2 = tokenize_text_files(find_text_files([str(src)], "*.txt", [], None), byte, tmp_path / "cache", False)
    assert d2 != d1
    st = os.stat(src / "a.txt")
    os.utime(src / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))  # touched only
    d3 = tokenize_text_files(find_text_files([str(src)], "*.txt", [], None), byte, tmp_path / "cache", False)
    assert d3 not in (d1, d2)
    (src / "c.txt").write_text("print x\n")  # a new file
    d4 = tokenize_text_files(find_text_files([str(src)], "*.txt", [], None), byte, tmp_path / "cache", False)
    assert d4 not in (d1, d2, d3)

    path, vocab = hf_tokenizer_dir
    hf = load_tokenizer(path)
    files = find_text_files([str(src)], "*.txt", [], None)
    d5 = tokenize_text_files(files, hf, tmp_path / "cache", progress=False)
    assert d5 != d4  # same files, another tokenizer
    ids = TokenStream([d5]).read(0, 100).tolist()
    words = "def x ( ) :".split() + ["<eos>"] + "return y + y + x".split() + ["<eos>"] + "print x".split() + ["<eos>"]
    assert ids == [vocab[w] for w in words]


def test_text_file_selection_respects_exclude_and_max_bytes(tmp_path):
    for rel, size in [("a.py", 100), ("b.py", 100), ("sub/c.py", 100), ("test/d.py", 100), ("e.txt", 5)]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x" * size)
    names = [f.relative_to(tmp_path).as_posix() for f in find_text_files([str(tmp_path)], "*.py", ["test/*"], None)]
    assert names == ["a.py", "b.py", "sub/c.py"]
    capped = find_text_files([str(tmp_path)], "*.py", ["test/*"], 150)
    assert [f.name for f in capped] == ["a.py", "b.py"]  # whole files until the cap is reached


def test_sampler_is_seeded_sharded_and_resumable():
    n, length, world = 10, 23, 2
    ranks = [list(ResumableSampler(n, length, seed=3, rank=r, world_size=world)) for r in range(world)]
    assert ranks[0] == list(ResumableSampler(n, length, seed=3, rank=0, world_size=world))  # reproducible
    assert ranks[0] != list(ResumableSampler(n, length, seed=4, rank=0, world_size=world))
    merged = [ranks[g % world][g // world] for g in range(world * length)]
    for epoch in range(4):  # each pass over the data is a permutation
        chunk = merged[epoch * n:(epoch + 1) * n]
        if len(chunk) == n:
            assert sorted(chunk) == list(range(n))
    resumed = ResumableSampler(n, length, seed=3, rank=1, world_size=world, start=7)
    assert list(resumed) == ranks[1][7:] and len(resumed) == length


def test_mqar_examples_ask_each_key_once_and_label_its_value():
    cfg = MQARConfig(vocab_size=64, num_kv_pairs=6, num_train=10, num_val=2)
    ds = MQARDataset(10, 48, cfg, seed=0, split=0)
    assert torch.equal(ds[3]["input_ids"], MQARDataset(10, 48, cfg, seed=0, split=0)[3]["input_ids"])
    assert not torch.equal(ds[3]["input_ids"], MQARDataset(10, 48, cfg, seed=0, split=1)[3]["input_ids"])
    for i in range(len(ds)):
        x, y = ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()
        n = cfg.num_kv_pairs
        context = dict(zip(x[0:2 * n:2], x[1:2 * n:2]))
        assert len(context) == n and all(1 <= k < 32 for k in context) and all(32 <= v < 64 for v in context.values())
        answered = [t for t in range(len(y)) if y[t] != -100]
        assert all(t >= 2 * n for t in answered)
        assert len(answered) >= n - 1  # only a query whose answer lies past the row's end loses its label
        for t in answered:
            assert y[t] == context[x[t]] and x[t + 1] == y[t] if t + 1 < len(x) else y[t] == context[x[t]]


def test_datamodule_tokens_split_and_batches(tmp_path, write_raw_shard):
    rng = np.random.default_rng(1)
    ids = random_documents(rng, 200, 300, eos=5)
    write_raw_shard(tmp_path / "tok", "s0", ids, "uint16", 5)
    cfg = DataConfig(kind="tokens", paths=[str(tmp_path / "tok")], seq_len=32, batch_size=4, val_fraction=0.1)
    dm = LMDataModule(cfg, tokenizer=None, max_steps=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["seq_idx"].dtype == torch.int32
    rows = (len(ids) - 1) // 32
    assert len(dm.val_set) == int(rows * 0.1) and len(dm.train_set) == rows - len(dm.val_set)
    assert len(dm.train_dataloader()) == 3
    val_row = dm.val_set[0]["input_ids"].tolist()
    start = len(dm.train_set) * 32
    assert val_row == ids[start:start + 32]


def test_token_ids_outside_the_model_vocabulary_are_refused_clearly(tmp_path, write_raw_shard):
    ids = [1, 2, 3, 0] * 20 + [300, 0] + [1, 2, 3, 0] * 20
    write_raw_shard(tmp_path / "tok", "s0", ids, "uint16", 0)
    cfg = DataConfig(kind="tokens", paths=[str(tmp_path / "tok")], seq_len=16, batch_size=2, val_fraction=0.0)
    dm = LMDataModule(cfg, tokenizer=None, max_steps=3, vocab_size=256)
    dm.setup("fit")
    assert dm.train_set[0]["input_ids"].max() < 256  # rows without the bad id pass
    with pytest.raises(ValueError, match=r"token id 300 at position 80 .*model\.vocab_size = 256"):
        dm.train_set[80 // 16]


def test_bad_data_settings_are_named(tmp_path, write_raw_shard, monkeypatch):
    with pytest.raises(ValueError, match=r"data\.max_bytes must be a positive integer"):
        DataConfig(max_bytes=0)
    ids = [1, 2, 3, 0] * 40
    write_raw_shard(tmp_path / "tok", "s0", ids, "uint16", 0)
    with open(tmp_path / "tok" / "s0.bin", "ab") as f:
        f.write(b"\x07")  # half a uint16
    with pytest.raises(ValueError, match=r"s0\.bin': 321 bytes is not a whole number of uint16 token ids"):
        TokenStream([str(tmp_path / "tok")])
    write_raw_shard(tmp_path / "tok", "s0", ids, "uint16", 0)  # 160 tokens: 9 rows of 16, 1 for validation
    cfg = DataConfig(kind="tokens", paths=[str(tmp_path / "tok")], seq_len=16, batch_size=10, val_fraction=0.1)
    dm = LMDataModule(cfg, tokenizer=None, max_steps=3)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"data\.batch_size = 10 x 1 processes is more than the 8 training rows"):
        dm.train_dataloader()
    monkeypatch.setattr(dm, "_rank_world", lambda: (1, 2))  # as rank 1 of 2
    with pytest.raises(ValueError, match=r"gives 1 validation rows for 2 processes"):
        dm.val_dataloader()
    # braces other than {stdlib} are part of a path
    (tmp_path / "a{x}").mkdir()
    (tmp_path / "a{x}" / "m.py").write_text("x = 1\n")
    assert find_text_files([str(tmp_path / "a{x}")], "*.py", [], None) == [tmp_path / "a{x}" / "m.py"]


def test_concurrent_writers_of_one_cache_entry_leave_it_whole(tmp_path):
    """Several processes tokenizing the same files into the same cache key at the same moment (runs sharing the
    cache): each writes its own temporary file and moves it into place, so every one gets the whole stream."""
    import multiprocessing as mp

    files = [tmp_path / f"f{i}.py" for i in range(3)]
    for i, f in enumerate(files):
        f.write_text(f"print({i})\n" * 300000)
    want = sum(f.stat().st_size + 1 for f in files)
    ctx = mp.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_tokenize_and_count, args=(files, str(tmp_path / "cache"), barrier, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    outs = sorted(str(results.get(timeout=120)) for _ in procs)
    for p in procs:
        p.join()
    assert outs == [str(want)] * n
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def _tokenize_and_count(files, cache, barrier, results):
    barrier.wait()
    try:
        out = tokenize_text_files(files, ByteTokenizer(), cache, progress=False)
        results.put(len(TokenStream([str(out)])))
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put(f"{type(e).__name__}: {e}")
