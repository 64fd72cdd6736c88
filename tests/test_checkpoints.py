"""Checkpoints in and out, against independent implementations: transformers' Mamba2ForCausalLM (its PyTorch path
on CPU) in both directions, mamba_ssm-format folders written here by hand, Lightning .ckpt files built by hand, the
Hub cache offline, and every refusal with a message naming the key or file."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from lit_mamba2 import Mamba2Config
from lit_mamba2.checkpoints import CheckpointError, load, save
from lit_mamba2.cli import main
from lit_mamba2.model import Mamba2LMHeadModel

transformers = pytest.importorskip("transformers")


def hf_model(tie=False, n_groups=2, limit=(0.0, math.inf), seed=0):
    from transformers import Mamba2Config as HFConfig, Mamba2ForCausalLM

    cfg = HFConfig(hidden_size=64, num_heads=8, head_dim=16, state_size=16, n_groups=n_groups, expand=2,
                   num_hidden_layers=2, vocab_size=96, chunk_size=8, conv_kernel=4, tie_word_embeddings=tie,
                   time_step_limit=limit, use_conv_bias=True, layer_norm_epsilon=1e-5)
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers' init leaves A_log, D, dt_bias and the norms trivial: randomise all
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def randomise(model: Mamba2LMHeadModel, seed=0) -> Mamba2LMHeadModel:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def ids(vocab, b=2, L=21, seed=1):
    return torch.randint(0, vocab, (b, L), generator=torch.Generator().manual_seed(seed))


def write_mamba_ssm_folder(model: Mamba2LMHeadModel, folder: Path) -> Path:
    """mamba_ssm's own layout: config.json with MambaConfig's fields, pytorch_model.bin = state_dict()."""
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config.to_dict()  # ssm_cfg / attn_cfg: the keys that differ from mamba_ssm's defaults, and the layer
    cfg = {k: c[k] for k in ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                             "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32",
                             "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings")}
    if c["attn_layer_idx"]:  # as state-spaces/mamba2attn-2.7b's config says it (mamba_ssm's MHA default is False)
        cfg["attn_cfg"] = {**c["attn_cfg"], "causal": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# transformers' format
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tie,limit", [(False, (0.0, math.inf)), (True, (0.01, 0.5))])
def test_transformers_folder_loads_with_equal_logits(tmp_path, tie, limit):
    ref_model = hf_model(tie=tie, limit=limit)
    ref_model.save_pretrained(tmp_path)
    x = ids(96)
    with torch.no_grad():
        ref = ref_model(x).logits
        loaded = load(Mamba2LMHeadModel, tmp_path, tokenizer=False)
        assert loaded.format == "hf" and loaded.tokenizer is None and loaded.path == tmp_path
        model = loaded.model
        assert not hasattr(model, "tokenizer") and not hasattr(model, "source_format")  # nothing patched on
        out = model(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-4


def test_sharded_transformers_folder_loads(tmp_path):
    ref_model = hf_model()
    ref_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    x = ids(96)
    with torch.no_grad():
        diff = (Mamba2LMHeadModel.from_pretrained(tmp_path)(x) - ref_model(x).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "ssm_cfg": {
    "d_state": 16, "headdim": 16, "ngroups": 4, "chunk_size": 8, "dt_limit": (0.01, 0.3)}}])
def test_our_hf_folder_loads_in_transformers_with_equal_logits(tmp_path, overrides):
    from transformers import Mamba2ForCausalLM

    model = randomise(Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test", **overrides)))
    model.save_pretrained(tmp_path, format="hf")
    theirs = Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    x = ids(model.config.vocab_size, L=19)
    with torch.no_grad():
        diff = (theirs(x).logits - model(x)).abs().max().item()
    assert diff < 1e-4


def test_hf_format_refuses_attention_and_writes_nothing(tmp_path):
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2attn-test"))
    with pytest.raises(CheckpointError, match=r"cannot express.*attention layers.*mamba_ssm"):
        save(model, tmp_path / "out", format="hf")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# mamba_ssm's format
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["mamba2-test", "mamba2attn-test"])
def test_mamba_ssm_folder_loads_and_matches(tmp_path, preset):
    src = randomise(Mamba2LMHeadModel(Mamba2Config.from_name(preset)))
    write_mamba_ssm_folder(src, tmp_path)
    read = load(Mamba2LMHeadModel, tmp_path)
    assert read.format == "mamba_ssm"
    loaded = Mamba2LMHeadModel.from_pretrained(tmp_path)
    assert isinstance(loaded, Mamba2LMHeadModel) and not loaded.training
    assert loaded.config.attn_layer_idx == src.config.attn_layer_idx
    x = ids(256)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight  # tying survives loading


@pytest.mark.parametrize("preset", ["mamba2-test", "mamba2attn-test"])
def test_save_mamba_ssm_format_is_what_mamba_ssm_reads(tmp_path, preset):
    src = randomise(Mamba2LMHeadModel(Mamba2Config.from_name(preset)))
    save(src, tmp_path, format="mamba_ssm")
    cfg = json.loads((tmp_path / "config.json").read_text())
    # mamba_ssm builds MambaConfig(**config): no other keys may appear
    assert set(cfg) <= {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                        "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                        "tie_embeddings"}
    assert cfg["ssm_cfg"]["layer"] == "Mamba2"
    if src.config.attn_layer_idx:  # mamba_ssm's MHA is non-causal unless told
        assert cfg["attn_cfg"]["causal"] is True
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert set(sd) == set(src.state_dict())  # strict load in mamba_ssm: lm_head.weight included
    # the tied embedding is stored once, as torch.save(model.state_dict()) would store it
    head, emb = sd["lm_head.weight"], sd["backbone.embedding.weight"]
    assert head.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    x = ids(256)
    with torch.no_grad():
        torch.testing.assert_close(Mamba2LMHeadModel.from_pretrained(tmp_path)(x), src(x), rtol=0, atol=0)


def test_mamba_ssm_config_read_as_mamba_ssm_reads_it(tmp_path):
    """No ssm_cfg.layer is Mamba-1 to mamba_ssm (refused, saying so); no attn_cfg.causal is non-causal attention to
    mamba_ssm (loaded causal, with a warning); use_mem_eff_path and sequence_parallel choose code paths only."""
    folder = write_mamba_ssm_folder(randomise(Mamba2LMHeadModel(Mamba2Config.from_name("mamba2attn-test"))),
                                    tmp_path)
    cfg = json.loads((folder / "config.json").read_text())

    def load_with(**edits):
        c = json.loads(json.dumps(cfg))
        for section, change in edits.items():
            change(c[section])
        (folder / "config.json").write_text(json.dumps(c))
        return Mamba2LMHeadModel.from_pretrained(folder)

    with pytest.raises(CheckpointError, match=r"config\.json: ssm_cfg has no 'layer'.*Mamba-1"):
        load_with(ssm_cfg=lambda s: s.pop("layer"))
    with pytest.warns(UserWarning, match=r"no 'causal' key.*non-causal"):
        load_with(attn_cfg=lambda a: a.pop("causal"))
    model = load_with(ssm_cfg=lambda s: s.update(use_mem_eff_path=False, sequence_parallel=True))
    assert "use_mem_eff_path" not in model.config.to_dict()["ssm_cfg"]


def test_mamba_ssm_config_without_pad_multiple_uses_mamba_ssm_default(tmp_path):
    src = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test", vocab_size=250, pad_vocab_size_multiple=8))
    write_mamba_ssm_folder(src, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["pad_vocab_size_multiple"]  # MambaConfig's default (8) applies, not ours (16)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert Mamba2LMHeadModel.from_pretrained(tmp_path).config.padded_vocab_size == 256


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def mamba_ssm_folder(tmp_path):
    return write_mamba_ssm_folder(Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")), tmp_path / "ckpt")


def _edit_weights(folder, fn):
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    fn(sd)
    torch.save(sd, folder / "pytorch_model.bin")


def test_missing_key_is_named(mamba_ssm_folder):
    _edit_weights(mamba_ssm_folder, lambda sd: sd.pop("backbone.layers.1.mixer.A_log"))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*missing key 'backbone\.layers\.1\.mixer\.A_log'"):
        Mamba2LMHeadModel.from_pretrained(mamba_ssm_folder)


def test_unexpected_key_is_named(mamba_ssm_folder):
    _edit_weights(mamba_ssm_folder, lambda sd: sd.__setitem__("backbone.layers.7.mixer.D", torch.ones(8)))
    with pytest.raises(CheckpointError, match=r"unexpected key 'backbone\.layers\.7\.mixer\.D'"):
        Mamba2LMHeadModel.from_pretrained(mamba_ssm_folder)


def test_shape_mismatch_is_named(mamba_ssm_folder):
    _edit_weights(mamba_ssm_folder, lambda sd: sd.__setitem__("backbone.norm_f.weight", torch.ones(65)))
    with pytest.raises(CheckpointError, match=r"'backbone\.norm_f\.weight' has shape \(65,\).*\(64,\)"):
        Mamba2LMHeadModel.from_pretrained(mamba_ssm_folder)


def test_tied_lm_head_may_be_absent(mamba_ssm_folder):
    _edit_weights(mamba_ssm_folder, lambda sd: sd.pop("lm_head.weight"))
    model = Mamba2LMHeadModel.from_pretrained(mamba_ssm_folder)
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_untied_lm_head_must_be_present(tmp_path):
    ref_model = hf_model(tie=False)
    ref_model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key 'lm_head\.weight'"):
        Mamba2LMHeadModel.from_pretrained(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown model_type 'llama'"):
        Mamba2LMHeadModel.from_pretrained(tmp_path)


def test_truncated_safetensors_is_named(tmp_path):
    hf_model().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors \(truncated"):
        Mamba2LMHeadModel.from_pretrained(tmp_path)


def test_truncated_torch_file_is_named(mamba_ssm_folder):
    f = mamba_ssm_folder / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin \(truncated"):
        Mamba2LMHeadModel.from_pretrained(mamba_ssm_folder)


def test_missing_shard_is_named(tmp_path):
    hf_model().save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"names shard '{shard.name}', which is missing"):
        Mamba2LMHeadModel.from_pretrained(tmp_path)


def test_pickled_objects_are_not_unpickled(mamba_ssm_folder):
    sd = torch.load(mamba_ssm_folder / "pytorch_model.bin", weights_only=True)
    torch.save({"weights": sd, "extra": Path("x")}, mamba_ssm_folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin holds Python objects"):
        Mamba2LMHeadModel.from_pretrained(mamba_ssm_folder)


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        Mamba2LMHeadModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(Mamba2Config.from_name("mamba2-test").to_dict()))
    with pytest.raises(CheckpointError, match=r"has no weights"):
        Mamba2LMHeadModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Lightning .ckpt, tokenizer, convert
# ---------------------------------------------------------------------------------------------------------------
def write_ckpt(path, model, tokenizer_state, layout):
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer_state}
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 1, "global_step": 10}
    ckpt["state_dict"]["train_metric.total"] = torch.zeros(())  # not the model's: ignored
    if layout == "top_level":  # LanguageModel.on_save_checkpoint; hyper_parameters hold the config too
        ckpt.update(meta)
        ckpt["hyper_parameters"] = {"model_config": meta["model_config"], "optim": {"lr": 3e-4}}
    elif layout == "hyper_parameters":
        ckpt["hyper_parameters"] = {"lr": 3e-4, **meta}
    else:
        ckpt["lit_mamba2"] = meta
    torch.save(ckpt, path)


def tokenizer_state(tok, tmp_path):
    d = tmp_path / "tokfiles"
    tok.save_pretrained(d)
    return {"kind": "hf", "name": "test-words", "files": {p.name: p.read_bytes() for p in d.iterdir()}}


@pytest.mark.parametrize("layout", ["top_level", "hyper_parameters", "lit_mamba2"])
def test_convert_training_checkpoint_to_both_formats(tmp_path, layout, word_tokenizer):
    from transformers import Mamba2ForCausalLM

    src = randomise(Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")))
    tok = word_tokenizer
    write_ckpt(tmp_path / "last.ckpt", src, tokenizer_state(tok, tmp_path), layout)
    x = ids(256)
    with torch.no_grad():
        want = src(x)
    assert main(["convert", "--src", str(tmp_path / "last.ckpt"), "--dst", str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", "--src", str(tmp_path / "last.ckpt"), "--dst", str(tmp_path / "ms"),
                 "--to", "mamba_ssm"]) == 0
    with torch.no_grad():
        assert (Mamba2ForCausalLM.from_pretrained(tmp_path / "hf")(x).logits - want).abs().max() < 1e-4
        ms = load(Mamba2LMHeadModel, tmp_path / "ms")
        torch.testing.assert_close(ms.model(x), want, rtol=0, atol=0)
    # the tokenizer travelled into both folders and is found again
    assert ms.tokenizer.encode("w3 w5") == tok.encode("w3 w5", add_special_tokens=False)
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_convert_hybrid_ckpt_to_hf_is_refused_clearly(tmp_path, capsys):
    src = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2attn-test"))
    write_ckpt(tmp_path / "a.ckpt", src, None, "lit_mamba2")
    assert main(["convert", "--src", str(tmp_path / "a.ckpt"), "--dst", str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "attention layers" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_ckpt_without_model_config_is_refused(tmp_path):
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, tmp_path / "x.ckpt")
    with pytest.raises(CheckpointError, match=r"x\.ckpt: no model config found"):
        Mamba2LMHeadModel.from_pretrained(tmp_path / "x.ckpt")


def test_tokenizer_files_are_found_and_copied(tmp_path, word_tokenizer):
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test"))
    tok = word_tokenizer
    save(model, tmp_path / "a", format="mamba_ssm", tokenizer=tok)
    loaded = load(Mamba2LMHeadModel, tmp_path / "a")
    assert loaded.tokenizer is not None and loaded.tokenizer.eos_id == 0
    save(loaded.model, tmp_path / "b", format="hf", tokenizer=loaded.tokenizer)  # the loaded tokenizer goes along
    assert (tmp_path / "b" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "b" / "config.json").read_text())["eos_token_id"] == 0
    # a named tokenizer (a folder here; a Hub name works the same) overrides
    assert load(Mamba2LMHeadModel, tmp_path / "b", tokenizer=str(tmp_path / "a")).tokenizer.eos_id == 0
    assert load(Mamba2LMHeadModel, tmp_path / "b", tokenizer="byte").tokenizer.vocab_size == 256


# ---------------------------------------------------------------------------------------------------------------
# the Hub, offline
# ---------------------------------------------------------------------------------------------------------------
def test_offline_load_from_prepopulated_hub_cache(tmp_path, monkeypatch):
    src = randomise(Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")))
    cache = tmp_path / "hub"
    repo = cache / "models--some-org--tiny-mamba2"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / rev
    save(src, snap, format="hf")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = Mamba2LMHeadModel.from_pretrained("some-org/tiny-mamba2")
    x = ids(256)
    with torch.no_grad():
        assert (model(x) - src(x)).abs().max() < 1e-6
    with pytest.raises(CheckpointError, match=r"'some-org/absent'.*HF_HUB_OFFLINE=1"):
        Mamba2LMHeadModel.from_pretrained("some-org/absent")


def test_local_path_that_is_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"not a checkpoint folder"):
        Mamba2LMHeadModel.from_pretrained(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------------------------
# saving over a folder, compiled models, the configs written, downloads, malformed files
# ---------------------------------------------------------------------------------------------------------------
def test_saving_over_an_older_checkpoint_removes_its_weight_files(tmp_path):
    """An old shard index or the other format's file must not shadow the weights just written, for us or for
    transformers."""
    from transformers import Mamba2ForCausalLM

    hf_model().save_pretrained(tmp_path, max_shard_size="20KB")  # sharded, with an index
    model = randomise(Mamba2LMHeadModel.from_pretrained(tmp_path), seed=5)
    x = ids(96)
    with torch.no_grad():
        want = model(x)
        model.save_pretrained(tmp_path, format="hf")
        assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]
        assert (Mamba2LMHeadModel.from_pretrained(tmp_path)(x) - want).abs().max() < 1e-6
        assert (Mamba2ForCausalLM.from_pretrained(tmp_path)(x).logits - want).abs().max() < 1e-4
        model.save_pretrained(tmp_path, format="mamba_ssm")  # the other format into the same folder
        assert not (tmp_path / "model.safetensors").exists()
        torch.testing.assert_close(Mamba2LMHeadModel.from_pretrained(tmp_path)(x), want, rtol=0, atol=0)


def test_a_folder_with_both_files_reads_like_its_own_tool(tmp_path):
    """mamba_ssm reads pytorch_model.bin and transformers model.safetensors: with both present, the config's
    format decides which."""
    from safetensors.torch import save_file

    a = randomise(Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")), seed=1)
    b = randomise(Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")), seed=2)
    save(a, tmp_path, format="mamba_ssm")
    save_file({k: v.contiguous() for k, v in b.state_dict().items() if k != "lm_head.weight"},
              str(tmp_path / "model.safetensors"))
    x = ids(256)
    with torch.no_grad():
        torch.testing.assert_close(Mamba2LMHeadModel.from_pretrained(tmp_path)(x), a(x), rtol=0, atol=0)


def test_compiled_model_saves_the_module_it_wraps(tmp_path):
    model = randomise(Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")))
    compiled = torch.compile(model)
    x = ids(256)
    for fmt in ("hf", "mamba_ssm"):
        save(compiled, tmp_path / fmt, format=fmt)
        with torch.no_grad():
            assert (Mamba2LMHeadModel.from_pretrained(tmp_path / fmt)(x) - model(x)).abs().max() < 1e-6


def test_hf_config_is_strict_json_with_the_tokenizers_ids(tmp_path, word_tokenizer):
    from transformers import Mamba2Config as HFConfig

    def strict(path):
        def refuse(name):
            raise ValueError(f"non-standard JSON constant {name}")
        return json.loads(path.read_text(), parse_constant=refuse)

    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test"))  # dt_limit (0, inf): the default
    tok = word_tokenizer
    tok.add_special_tokens({"bos_token": "w0", "pad_token": "w1"})
    save(model, tmp_path / "a", format="hf", tokenizer=tok)
    cfg = strict(tmp_path / "a" / "config.json")
    assert "time_step_limit" not in cfg
    assert (cfg["eos_token_id"], cfg["bos_token_id"], cfg["pad_token_id"]) == (0, 2, 3)
    theirs = HFConfig.from_pretrained(tmp_path / "a")
    assert tuple(theirs.time_step_limit) == (0.0, math.inf) and theirs.pad_token_id == 3
    save(model, tmp_path / "b", format="hf", tokenizer="byte")
    cfg = strict(tmp_path / "b" / "config.json")
    assert cfg["eos_token_id"] == 0 and cfg["pad_token_id"] is None


def _fake_hub(repo_files: dict[str, bytes], cache: Path, asked: list):
    """snapshot_download over an in-memory repo: copies the files whose names match allow_patterns as
    huggingface_hub matches them (fnmatch), and records each call's patterns."""
    from fnmatch import fnmatch

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        asked.append(list(allow_patterns))
        for name, data in repo_files.items():
            if any(fnmatch(name, pat) for pat in allow_patterns):
                (cache / name).parent.mkdir(parents=True, exist_ok=True)
                (cache / name).write_bytes(data)
        return str(cache)
    return snapshot_download


@pytest.mark.parametrize("sharded", [False, True])
def test_hub_download_fetches_only_the_weights_the_load_reads(tmp_path, monkeypatch, sharded):
    import huggingface_hub

    src = tmp_path / "src"
    ref = hf_model()
    ref.save_pretrained(src, max_shard_size="20KB" if sharded else "5GB")
    repo = {p.name: p.read_bytes() for p in src.iterdir()}
    decoy = next(iter(v for k, v in repo.items() if k.endswith(".safetensors")))
    repo.update({"consolidated.safetensors": decoy, "original/model.safetensors": decoy,
                 "pytorch_model.bin": b"not read"})
    cache, asked = tmp_path / "cache", []
    cache.mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_hub(repo, cache, asked))
    model = Mamba2LMHeadModel.from_pretrained("org/tiny")
    got = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    want = sorted(k for k in repo if k.startswith("model") or k == "config.json")
    assert got == want, asked
    x = ids(96)
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max() < 1e-4


def test_convert_refuses_a_file_target_and_keeps_a_users_empty_folder(tmp_path, capsys):
    src = write_mamba_ssm_folder(Mamba2LMHeadModel(Mamba2Config.from_name("mamba2attn-test")), tmp_path / "src")
    (tmp_path / "file").write_text("x")
    for argv, message in [(["--src", str(src), "--dst", str(tmp_path / "file"), "--to", "mamba_ssm"], "is a file"),
                          (["--src", str(src), "--dst", str(tmp_path / "mine"), "--to", "hf"], "attention layers"),
                          (["--src", str(src), "--dst", str(tmp_path / "t"), "--to", "mamba_ssm", "--tokenizer",
                            str(tmp_path / "absent")], "cannot load the tokenizer")]:
        (tmp_path / "mine").mkdir(exist_ok=True)  # made by the user beforehand: a refusal must not delete it
        assert main(["convert", *argv]) == 2 and message in capsys.readouterr().err
        assert (tmp_path / "mine").is_dir()


def test_ckpt_loaded_without_its_tokenizer(tmp_path, word_tokenizer):
    src = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test"))
    write_ckpt(tmp_path / "a.ckpt", src, tokenizer_state(word_tokenizer, tmp_path), "top_level")
    assert load(Mamba2LMHeadModel, tmp_path / "a.ckpt").tokenizer is not None
    assert load(Mamba2LMHeadModel, tmp_path / "a.ckpt", tokenizer=False).tokenizer is None


def test_malformed_files_are_named(tmp_path):
    hf_model().save_pretrained(tmp_path / "s", max_shard_size="20KB")
    index = tmp_path / "s" / "model.safetensors.index.json"
    good = index.read_text()
    index.write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError, match=r"index\.json: not a valid shard index"):
        Mamba2LMHeadModel.from_pretrained(tmp_path / "s")
    # one key in two shards
    from safetensors.torch import load_file, save_file

    index.write_text(good)
    shards = sorted((tmp_path / "s").glob("model-*.safetensors"))
    first = load_file(str(shards[0]))
    key = next(iter(first))
    save_file({**load_file(str(shards[1])), key: first[key]}, str(shards[1]))
    with pytest.raises(CheckpointError, match=rf"key '{key}' is held by two shards"):
        Mamba2LMHeadModel.from_pretrained(tmp_path / "s")
    cfg = tmp_path / "s" / "config.json"
    raw = json.loads(cfg.read_text())
    cfg.write_text("7")
    with pytest.raises(CheckpointError, match=r"config\.json: holds a JSON int"):
        Mamba2LMHeadModel.from_pretrained(tmp_path / "s")
    cfg.write_text(json.dumps({**raw, "time_step_limit": None}))
    with pytest.raises(CheckpointError, match=r"config\.json: time_step_limit must be a pair"):
        Mamba2LMHeadModel.from_pretrained(tmp_path / "s")


def test_dtype_by_name(tmp_path):
    hf_model().save_pretrained(tmp_path)
    assert Mamba2LMHeadModel.from_pretrained(tmp_path, dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match=r"dtype must be one of"):
        Mamba2LMHeadModel.from_pretrained(tmp_path, dtype="bf17")


def test_weights_of_the_wrong_kind_are_named(tmp_path, mamba_ssm_folder):
    sd = torch.load(mamba_ssm_folder / "pytorch_model.bin", weights_only=True)
    sd["backbone.norm_f.weight"] = sd["backbone.norm_f.weight"].long()
    torch.save(sd, mamba_ssm_folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"key 'backbone\.norm_f\.weight' holds torch\.int64"):
        Mamba2LMHeadModel.from_pretrained(mamba_ssm_folder)
    # an hf folder holding the embedding under both its names
    from safetensors.torch import load_file, save_file

    hf_model().save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    w = load_file(str(f))
    save_file({**w, "backbone.embedding.weight": w["backbone.embeddings.weight"].clone()}, str(f))
    with pytest.raises(CheckpointError, match=r"holds both 'backbone\.embeddings\.weight' and"):
        Mamba2LMHeadModel.from_pretrained(tmp_path / "hf")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, mamba_ssm_folder):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    big = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {f"w{i}": i for i in range(300)}, unk_token="w0")), unk_token="w0")
    big.save_pretrained(tmp_path / "big")
    with pytest.raises(CheckpointError, match=r"embedding rows = 256 is smaller than the tokenizer's size 300"):
        load(Mamba2LMHeadModel, mamba_ssm_folder, tokenizer=str(tmp_path / "big"))
