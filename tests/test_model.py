"""Config presets and validation, parameter names and counts, initialisation, document isolation, state passing."""

import json
import math

import pytest
import torch

from lit_mamba2 import ConfigError, Mamba2Config
from lit_mamba2.config import PRESETS
from lit_mamba2.model import Mamba2LMHeadModel

# Parameter counts of the published state-spaces checkpoints (tied embeddings), from the issue / model cards.
PUBLISHED = {
    "mamba2-130m": 128_989_632,
    "mamba2-370m": 368_346_624,
    "mamba2-780m": 780_161_280,
    "mamba2-1.3b": 1_343_757_312,
    "mamba2-2.7b": 2_702_599_680,
    "mamba2attn-2.7b": 2_697_590_880,
}
SHAPES = {"mamba2-130m": (768, 24), "mamba2-370m": (1024, 48), "mamba2-780m": (1536, 48),
          "mamba2-1.3b": (2048, 48), "mamba2-2.7b": (2560, 64), "mamba2attn-2.7b": (2560, 64)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_presets_have_the_published_parameter_counts(name):
    cfg = Mamba2Config.from_name(name)
    assert (cfg.d_model, cfg.n_layer) == SHAPES[name]
    assert cfg.padded_vocab_size == 50288
    with torch.device("meta"):
        model = Mamba2LMHeadModel(cfg)
    assert model.num_parameters() == PUBLISHED[name]


@pytest.mark.parametrize("name", list(PRESETS))
def test_forward_on_every_preset_on_the_meta_device(name):
    cfg = Mamba2Config.from_name(name)
    with torch.device("meta"):
        model = Mamba2LMHeadModel(cfg)
        ids = torch.zeros(2, 300, dtype=torch.long)
        seq_idx = torch.zeros(2, 300, dtype=torch.int32)
        logits = model(ids, seq_idx=seq_idx)
    assert logits.shape == (2, 300, cfg.padded_vocab_size)


def test_hybrid_preset_attention_shape():
    a = Mamba2Config.from_name("mamba2attn-2.7b").attn
    assert (a["num_heads"], a["num_heads_kv"], a["head_dim"], a["rotary_emb_dim"]) == (30, 30, 128, 64)


def test_state_dict_uses_mamba_ssm_names():
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2attn-test"))
    keys = set(model.state_dict())
    expect = {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"}
    for i in (0, 2):
        expect |= {f"backbone.layers.{i}.{k}" for k in (
            "norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.dt_bias",
            "mixer.A_log", "mixer.D", "mixer.norm.weight", "mixer.out_proj.weight", "norm2.weight",
            "mlp.fc1.weight", "mlp.fc2.weight")}
    expect |= {f"backbone.layers.1.{k}" for k in (
        "norm.weight", "mixer.in_proj.weight", "mixer.in_proj.bias", "mixer.conv1d.weight", "mixer.conv1d.bias",
        "mixer.out_proj.weight", "mixer.out_proj.bias", "norm2.weight", "mlp.fc1.weight", "mlp.fc2.weight")}
    assert keys == expect
    sd = model.state_dict()
    cfg = model.config
    # in_proj packs [z, x, B, C, dt]; conv over [x, B, C]
    assert sd["backbone.layers.0.mixer.in_proj.weight"].shape == (2 * 128 + 2 * 2 * 16 + 8, 64)
    assert sd["backbone.layers.0.mixer.conv1d.weight"].shape == (128 + 2 * 2 * 16, 1, 4)
    assert sd["backbone.layers.1.mixer.in_proj.weight"].shape == (16 * (4 + 2 * 2), 64)
    assert sd["lm_head.weight"].data_ptr() == sd["backbone.embedding.weight"].data_ptr()
    assert cfg.padded_vocab_size == 256


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    cfg = Mamba2Config.from_name("mamba2-tiny")
    model = Mamba2LMHeadModel(cfg)
    mixer = model.backbone.layers[0].mixer
    A = torch.exp(mixer.A_log)
    assert A.min() >= 1.0 - 1e-6 and A.max() <= 16.0 + 1e-5
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-3 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    emb_std = model.backbone.embedding.weight.std().item()
    assert abs(emb_std - 0.02) < 0.002
    # out_proj: kaiming-uniform bound 1/sqrt(fan_in), then divided by sqrt(n_layer)
    w = mixer.out_proj.weight
    bound = 1 / math.sqrt(w.shape[1]) / math.sqrt(cfg.n_layer)
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert all(getattr(p, "_no_weight_decay", False) for p in (mixer.A_log, mixer.D, mixer.dt_bias))


@pytest.mark.parametrize("name", ["mamba2-test", "mamba2attn-test"])
def test_documents_packed_together_do_not_see_each_other(name):
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config.from_name(name)).double().eval()
    a, b, c = torch.randint(0, 256, (1, 23)), torch.randint(0, 256, (1, 30)), torch.randint(0, 256, (1, 11))
    packed = torch.cat([a, b, c], dim=1)
    seq_idx = torch.cat([torch.full((1, n), i, dtype=torch.int32) for i, n in enumerate((23, 30, 11))], dim=1)
    with torch.no_grad():
        out = model(packed, seq_idx=seq_idx)
        alone = [model(t) for t in (a, b, c)]
    torch.testing.assert_close(out[:, :23], alone[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out[:, 23:53], alone[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(out[:, 53:], alone[2], rtol=0, atol=1e-10)
    # and without seq_idx the later documents do see the earlier ones
    assert (model(packed)[:, 23:53] - alone[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["mamba2-test", "mamba2attn-test"])
def test_running_in_pieces_with_states_equals_one_pass(name):
    torch.manual_seed(1)
    model = Mamba2LMHeadModel(Mamba2Config.from_name(name)).double().eval()
    ids = torch.randint(0, 256, (2, 45))
    with torch.no_grad():
        whole = model(ids)
        states = model.allocate_states(2, dtype=torch.float64)
        pieces = [model(ids[:, s:e], states=states) for s, e in ((0, 20), (20, 21), (21, 45))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-10)


def test_loss_is_cross_entropy_with_ignore_index():
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test")).double()
    ids = torch.randint(0, 256, (2, 16))
    labels = torch.randint(0, 256, (2, 16))
    labels[0, :5] = -100
    logits = model(ids)
    keep = labels != -100
    logp = torch.log_softmax(logits[keep], dim=-1)
    expect = -logp.gather(1, labels[keep][:, None]).mean()
    torch.testing.assert_close(model.loss(ids, labels), expect, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="labels shape"):
        model.loss(ids, labels[:, :3])


def test_model_rejects_bad_input():
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2-test"))
    with pytest.raises(ValueError, match="input_ids must be a \\(batch, seqlen\\) tensor"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="int64 or int32"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="seq_idx shape"):
        model(torch.zeros(1, 5, dtype=torch.long), seq_idx=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="Mamba2Config"):
        Mamba2LMHeadModel({"d_model": 4})


# ---- config --------------------------------------------------------------------------------------------------------
def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        Mamba2Config.from_name("mamba2-9b")
    assert "mamba2-130m" in str(e.value) and "mamba2attn-2.7b" in str(e.value)


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=100, ssm_cfg={"headdim": 64}), "ssm_cfg.headdim"),
    (dict(d_model=64, ssm_cfg={"headdim": 16, "ngroups": 3}), "ssm_cfg.ngroups"),
    (dict(d_model=64, attn_layer_idx=[0], attn_cfg={"num_heads": 6, "num_heads_kv": 4}), "attn_cfg.num_heads"),
    (dict(d_model=64, attn_layer_idx=[0]), "attn_cfg.num_heads"),
    (dict(n_layer=2, attn_layer_idx=[5], attn_cfg={"num_heads": 4}), "attn_layer_idx"),
    (dict(ssm_cfg={"layer": "Mamba1"}), "ssm_cfg.layer"),
    (dict(ssm_cfg={"dstate": 64}), "ssm_cfg"),
    (dict(ssm_cfg={"d_ssm": 100, "headdim": 64}, d_model=64), "ssm_cfg.headdim"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_invalid_configs_fail_at_construction_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        Mamba2Config(**{"d_model": 64, "n_layer": 2, **kwargs})
    assert f"Mamba2Config.{field}:" in str(e.value)


def test_reads_and_writes_mamba_ssm_config_json(tmp_path):
    published = {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
                 "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
                 "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
                 "tie_embeddings": True}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(published))
    cfg = Mamba2Config.load(path)
    assert cfg == Mamba2Config.from_name("mamba2-130m")
    assert cfg.ssm["d_state"] == 128 and cfg.ssm["chunk_size"] == 256 and cfg.nheads == 24
    cfg.ssm_cfg["dt_limit"] = (0.0, math.inf)
    cfg.save(tmp_path / "out.json")
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["ssm_cfg"]["layer"] == "Mamba2"
    for key, value in published.items():
        if key != "ssm_cfg":
            assert written[key] == value
    assert Mamba2Config.load(tmp_path / "out.json") == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        Mamba2Config.from_dict({**published, "hidden_size": 3})
    with pytest.raises(FileNotFoundError, match="no model config"):
        Mamba2Config.load(tmp_path / "missing.json")


def test_from_name_merges_ssm_cfg_into_the_presets():
    preset = Mamba2Config.from_name("mamba2-tiny")
    c = Mamba2Config.from_name("mamba2-tiny", ssm_cfg={"chunk_size": 32})
    assert c.ssm["chunk_size"] == 32
    assert {k: v for k, v in c.ssm.items() if k != "chunk_size"} == \
        {k: v for k, v in preset.ssm.items() if k != "chunk_size"}


def test_a_float64_model_computes_in_float64():
    """No float32 step inside (the residual, the norms, A): autograd agrees with finite differences as float64
    does, which a float32 detour breaks (the README uses float64 for checks)."""
    cfg = Mamba2Config(d_model=16, n_layer=1, vocab_size=16, ssm_cfg={"d_state": 4, "headdim": 8, "chunk_size": 4})
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(cfg).double()
    ids = torch.randint(0, 16, (1, 6))
    w = model.backbone.embedding.weight.detach().clone().requires_grad_()

    def logits(w):
        return torch.func.functional_call(model, {"backbone.embedding.weight": w, "lm_head.weight": w}, (ids,))
    assert logits(w).dtype == torch.float64
    assert torch.autograd.gradcheck(logits, (w,), eps=1e-6, atol=1e-7)


def test_hybrid_step_without_positions_is_named():
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2attn-test"))
    states = model.allocate_states(1)
    with pytest.raises(ValueError, match=r"needs `pos`"):
        model.step(torch.tensor([3]), states)
