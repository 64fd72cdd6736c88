"""Config presets and validation, parameter names and counts, initialisation, document isolation, state passing."""

import dataclasses
import json
import math

import pytest
import torch

from lit_mamba2 import ConfigError, Mamba2Config
from lit_mamba2.config import PRESETS, AttentionConfig, SSMConfig
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
    assert (a.num_heads, a.num_heads_kv, a.head_dim, a.rotary_emb_dim) == (30, 30, 128, 64)


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
    assert cfg.ssm.d_state == 128 and cfg.ssm.chunk_size == 256 and cfg.nheads == 24
    cfg.save(tmp_path / "out.json")
    written = json.loads((tmp_path / "out.json").read_text())
    assert {k: written[k] for k in published} == published  # ssm_cfg included: {"layer": "Mamba2"}
    assert set(written) - set(published) == {"norm_epsilon", "initializer_range"}
    assert Mamba2Config.load(tmp_path / "out.json") == cfg
    # ssm_cfg holds what differs from the defaults; JSON has no infinity: 1e30 stands for it, both ways
    cfg = cfg.merged(ssm_cfg={"dt_limit": (0.01, math.inf), "d_state": 64})
    cfg.save(tmp_path / "out.json")
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["ssm_cfg"] == {"layer": "Mamba2", "d_state": 64, "dt_limit": [0.01, 1e30]}
    assert Mamba2Config.load(tmp_path / "out.json") == cfg and cfg.ssm.dt_limit == (0.01, math.inf)
    with pytest.raises(ConfigError, match="unknown field"):
        Mamba2Config.from_dict({**published, "hidden_size": 3})
    with pytest.raises(FileNotFoundError, match="no model config"):
        Mamba2Config.load(tmp_path / "missing.json")


def test_from_name_merges_ssm_cfg_into_the_presets():
    preset = Mamba2Config.from_name("mamba2-tiny")
    c = Mamba2Config.from_name("mamba2-tiny", ssm_cfg={"chunk_size": 32})
    assert c.ssm.chunk_size == 32
    assert dataclasses.replace(c.ssm_cfg, chunk_size=preset.ssm.chunk_size) == preset.ssm_cfg
    # a value equal to mamba_ssm's default still overrides the preset's: given is given
    assert Mamba2Config.from_name("mamba2-tiny", ssm_cfg={"d_state": 128}).ssm.d_state == 128
    # attn_cfg likewise; head_dim, not given, follows the new d_model
    h = Mamba2Config.from_name("mamba2attn-test", d_model=128, attn_cfg={"rotary_emb_dim": 16})
    assert (h.attn.num_heads, h.attn.num_heads_kv, h.attn.head_dim, h.attn.rotary_emb_dim) == (4, 2, 32, 16)
    # a complete SSMConfig replaces the preset's
    assert Mamba2Config.from_name("mamba2-tiny", d_model=64, ssm_cfg=SSMConfig(headdim=32)).ssm.d_state == 128


def test_config_sections_are_typed_with_the_derived_values_resolved_once():
    cfg = Mamba2Config.from_name("mamba2attn-test")
    assert isinstance(cfg.ssm_cfg, SSMConfig) and isinstance(cfg.attn_cfg, AttentionConfig)
    assert (cfg.ssm.headdim, cfg.ssm.ngroups, cfg.ssm.d_state, cfg.ssm.chunk_size) == (16, 2, 16, 16)
    assert cfg.ssm_cfg.d_ssm is None and cfg.ssm.d_ssm == cfg.d_ssm == cfg.d_inner == 128
    assert cfg.ssm.dt_limit == (0.0, math.inf) and cfg.ssm.A_init_range == (1.0, 16.0)
    assert (cfg.attn_cfg.head_dim, cfg.attn.head_dim) == (None, 16)  # d_model // num_heads
    assert (cfg.attn_cfg.num_heads_kv, cfg.attn.num_heads_kv) == (2, 2)
    mha = cfg.merged(attn_cfg=AttentionConfig(num_heads=8))
    assert (mha.attn.num_heads_kv, mha.attn.head_dim) == (8, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ssm_cfg.headdim = 32
    # a dict sets the keys it names over the defaults; lists (JSON, YAML) become the typed pairs
    c = Mamba2Config(d_model=64, n_layer=2, ssm_cfg={"headdim": 16, "A_init_range": [2, 8]})
    assert c.ssm_cfg == SSMConfig(headdim=16, A_init_range=(2.0, 8.0))
    assert Mamba2Config(d_model=64, n_layer=2, ssm_cfg=SSMConfig(headdim=16, A_init_range=(2.0, 8.0))) == c
    # config.json: a hybrid's attn_cfg always says causal (mamba_ssm's MHA is non-causal unless told)
    assert Mamba2Config.from_name("mamba2attn-test").to_dict()["attn_cfg"] == {
        "num_heads": 4, "num_heads_kv": 2, "d_conv": 4, "rotary_emb_dim": 8, "causal": True}


@pytest.mark.parametrize("kwargs, message", [
    (dict(ssm_cfg={"dstate": 64}), "Mamba2Config.ssm_cfg: unknown key 'dstate' (did you mean 'd_state'?)"),
    (dict(ssm_cfg={"chunksize": 64}), "Mamba2Config.ssm_cfg: unknown key 'chunksize' (did you mean 'chunk_size'?)"),
    (dict(attn_cfg={"num_head": 4}), "Mamba2Config.attn_cfg: unknown key 'num_head' (did you mean 'num_heads'?)"),
    (dict(ssm_cfg=[64]), "Mamba2Config.ssm_cfg: must be a dict"),
    (dict(ssm_cfg={"dt_limit": "wide"}), "Mamba2Config.ssm_cfg.dt_limit: must be a pair of numbers"),
])
def test_unknown_or_mistyped_section_keys_are_named(kwargs, message):
    with pytest.raises(ConfigError) as e:
        Mamba2Config(**{"d_model": 64, "n_layer": 2, **kwargs})
    assert message in str(e.value)
    with pytest.raises(ConfigError, match=r"Mamba2Config: unknown field 'nlayer' \(did you mean 'n_layer'\?\)"):
        Mamba2Config.from_name("mamba2-test", nlayer=3)


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


@pytest.mark.parametrize("name", ["mamba2-test", "mamba2attn-test"])
def test_plain_step_after_a_padded_prefill_equals_forward_on_each_prompt_alone(name):
    """model.step (the recurrence; a growing KV cache whose keys remember their documents and positions) after a
    left-padded prefill: each row's logits equal the full forward of its prompt and tokens alone."""
    from lit_mamba2.generation import pad_prompts

    torch.manual_seed(2)
    model = Mamba2LMHeadModel(Mamba2Config.from_name(name)).double().eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    steps = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]).T  # (3 steps, batch)
    ids, seq_idx, _, _ = pad_prompts(prompts, "cpu")
    with torch.no_grad():
        states = model.allocate_states(3, dtype=torch.float64)
        model(ids, seq_idx=seq_idx, states=states)
        got = torch.stack([model.step(t, states) for t in steps], dim=1)  # (batch, 3, vocab)
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p + steps[:, i].tolist()]))[0, len(p):]
            torch.testing.assert_close(got[i], alone, rtol=0, atol=1e-10)


def test_positions_are_each_tokens_place_in_its_document_and_a_shard_gets_its_own():
    """positions default to the place within each document (rotary restarts per document); a second half of the
    row run alone with its states and its slice of the row's positions equals the second half of the whole."""
    from lit_mamba2.model import document_positions

    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]], dtype=torch.int32)
    assert document_positions(seq_idx, 1, 9, "cpu").tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    torch.manual_seed(3)
    model = Mamba2LMHeadModel(Mamba2Config.from_name("mamba2attn-test")).double().eval()
    ids = torch.randint(0, 256, (2, 40))
    seq_idx = torch.cat([torch.zeros(2, 13), torch.ones(2, 27)], dim=1).to(torch.int32)
    positions = document_positions(seq_idx, 2, 40, "cpu")
    with torch.no_grad():
        whole = model(ids, seq_idx=seq_idx)
        torch.testing.assert_close(model(ids, seq_idx=seq_idx, positions=positions), whole, rtol=0, atol=0)
        states = model.allocate_states(2, dtype=torch.float64)
        model(ids[:, :25], seq_idx=seq_idx[:, :25], positions=positions[:, :25], states=states)
        second = model(ids[:, 25:], seq_idx=seq_idx[:, 25:], positions=positions[:, 25:], states=states)
        torch.testing.assert_close(second, whole[:, 25:], rtol=0, atol=1e-10)
        # positions restarted at the shard's start are wrong for attention: the shard's own positions matter
        wrong = model(ids[:, 25:], seq_idx=seq_idx[:, 25:], positions=positions[:, :15],
                      states=model.allocate_states(2, dtype=torch.float64))
        assert (wrong - whole[:, 25:]).abs().max() > 1e-3


@pytest.mark.parametrize("name,overrides", [("mamba2-130m", {}), ("mamba2attn-test", {"n_layer": 12})])
def test_meta_device_model_initialised_by_init_weights_matches_eager(name, overrides):
    """Built on the meta device, materialised with to_empty and initialised by init_weights(): from the same
    torch seed, the eager model's weights exactly, also when initialised part by part in any order (as a sharded
    build does); from another init seed, every parameter group (the same parameter across layers) has the eager
    model's distribution, and A, dt keep their ranges."""
    import collections
    import re

    cfg = Mamba2Config.from_name(name, **overrides)
    torch.manual_seed(0)
    eager = Mamba2LMHeadModel(cfg)
    torch.manual_seed(0)
    with torch.device("meta"):
        meta = Mamba2LMHeadModel(cfg)
    meta.to_empty(device="cpu")
    for part in reversed(range(cfg.n_layer + 1)):
        meta.init_part(part)
    assert (meta.lm_head.weight is meta.backbone.embedding.weight) == cfg.tie_embeddings
    for (n, a), b in zip(eager.state_dict().items(), meta.state_dict().values()):
        assert torch.equal(a, b), n
    meta.init_weights(seed=eager.init_seed + 1)

    def groups(model):
        out = collections.defaultdict(list)
        for n, p in model.named_parameters():
            out[re.sub(r"layers\.\d+\.", "layers.*.", n)].append(p.detach().flatten())
        return {k: torch.cat(v) for k, v in out.items()}

    e, m = groups(eager), groups(meta)
    assert e.keys() == m.keys()
    for k in e:
        if e[k].std() == 0:  # norm weights, D: constants
            assert torch.equal(m[k], e[k]), k
            continue
        n = e[k].numel()  # five standard errors of the two samples' difference (std ratio: sqrt(1 / n) each)
        assert abs(m[k].std() / e[k].std() - 1) < 5 * math.sqrt(2 / n), (k, m[k].std(), e[k].std())
        assert abs(m[k].mean() - e[k].mean()) < 5 * e[k].std() * math.sqrt(2 / n), k
        assert not torch.equal(m[k], e[k]), k  # drawn afresh
    A_lo, A_hi = cfg.ssm.A_init_range
    for n, p in meta.named_parameters():
        if n.endswith("A_log"):
            assert p.exp().min() >= A_lo - 1e-5 and p.exp().max() <= A_hi + 1e-4
        if n.endswith("dt_bias"):
            dt = torch.nn.functional.softplus(p)
            assert dt.min() >= cfg.ssm.dt_init_floor - 1e-7 and dt.max() <= cfg.ssm.dt_max + 1e-6
    assert abs(meta.backbone.embedding.weight.std() - cfg.initializer_range) < 0.001
    out_proj = meta.backbone.layers[0].mixer.out_proj.weight
    n_residuals = 1 if cfg.d_intermediate == 0 else 2
    bound = 1 / math.sqrt(out_proj.shape[1]) / math.sqrt(n_residuals * cfg.n_layer)
    assert 0.9 * bound < out_proj.abs().max() <= bound


def test_mixer_takes_its_segment_sizes_from_its_own_attributes():
    """A mixer cut by heads into two shards (the tensor-parallel layout: each shard one group of B/C, its heads'
    rows of in_proj and channels of conv1d, out_proj's columns), with each shard's sizes set on its attributes:
    the shards' outputs add up to the whole mixer's."""
    import copy

    from lit_mamba2.model import Mamba2Mixer

    cfg = Mamba2Config.from_name("mamba2-test", ssm_cfg={"ngroups": 2, "D_has_hdim": True})
    torch.manual_seed(4)
    full = Mamba2Mixer(cfg).double()
    with torch.no_grad():
        full.norm.weight.uniform_(0.5, 1.5)
        full.D.uniform_(0.5, 1.5)
    h, p, n, d_ssm = full.nheads, full.headdim, full.d_state, full.d_ssm
    assert full.d_mlp == 0
    u = torch.randn(2, 21, cfg.d_model, dtype=torch.float64)

    def shard(s):
        heads = torch.arange(s * h // 2, (s + 1) * h // 2)
        ch = (heads[:, None] * p + torch.arange(p)).flatten()  # this shard's channels of d_ssm
        grp = torch.arange(s * n, (s + 1) * n)
        xbc_rows = torch.cat([ch, d_ssm + grp, d_ssm + 2 * n + grp])  # within xBC: x | B (2 groups) | C (2 groups)
        rows = torch.cat([ch, d_ssm + xbc_rows, d_ssm + full.conv_dim + heads])  # in_proj: z | xBC | dt
        m = copy.deepcopy(full)
        m.nheads, m.d_ssm, m.ngroups = h // 2, d_ssm // 2, 1
        m.conv_dim = m.d_ssm + 2 * n
        with torch.no_grad():
            m.in_proj.weight = torch.nn.Parameter(full.in_proj.weight[rows])
            m.conv1d.weight = torch.nn.Parameter(full.conv1d.weight[xbc_rows])
            m.conv1d.bias = torch.nn.Parameter(full.conv1d.bias[xbc_rows])
            for name in ("dt_bias", "A_log"):
                setattr(m, name, torch.nn.Parameter(getattr(full, name)[heads]))
            m.D = torch.nn.Parameter(full.D[ch])
            m.norm.weight = torch.nn.Parameter(full.norm.weight[ch])
            m.out_proj.weight = torch.nn.Parameter(full.out_proj.weight[:, ch])
        return m

    with torch.no_grad():
        torch.testing.assert_close(shard(0)(u) + shard(1)(u), full(u), rtol=0, atol=1e-10)
