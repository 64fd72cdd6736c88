"""Loading token folders: lazy shards with a bounded number of open maps, blends of sources (proportions, passes,
resume on another world size) and a separate validation set."""

import json
import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest

from lit_mamba2.training import shards
from lit_mamba2.training.data import BlendSampler, DataConfig, LMDataModule
from lit_mamba2.training.shards import TokenStream


def write_folder(folder, docs, per_shard, dtype="<u2", eos=0, listed=True):
    """Shards of `per_shard` documents each, written by hand (raw ids), with meta.json listing them."""
    folder.mkdir(parents=True)
    entries = []
    for k in range(0, len(docs), per_shard):
        ids = np.concatenate([np.asarray(d + [eos]) for d in docs[k:k + per_shard]]).astype(dtype)
        ids.tofile(folder / f"s{k:06d}.bin")
        entries.append({"file": f"s{k:06d}.bin", "tokens": int(ids.size), "docs": len(docs[k:k + per_shard])})
    meta = {"dtype": "uint16" if dtype == "<u2" else "uint32", "eos_id": eos}
    (folder / "meta.json").write_text(json.dumps({**meta, **({"shards": entries} if listed else {})}))
    return np.concatenate([np.asarray(d + [eos]) for d in docs]).tolist()


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_thousands_of_shards_open_lazily_through_a_bounded_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 60000, size=rng.integers(1, 9)).tolist() for _ in range(3000)]
    expected = write_folder(tmp_path / "tok", docs, per_shard=2)  # 1,500 shards

    def untouchable(*a, **k):
        raise AssertionError("a shard was opened or sized at setup")

    with monkeypatch.context() as m:  # setup reads meta.json and lists the folder: no shard is opened or sized
        m.setattr(shards.np, "memmap", untouchable)
        m.setattr(shards.os.path, "getsize", untouchable)
        stream = TokenStream([tmp_path / "tok"], max_open=8)
    assert len(stream) == len(expected) and len(stream.files) == 1500
    before = open_files()
    got = [stream.read(a, a + 37) for a in range(0, len(stream), 37)]  # every shard, across boundaries
    assert np.concatenate(got).tolist() == expected
    assert len(stream._open) <= 8 and open_files() - before <= 8
    picked = rng.integers(0, len(stream) - 5, size=200)  # and read in any order
    assert all(stream.read(a, a + 5).tolist() == expected[a:a + 5] for a in picked)
    assert len(stream._open) <= 8

    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    meta["shards"][3]["tokens"] += 1  # meta.json and the file disagree: said when the shard is opened
    (tmp_path / "tok" / "meta.json").write_text(json.dumps(meta))
    stale = TokenStream([tmp_path / "tok"])
    with pytest.raises(ValueError, match=r"s000006\.bin'.*but meta\.json says"):
        stale.read(0, len(stale))
    (tmp_path / "tok" / "extra.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match=r"extra\.bin' is not listed in"):
        TokenStream([tmp_path / "tok"])


def stub_trainer(rank, world, done):
    """What LMDataModule reads of a Trainer: the data-parallel rank and size, and the batches already trained."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=done))
    return SimpleNamespace(strategy=SimpleNamespace(), global_rank=rank, world_size=world, accumulate_grad_batches=1,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def blend_sources(tmp_path):
    """Three token folders whose rows tell their source: ids from disjoint ranges (1-99, 100-199, 200-299)."""
    rng = np.random.default_rng(1)
    paths = []
    for s, n_docs in enumerate([40, 200, 120]):
        docs = [(100 * s + rng.integers(1, 100, size=rng.integers(3, 20))).tolist() for _ in range(n_docs)]
        write_folder(tmp_path / f"src{s}", docs, per_shard=7)
        paths.append(str(tmp_path / f"src{s}"))
    return paths


def batches(cfg, rank, world, done, steps):
    dm = LMDataModule(cfg, tokenizer=None, max_steps=steps)
    dm.trainer = stub_trainer(rank, world, done)
    dm.setup("fit")
    return dm, [b["input_ids"] for b in dm.train_dataloader()]


def test_a_blend_draws_its_sources_in_proportion_and_starts_new_passes(tmp_path, caplog):
    paths = blend_sources(tmp_path)
    weights = [0.2, 0.5, 0.3]
    cfg = DataConfig(kind="tokens", paths=[], blend=[{"path": p, "weight": w} for p, w in zip(paths, weights)],
                     seq_len=8, batch_size=16, val_fraction=0.05, seed=3)
    caplog.set_level(logging.INFO)
    dm, got = batches(cfg, 0, 1, 0, steps=150)
    rows = np.concatenate([b.numpy() for b in got])  # 2,400 rows
    source = rows.max(axis=1) // 100  # eos (0) aside, a row's ids come from one source
    share = np.bincount(source, minlength=3) / len(rows)
    assert np.allclose(share, weights, atol=3 * np.sqrt(0.25 / len(rows)))
    # held-out rows: each source's last 5% is the validation set, never drawn for training
    sizes = [len(d) for d in dm.train_set.datasets]
    for train, val in zip(dm.train_set.datasets, dm.val_set.datasets):
        n = (len(train.stream) - 1) // 8
        assert len(val) == max(1, int(n * 0.05)) and len(train) + len(val) == n
    val_rows = {tuple(dm.val_set[i]["input_ids"].tolist()) for i in range(len(dm.val_set))}
    assert not val_rows & {tuple(r) for r in rows.tolist()}
    # source 0 (the smallest) runs out: every pass is a new permutation of its rows, said in the log
    drawn0 = [tuple(r) for r in rows[source == 0].tolist()]
    n0 = sizes[0]
    first, second = drawn0[:n0], drawn0[n0:2 * n0]
    assert len(set(first)) == n0 and set(first) == set(second) and first != second
    assert "data.blend[0]" in caplog.text and "pass 2" in caplog.text and "reshuffled" in caplog.text


def test_resume_with_a_blend_continues_with_the_same_batches_on_any_world_size(tmp_path):
    paths = blend_sources(tmp_path)
    blend = [{"path": p, "weight": w} for p, w in zip(paths, [1, 3, 2])]
    cfg = DataConfig(kind="tokens", paths=[], blend=blend, seq_len=8, batch_size=12, val_fraction=0.0, seed=5)
    _, full = batches(cfg, 0, 1, 0, steps=40)  # the uninterrupted run: global batch 12, one process
    _, resumed = batches(cfg, 0, 1, 25, steps=40)  # resumed after 25 steps, one process
    assert len(resumed) == 15 and all((a == b).all() for a, b in zip(resumed, full[25:]))
    # resumed after 25 steps on 3 processes of 4 rows each (the same global batch): the same rows in each step
    half = DataConfig(**{**cfg.__dict__, "batch_size": 4})
    per_rank = [batches(half, r, 3, 25, steps=40)[1] for r in range(3)]
    for t in range(15):
        step = sorted(map(tuple, np.concatenate([per_rank[r][t].numpy() for r in range(3)]).tolist()))
        assert step == sorted(map(tuple, full[25 + t].numpy().tolist()))


def test_blend_sampler_is_a_pure_function_of_the_global_sample():
    """Sampled in any order, from any start, on any world size: global sample g is the same row."""
    s = BlendSampler([5, 50, 13], [0.1, 0.6, 0.3], length=3000, seed=9)
    reference = list(s)
    for world in (2, 5):
        for rank in range(world):
            part = list(BlendSampler([5, 50, 13], [0.1, 0.6, 0.3], length=3000 // world, seed=9, rank=rank,
                                     world_size=world, start=100))
            assert part == [reference[p * world + rank] for p in range(100, 3000 // world)]
    with pytest.raises(ValueError, match=r"source 1's weight is below 1/8192"):
        BlendSampler([5, 5], [1, 1e-6], length=10, seed=0)


def test_a_separate_validation_set(tmp_path):
    rng = np.random.default_rng(2)
    train = write_folder(tmp_path / "train", [rng.integers(1, 50, size=9).tolist() for _ in range(30)], 4)
    val = write_folder(tmp_path / "val", [rng.integers(50, 99, size=5).tolist() for _ in range(10)], 100)
    cfg = DataConfig(kind="tokens", paths=[str(tmp_path / "train")], val_paths=[str(tmp_path / "val")], seq_len=8,
                     batch_size=2, val_fraction=0.5)
    dm = LMDataModule(cfg, tokenizer=None, max_steps=2)
    dm.setup("fit")
    assert len(dm.train_set) == (len(train) - 1) // 8  # every training row is trained on: val_fraction unused
    assert len(dm.val_set) == (len(val) - 1) // 8
    assert [dm.val_set[i]["input_ids"].tolist() for i in range(len(dm.val_set))] == [
        val[8 * i:8 * i + 8] for i in range((len(val) - 1) // 8)]
    assert dm.val_tokens().tolist() == val[:8 * len(dm.val_set)]
    with pytest.raises(ValueError, match=r"data\.val_paths needs data\.kind: tokens"):
        DataConfig(kind="text", val_paths=["x"])
    with pytest.raises(ValueError, match=r"data\.blend and data\.paths both name training data"):
        DataConfig(kind="tokens", paths=["a"], blend=[{"path": "b"}])
